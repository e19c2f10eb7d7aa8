"""Image batches for training and evaluation: host slice -> order -> decode -> crop/resize/flip -> [-1, 1].

The training order depends only on the seed: epoch e is a stream fixed by (seed, e), so starting at step k
reads epoch k * B // n from offset k * B % n and yields exactly the batches an uninterrupted run would give at
k, k+1, ... Per-example randomness (flips) is seeded by the example's position in the stream.
"""

import jax
import numpy as np
import tensorflow as tf

from latent_diffusion import parallel
from latent_diffusion.data import sources

_AUTOTUNE = tf.data.AUTOTUNE


def preprocess(image, resolution, *, flip_seed=None):
  """Centre-crops to a square, resizes to `resolution` (area-averaging when shrinking), flips, scales to [-1, 1]."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  side = tf.minimum(height, width)
  tf.debugging.assert_greater_equal(
      side, resolution,
      message=f'An image is smaller than data.resolution={resolution}; lower data.resolution or use larger images.')
  image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side, side)
  image = tf.cast(image, tf.float32)
  image = tf.cond(side == resolution, lambda: image,
                  lambda: tf.image.resize(image, (resolution, resolution), method='area'))
  image = tf.ensure_shape(image, (resolution, resolution, 3))
  if flip_seed is not None:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image / 127.5 - 1.0


def _check_resolution(source, resolution):
  height, width = source.image_shape[:2]
  if height is not None and width is not None and min(height, width) < resolution:
    raise ValueError(f'data.resolution={resolution} is larger than the dataset images ({height}x{width}); '
                     'lower data.resolution or pick a larger variant (e.g. captioned_shapes/256).')


def _host_batch_size(global_batch_size):
  if global_batch_size % jax.process_count():
    raise ValueError(f'The global batch size {global_batch_size} is not divisible by the number of hosts '
                     f'({jax.process_count()}).')
  return global_batch_size // jax.process_count()


def _finish(source, records, config, *, flip, seed):
  """Decodes and preprocesses (index, record) pairs into typed examples."""
  def process(index, record):
    example = source.decode(record)
    flip_seed = tf.stack([tf.cast(seed, tf.int64) + 1, index]) if flip else None
    example['image'] = preprocess(example['image'], config.resolution, flip_seed=flip_seed)
    if 'label' in example:
      example['label'] = tf.cast(example['label'], tf.int32)
    return example
  return records.map(process, num_parallel_calls=_AUTOTUNE)


def train_iterator(config, global_batch_size, *, seed, start_step=0, split=None):
  """Endless host-local numpy batches of `config.train_split` in a seed-fixed order, starting at `start_step`."""
  source = sources.create_source(config, split or config.train_split, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  _check_resolution(source, config.resolution)
  batch_size = _host_batch_size(global_batch_size)
  if source.num_examples < batch_size:
    raise ValueError(f'This host has {source.num_examples} examples, fewer than its batch of {batch_size}.')
  position = start_step * batch_size
  first_epoch, offset = divmod(position, source.num_examples)
  records = tf.data.Dataset.range(first_epoch, 2**62).flat_map(lambda e: source.epoch(seed, e)).skip(offset)
  ds = _finish(source, records.enumerate(start=position), config, flip=config.random_flip, seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(config.prefetch)
  return ds.as_numpy_iterator()


def num_host_examples(config, split):
  """How many examples of `split` this host reads."""
  return sources.create_source(config, split, process_index=jax.process_index(),
                               process_count=jax.process_count()).num_examples


def eval_iterator(config, global_batch_size, *, split=None, num_examples=None, start=0):
  """One ordered pass over this host's share of a split, from its example `start`, `num_examples` in all
  (split over the hosts), as full batches. The last batch is padded by repeating examples; `mask` marks the
  real ones.
  """
  source = sources.create_source(config, split or config.eval_split, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  _check_resolution(source, config.resolution)
  batch_size = _host_batch_size(global_batch_size)
  records = source.ordered().skip(start)
  if num_examples is not None:
    records = records.take(num_examples // jax.process_count())
  ds = _finish(source, records.enumerate(), config, flip=False, seed=0)
  for batch in ds.batch(batch_size).prefetch(config.prefetch).as_numpy_iterator():
    real = len(batch['image'])
    pad = np.arange(batch_size) % real
    batch = {k: v[pad] for k, v in batch.items()}
    batch['mask'] = np.arange(batch_size) < real
    yield batch


def to_global(batch, mesh):
  """Host-local numpy batch -> global `jax.Array`s sharded over the mesh's batch axes (strings stay on host)."""
  parallel.check_batch_size(len(next(iter(batch.values()))) * jax.process_count(), mesh)
  sharding = parallel.batch_sharding(mesh)
  return {k: v if v.dtype.kind in 'OSU' else jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}
