"""Where images come from: a TFDS dataset, sharded files (tar, TFRecord, parquet) or a local folder, sliced for
this host, as per-epoch record streams.

A source exposes `num_examples` (this host's share), `epoch(seed, epoch, start)` (a tf.data stream of raw
records in a deterministic order that depends only on the seed and the epoch, from its `start`-th) and
`decode(record)` (a dict with `image` uint8 [H, W, 3]; when the data has them, `caption` and `label`; when
configured, `objects` (`bbox`, normalised (ymin, xmin, ymax, xmax) [N, 4], and `label` [N]: layouts),
`segmentation` ([H, W, 1] class ids) and `control` (uint8 [H, W, 3], a ControlNet's control image); `skip` for
an example to leave out). Decoding after ordering lets a restart skip records cheaply.
"""

import concurrent.futures
import io
import math
import os

import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds

from latent_diffusion.data import captioned_shapes  # pylint: disable=unused-import  (registers the builder)
from latent_diffusion.data import shards

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
_AUTOTUNE = tf.data.AUTOTUNE


def epoch_seed(seed, epoch):
  """A stateless-RNG seed for one epoch (shape [2], int64)."""
  return tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _block_shuffle(ds, seed, block_size, first_block=0):
  """Shuffles consecutive blocks of `block_size` records, each with its own stateless seed (block indices count
  from `first_block`)."""
  def shuffle_block(index, block):
    block_seed = tf.stack([seed[0] * 1_000_003 + seed[1], index])
    if isinstance(block, tuple):  # several fields: one permutation for all
      order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(block[0])[0]), block_seed)
      return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(b, order) for b in block))
    return tf.data.Dataset.from_tensor_slices(tf.random.experimental.stateless_shuffle(block, block_seed))
  return ds.batch(block_size).enumerate(start=first_block).flat_map(shuffle_block)


class TfdsSource:
  """A TFDS split read from its TFRecord shards: shard order and blocks of records shuffled per epoch."""

  def __init__(self, name, split, *, data_dir=None, image_key='image', caption_key='caption',
               label_key='label', objects_key='', segmentation_key='', process_index=0, process_count=1,
               shuffle_block=10_000):
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
          f"Unknown dataset data.name='{name}': it is not a registered TFDS dataset. Use the built-in "
          "'captioned_shapes/32', '/64' or '/256', a TFDS dataset you have prepared (e.g. 'celeb_a_hq/256'), "
          'or set data.folder to a local folder of images.') from e
    self._prepare(name, data_dir)
    features = self.builder.info.features
    self.keys = {k: v for k, v in (('image', image_key), ('caption', caption_key), ('label', label_key))
                 if v and v in features}
    for ours, field, theirs in (('image', 'image_key', image_key), ('objects', 'objects_key', objects_key),
                                ('segmentation', 'segmentation_key', segmentation_key)):
      if theirs and theirs not in features:
        raise ValueError(f"Dataset '{name}' has no feature data.{field}='{theirs}'; its features are "
                         f'{sorted(features)}.')
      if theirs:
        self.keys[ours] = theirs
    if objects_key and not {'bbox', 'label'} <= set(features[objects_key].keys()):
      raise ValueError(f"data.objects_key='{objects_key}' of dataset '{name}' needs 'bbox' and 'label' per object; "
                       f'it has {sorted(features[objects_key].keys())}.')
    if split.split('[')[0] not in self.builder.info.splits:
      raise ValueError(f"Dataset '{name}' has no split '{split}'; it has {sorted(self.builder.info.splits)}.")
    host_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    split_info = self.builder.info.splits[host_split]
    self.num_examples = split_info.num_examples
    if self.builder.info.file_format.value != 'tfrecord':
      raise ValueError(f"Dataset '{name}' is stored as {self.builder.info.file_format.value}; prepare it as "
                       'tfrecord (the default file_format of tfds.builder(...).download_and_prepare).')
    instructions = split_info.file_instructions
    self._files = tf.constant([f.filename for f in instructions])
    self._skips = tf.constant([f.skip for f in instructions], tf.int64)
    self._takes = tf.constant([f.take for f in instructions], tf.int64)
    self._shuffle_block = shuffle_block
    self.image_shape = features[self.keys['image']].shape

  def _prepare(self, name, data_dir):
    """Generates the dataset if it is missing (offline for the built-in one)."""
    if self.builder.is_prepared():
      return
    try:
      self.builder.download_and_prepare()
    except Exception as e:  # TFDS raises many types for "cannot download/prepare here".
      raise ValueError(
          f"Dataset '{name}' is not prepared in data_dir={self.builder.data_dir_root!r} and preparing it "
          f'failed: {e}. Prepare it where you have the data (tfds build {name.split("/")[0]}) and point '
          'data.data_dir at it.') from e

  def epoch(self, seed, epoch, start=0):
    """Epoch `epoch`'s records from its `start`-th (the records before it read, not decoded)."""
    return self._epoch(seed, epoch).skip(start)

  def _epoch(self, seed, epoch):
    seed = epoch_seed(seed, epoch)
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(self._files)), seed)
    shards = tf.data.Dataset.from_tensor_slices(
        (tf.gather(self._files, order), tf.gather(self._skips, order), tf.gather(self._takes, order)))
    records = shards.interleave(
        lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take),
        cycle_length=16, block_length=1, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return _block_shuffle(records, seed, self._shuffle_block)

  def ordered(self):
    """All records of this host's share in the split's stored order (for evaluation and encoding)."""
    shards = tf.data.Dataset.from_tensor_slices((self._files, self._skips, self._takes))
    return shards.flat_map(lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take))

  def decode(self, record):
    example = self.builder.info.features.deserialize_example(record)
    decoded = {ours: example[theirs] for ours, theirs in self.keys.items()}
    if 'objects' in decoded:
      decoded['objects'] = {k: decoded['objects'][k] for k in ('bbox', 'label')}
    return decoded


