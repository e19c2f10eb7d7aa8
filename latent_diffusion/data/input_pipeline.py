"""Image batches for training and evaluation: host slice -> order -> decode -> crop/resize/flip -> [-1, 1].

The training order depends only on the seed: epoch e is a stream fixed by (seed, e), so starting at step k
reads epoch k * B // n from offset k * B % n and yields exactly the batches an uninterrupted run would give at
k, k+1, ... Per-example randomness (flips) is seeded by the example's position in the stream.
"""

import collections
import functools

from absl import logging
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
  records = source.epoch(seed, first_epoch, offset).concatenate(
      tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(lambda e: source.epoch(seed, e)))
  ds = _finish(source, records.enumerate(start=position), config, flip=config.random_flip, seed=seed,
               layouts=False)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(config.prefetch)
  return (_fill_skipped(batch) for batch in ds.as_numpy_iterator())


# What this process's input pipelines left out, by reason (sources.SKIP_REASONS); the train loop logs it.
SKIPPED = collections.Counter()


def skipped_counts(since=None, all_hosts=False):
  """{reason: examples skipped} by this process's pipelines (since an earlier result; summed over the hosts)."""
  counts = np.array([SKIPPED[r] - (since or {}).get(r, 0) for r in sources.SKIP_REASONS], np.int64)
  if all_hosts and jax.process_count() > 1:
    counts = parallel.to_host(counts[None]).sum(0)
  return {r: int(n) for r, n in zip(sources.SKIP_REASONS, counts) if n}


def _count_skipped(skip):
  reasons = skip[skip > 0]
  if reasons.size:
    counts = collections.Counter(sources.SKIP_REASONS[r - 1] for r in reasons.tolist())
    if not SKIPPED:
      logging.warning('The input pipeline skips examples it cannot use (first: %s); counted in data/skipped.',
                      dict(counts))
    SKIPPED.update(counts)


def _fill_skipped(batch):
  """A training batch whose skipped examples' rows are taken by kept examples of the same batch, in turn: each
  batch stays one batch of stream positions, so a restart at step k needs no saved reader state."""
  skip = batch.pop('skip', None)
  if skip is None or not skip.any():
    return batch
  _count_skipped(skip)
  kept = np.flatnonzero(skip == 0)
  if not kept.size:
    raise ValueError(f'Every example of a batch of {len(skip)} was skipped '
                     f'({dict(collections.Counter(sources.SKIP_REASONS[r - 1] for r in skip.tolist()))}): check '
                     'data.files, data.resolution and data.filters.')
  rows = np.arange(len(skip))
  rows[skip > 0] = kept[np.arange(np.count_nonzero(skip)) % kept.size]
  return {k: v[rows] for k, v in batch.items()}


def _drop_skipped(batches, batch_size):
  """Ordered batches without the skipped examples, regrouped into batches of `batch_size` (the last one short)."""
  pending = []
  for batch in batches:
    skip = batch.pop('skip', None)
    if skip is not None and skip.any():
      _count_skipped(skip)
      batch = {k: v[skip == 0] for k, v in batch.items()}
    pending.append(batch)
    while sum(len(p['image']) for p in pending) >= batch_size:
      merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
      yield {k: v[:batch_size] for k, v in merged.items()}
      pending = [{k: v[batch_size:] for k, v in merged.items()}]
  if pending and sum(len(p['image']) for p in pending):
    yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def num_host_examples(config, split):
  """How many examples of `split` this host reads."""
  return sources.create_source(config, split, process_index=jax.process_index(),
                               process_count=jax.process_count()).num_examples


def eval_iterator(config, global_batch_size, *, split=None, num_examples=None, start=0):
  """One ordered pass over this host's share of a split, from its record `start`, `num_examples` records in all
  (split over the hosts; the examples kept of them), as full batches. The last batch is padded by repeating
  examples; `mask` marks the real ones.
  """
  source = sources.create_source(config, split or config.eval_split, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  _check_resolution(source, config.resolution)
  records = source.ordered().skip(start)
  if num_examples is not None:
    records = records.take(num_examples // jax.process_count())
  return _ordered_batches(source, records, config, global_batch_size)


def store_shards(config, global_batch_size, split, examples_per_shard):
  """How the latents stage cuts this host's share of `split` into store shards: [(the shard's first record,
  a function giving its batches as eval_iterator does)]. Sharded files give one store shard per file, so a
  restart skips whole files; other sources `examples_per_shard` examples a shard."""
  source = sources.create_source(config, split, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  _check_resolution(source, config.resolution)
  batches = lambda records: _ordered_batches(source, records, config, global_batch_size)
  if isinstance(source, sources.ShardSource):
    starts = np.cumsum([0] + source.counts[:-1]).tolist()
    return [(start, functools.partial(lambda i: batches(source.file_records(i)), i))
            for i, start in enumerate(starts)]
  n = source.num_examples
  return [(start, functools.partial(lambda s: batches(source.ordered().skip(s).take(examples_per_shard)), start))
          for start in range(0, n, examples_per_shard)]


def _ordered_batches(source, records, config, global_batch_size):
  """Full batches of `records`, skipped examples left out, the last padded by repeating examples (`mask`
  marks the real ones). With several hosts every host yields as many batches: a host whose share ran out
  yields fully masked ones while the others still have examples."""
  batch_size = _host_batch_size(global_batch_size)
  ds = _finish(source, records.enumerate(), config, flip=False, seed=0, layouts=True).batch(batch_size)
  blank = {k: np.full((batch_size,) + tuple(v.shape[1:]), b'' if v.dtype == tf.string else 0,
                      object if v.dtype == tf.string else v.dtype.as_numpy_dtype)
           for k, v in ds.element_spec.items() if k != 'skip'}
  batches = _drop_skipped(ds.prefetch(config.prefetch).as_numpy_iterator(), batch_size)
  while True:
    batch = next(batches, None)
    if not parallel.any_process(batch is not None):  # on every host each time: a collective
      return
    if batch is None:
      yield dict(blank, mask=np.zeros(batch_size, bool))
      continue
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
