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
  top, left, side = _crop(tf.shape(image))
  tf.debugging.assert_greater_equal(
      side, resolution,
      message=f'An image is smaller than data.resolution={resolution}; lower data.resolution or use larger images.')
  image = tf.image.crop_to_bounding_box(image, top, left, side, side)
  image = tf.cast(image, tf.float32)
  image = tf.cond(side == resolution, lambda: image,
                  lambda: tf.image.resize(image, (resolution, resolution), method='area'))
  image = tf.ensure_shape(image, (resolution, resolution, 3))
  if flip_seed is not None:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image / 127.5 - 1.0


def _crop(shape):
  """The centre square of an image of `shape`: (top, left, side), as `preprocess` crops it."""
  height, width = shape[0], shape[1]
  side = tf.minimum(height, width)
  return (height - side) // 2, (width - side) // 2, side


def preprocess_segmentation(segmentation, resolution):
  """A class-id map [H, W, 1] cropped like its image and resized (nearest) to [resolution, resolution] uint8."""
  top, left, side = _crop(tf.shape(segmentation))
  segmentation = tf.image.crop_to_bounding_box(segmentation, top, left, side, side)
  segmentation = tf.image.resize(segmentation, (resolution, resolution), method='nearest')
  return tf.ensure_shape(tf.cast(segmentation[..., 0], tf.uint8), (resolution, resolution))


def preprocess_objects(objects, image_shape, max_objects):
  """Normalised boxes [N, 4] and labels [N] -> `boxes` [max_objects, 4] in the cropped image's coordinates and
  `object_labels` [max_objects] (-1 pads); objects cropped away are dropped, the first `max_objects` kept."""
  top, left, side = (tf.cast(v, tf.float32) for v in _crop(image_shape))
  height, width = tf.cast(image_shape[0], tf.float32), tf.cast(image_shape[1], tf.float32)
  box = tf.cast(objects['bbox'], tf.float32)
  box = tf.stack([(box[:, 0] * height - top) / side, (box[:, 1] * width - left) / side,
                  (box[:, 2] * height - top) / side, (box[:, 3] * width - left) / side], axis=-1)
  box = tf.clip_by_value(box, 0.0, 1.0)
  keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
  box = tf.boolean_mask(box, keep)[:max_objects]
  labels = tf.boolean_mask(tf.cast(objects['label'], tf.int32), keep)[:max_objects]
  pad = max_objects - tf.shape(labels)[0]
  return (tf.ensure_shape(tf.pad(box, [[0, pad], [0, 0]]), (max_objects, 4)),
          tf.ensure_shape(tf.pad(labels, [[0, pad]], constant_values=-1), (max_objects,)))


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


def _finish(source, records, config, *, flip, seed, layouts):
  """Decodes and preprocesses (index, record) pairs into typed examples; `layouts`: with the objects, the
  segmentation map and the control image (unflipped) when the source has them, else without."""
  def process(index, record):
    example = source.decode(record)
    objects, segmentation = example.pop('objects', None), example.pop('segmentation', None)
    control = example.pop('control', None)
    if layouts and objects is not None:
      example['boxes'], example['object_labels'] = preprocess_objects(objects, tf.shape(example['image']),
                                                                      config.max_objects)
    if layouts and segmentation is not None:
      example['segmentation'] = preprocess_segmentation(segmentation, config.resolution)
    if layouts and control is not None:  # cropped and resized as its image is, kept as uint8
      example['control'] = tf.cast(tf.round((preprocess(control, config.resolution) + 1.0) * 127.5), tf.uint8)
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
  ds = _finish(source, records.enumerate(start=position), config, flip=config.random_flip, seed=seed,
               layouts=False)
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
  ds = _finish(source, records.enumerate(), config, flip=False, seed=0, layouts=True)
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