class FolderSource:
  """A folder of images (searched recursively), each with an optional caption in a same-name `.txt` file and,
  with `control_folder`, a control image under the same relative path there."""

  def __init__(self, folder, *, control_folder='', process_index=0, process_count=1):
    if not tf.io.gfile.isdir(folder):
      raise ValueError(f"data.folder='{folder}' is not a directory.")
    paths = sorted(
        os.path.join(root, f) for root, _, files in tf.io.gfile.walk(folder) for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
      raise ValueError(f"data.folder='{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    per_host = len(paths) // process_count
    if per_host == 0:
      raise ValueError(f"data.folder='{folder}' has {len(paths)} images, fewer than the {process_count} hosts.")
    paths = paths[process_index * per_host:(process_index + 1) * per_host]
    captions = [_read_caption(p) for p in paths]
    self.keys = {'image': 'image', 'caption': 'caption'} if any(captions) else {'image': 'image'}
    self.num_examples = per_host
    self._records = (tf.constant(paths), tf.constant(captions))
    if control_folder:
      controls = [os.path.join(control_folder, os.path.relpath(p, folder)) for p in paths]
      missing = [c for c in controls if not tf.io.gfile.exists(c)]
      if missing:
        raise ValueError(f"data.control_folder='{control_folder}' lacks the control images of {len(missing)} "
                         f'images of data.folder, e.g. {missing[0]}; give one per image, under the same name.')
      self.keys['control'] = 'control'
      self._records += (tf.constant(controls),)
    self.image_shape = (None, None, 3)

  def epoch(self, seed, epoch, start=0):
    order = tf.random.experimental.stateless_shuffle(tf.range(self.num_examples), epoch_seed(seed, epoch))
    return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(r, order)[start:] for r in self._records))

  def ordered(self):
    return tf.data.Dataset.from_tensor_slices(self._records)

  def decode(self, record):
    read = lambda p: tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
    decoded = {'image': read(record[0])}
    if 'caption' in self.keys:
      decoded['caption'] = record[1]
    if 'control' in self.keys:
      decoded['control'] = read(record[2])
    return decoded


SKIP_REASONS = ('no image', 'undecodable', 'smaller than data.resolution', 'filtered by size',
                'filtered by aspect ratio', 'no caption', 'filtered by caption length')


class ShardSource:
  """Sharded files (`data.files`: WebDataset tar, TFRecord or parquet, local or gs://), each host reading its own
  share of the file list. An epoch visits the host's files in a seed-fixed order, then shuffles blocks of
  `shuffle_block` records; a start inside it skips whole files by their counts, so a restart does not read the
  skipped examples' pixels. `decode` marks an example it cannot use with `skip` (an index into SKIP_REASONS,
  + 1; 0: kept): no image, an undecodable one, one smaller than the resolution, or one the filters drop."""

  def __init__(self, data_config, spec, *, process_index=0, process_count=1):
    paths = shards.list_files(spec, 'data.files' if spec == data_config.files else 'data.eval_files')
    self.format = shards.file_format(paths, data_config.files_format)
    self.files = shards.host_share(paths, process_index, process_count)
    image_key, caption_key = data_config.files_image_key, data_config.files_caption_key
    shards.check_keys(self.files[0], self.format, image_key, caption_key)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # gs:// latency, not CPU, bounds this
      self.counts = list(pool.map(lambda p: shards.count(p, self.format), self.files))
    self.num_examples = int(sum(self.counts))
    if not self.num_examples:
      raise ValueError(f"data.files='{spec}': this host's {len(self.files)} files hold no examples.")
    self.keys = {'image': 'image', 'caption': 'caption'}
    self.image_shape = (None, None, 3)
    self._read = lambda path: shards.dataset(path, self.format, image_key, caption_key)
    self._resolution, self._filters = data_config.resolution, data_config.filters
    self._shuffle_block = data_config.shuffle_block

  def _stream(self, files, counts, start):
    """The records of `files` one after another, from the `start`-th: whole files before it are not opened."""
    ends = tf.cumsum(counts)
    first = tf.searchsorted(ends, tf.reshape(tf.cast(start, ends.dtype), [1]), side='right')[0]
    within = tf.cast(start, tf.int64) - tf.concat([[0], ends], 0)[first]
    return tf.data.Dataset.from_tensor_slices(files[first:]).flat_map(self._read).skip(within)

  def epoch(self, seed, epoch, start=0):
    seed = epoch_seed(seed, epoch)
    order = tf.random.experimental.stateless_shuffle(tf.range(len(self.files)), seed)
    files, counts = tf.gather(self.files, order), tf.gather(tf.constant(self.counts, tf.int64), order)
    start = tf.cast(start, tf.int64)
    block = start // self._shuffle_block
    records = _block_shuffle(self._stream(files, counts, block * self._shuffle_block), seed, self._shuffle_block,
                             first_block=block)
    return records.skip(start - block * self._shuffle_block)

  def ordered(self):
    return self._stream(tf.constant(self.files), tf.constant(self.counts, tf.int64), 0)

  def file_records(self, index):
    """The records of this host's file `index` in order (the latents stage writes one latent shard per file)."""
    return self._read(self.files[index])

  def decode(self, record):
    image, skip = tf.numpy_function(self._decode_image, [record[0], record[1]], (tf.uint8, tf.int32),
                                    stateful=False)
    return {'image': tf.ensure_shape(image, (None, None, 3)), 'caption': record[1],
            'skip': tf.ensure_shape(skip, ())}

  def _decode_image(self, data, caption):
    """(uint8 [H, W, 3], 0) for an image to keep; (a black image of the resolution, reason + 1) otherwise.
    JPEGs decode at the smallest power-of-two reduction still at least the resolution (PIL's draft mode)."""
    blank = np.zeros((self._resolution, self._resolution, 3), np.uint8)
    reject = lambda reason: (blank, np.int32(SKIP_REASONS.index(reason) + 1))
    if not data:
      return reject('no image')
    filters = self._filters
    length = len(caption.decode('utf-8', 'replace').strip())
    if length < filters.min_caption_length:
      return reject('no caption' if not length else 'filtered by caption length')
    if filters.max_caption_length and length > filters.max_caption_length:
      return reject('filtered by caption length')
    try:
      with PIL.Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if min(width, height) < self._resolution:
          return reject('smaller than data.resolution')
        if min(width, height) < filters.min_size:
          return reject('filtered by size')
        if filters.max_aspect_ratio and max(width, height) > filters.max_aspect_ratio * min(width, height):
          return reject('filtered by aspect ratio')
        scale = self._resolution / min(width, height)
        image.draft('RGB', (math.ceil(width * scale), math.ceil(height * scale)))
        return np.asarray(image.convert('RGB')), np.int32(0)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError):
      return reject('undecodable')


def _read_caption(image_path):
  txt = os.path.splitext(image_path)[0] + '.txt'
  return tf.io.gfile.GFile(txt).read().strip() if tf.io.gfile.exists(txt) else ''


def create_source(data_config, split, *, process_index=0, process_count=1):
  """The source named by `data_config`: `data.files` or `data.folder` when set, else the TFDS dataset
  `data.name`."""
  if data_config.control_folder and not data_config.folder:
    raise ValueError(f"data.control_folder='{data_config.control_folder}' pairs control images with the images "
                     'of data.folder; set data.folder too.')
  if data_config.files:
    if data_config.objects_key or data_config.segmentation_key:
      raise ValueError(f"data.files='{data_config.files}' holds images and captions only; layouts and "
                       'segmentation maps (data.objects_key, data.segmentation_key) need a TFDS dataset.')
    field = {data_config.train_split: 'files', data_config.eval_split: 'eval_files'}.get(split)
    if not field or not data_config[field]:
      raise ValueError(f"The '{split}' split of data.files: set data.eval_files to its files (data.files holds "
                       f"data.train_split='{data_config.train_split}'), or leave it out of latents.splits.")
    return ShardSource(data_config, data_config[field], process_index=process_index, process_count=process_count)
  if data_config.folder:
    if data_config.objects_key or data_config.segmentation_key:
      raise ValueError(f"data.folder='{data_config.folder}' holds images and captions only; layouts and "
                       'segmentation maps (data.objects_key, data.segmentation_key) need a TFDS dataset.')
    return FolderSource(data_config.folder, control_folder=data_config.control_folder,
                        process_index=process_index, process_count=process_count)
  return TfdsSource(
      data_config.name, split, data_dir=data_config.data_dir or None, image_key=data_config.image_key,
      caption_key=data_config.caption_key, label_key=data_config.label_key,
      objects_key=data_config.objects_key, segmentation_key=data_config.segmentation_key,
      process_index=process_index,
      process_count=process_count, shuffle_block=data_config.shuffle_block)
