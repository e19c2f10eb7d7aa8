"""Sharded image-text files as img2dataset writes them, local or gs://: file lists, per-host shares, readers.

Formats: WebDataset `.tar` (members `KEY.jpg`, `KEY.txt`, `KEY.json` per example), TFRecord (`tf.train.Example`
with image bytes and caption features), parquet (a column of image bytes and one of captions) and ArrayRecord
(`tf.train.Example`s as in TFRecord; local paths or a gcsfuse mount, as grain reads them). A reader
yields (image bytes, caption) pairs of strings in the file's order; an example without image bytes yields empty
bytes, which the decoder skips and counts.
"""

import json
import os
import re
import tarfile

from absl import logging
import numpy as np
import tensorflow as tf

FORMATS = ('tar', 'tfrecord', 'parquet', 'array_record')
_EXTENSIONS = {'.tar': 'tar', '.tfrecord': 'tfrecord', '.tfrecords': 'tfrecord', '.parquet': 'parquet',
               '.array_record': 'array_record', '.arrayrecord': 'array_record'}
_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')
_CHOICE = re.compile(r'\{([^{}]*,[^{}]*)\}')


def expand_braces(pattern):
  """`a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar (zero padding kept); `{x,y}` alternatives."""
  matches = [m for m in (_RANGE.search(pattern), _CHOICE.search(pattern)) if m]
  if not matches:
    return [pattern]
  match = min(matches, key=lambda m: m.start())  # the leftmost first: x/1, x/2, y/1, ... as a shell expands
  if match.re is _RANGE:
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith('0') else 0
    options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
  else:
    options = match.group(1).split(',')
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [p for option in options for p in expand_braces(head + option + tail)]


def list_files(spec, field='data.files'):
  """The sorted files of `data.files`: brace ranges, alternatives and globs, several patterns separated by
  spaces. Named files are checked against one listing of each folder (not one request per file)."""
  paths, listings = set(), {}
  for pattern in spec.split():
    for path in expand_braces(pattern):
      if any(c in path for c in '*?['):
        paths.update(tf.io.gfile.glob(path))
        continue
      folder, name = os.path.split(path)
      folder = folder or '.'
      if folder not in listings:
        listings[folder] = set(tf.io.gfile.listdir(folder)) if tf.io.gfile.isdir(folder) else set()
      if name in listings[folder]:
        paths.add(path)
  if not paths:
    raise ValueError(f"{field}='{spec}' matches no files; give a glob ('gs://bucket/laion/*.tar') or a brace "
                     "range ('gs://bucket/laion/{00000..41455}.tar') of existing files.")
  return sorted(paths)


def file_format(paths, configured=''):
  """`data.files_format`, or the format every path's extension names."""
  if configured:
    if configured not in FORMATS:
      raise ValueError(f"data.files_format='{configured}': choose one of {', '.join(FORMATS)} (or '' for the "
                       'extension).')
    return configured
  found = {_EXTENSIONS.get(os.path.splitext(p)[1].lower()) for p in paths}
  if len(found) != 1 or None in found:
    raise ValueError(f"data.files mixes or has unknown extensions ({sorted({os.path.splitext(p)[1] for p in paths})}); "
                     f"use one of {sorted(_EXTENSIONS)} or set data.files_format to one of {', '.join(FORMATS)}.")
  return found.pop()


def host_share(paths, process_index, process_count):
  """This host's files: every process_count-th file from its index, the same rule for any host count (files
  past the last full round are left out, so every host reads as many files)."""
  if len(paths) < process_count:
    raise ValueError(f'data.files has {len(paths)} files, fewer than the {process_count} hosts: write more, '
                     'smaller shards.')
  usable = len(paths) - len(paths) % process_count
  return paths[process_index:usable:process_count]


def _tar_examples(path, image_key, caption_key):
  """(image bytes, caption) per WebDataset sample of a tar file, grouped by the member names' key."""
  key, sample = None, {}
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(fileobj=f, mode='r|') as archive:
      for member in archive:
        if not member.isfile():
          continue
        name = os.path.basename(member.name)
        stem, _, extension = name.partition('.')
        if stem != key and key is not None:
          yield sample.get(image_key, b''), sample.get(caption_key, b'')
          sample = {}
        key = stem
        if extension in (image_key, caption_key):
          sample[extension] = archive.extractfile(member).read()
  except tarfile.ReadError as e:  # an empty or truncated file: what was read counts, the rest is skipped
    logging.warning('data.files: %s is not a complete tar file (%s); its remaining examples are skipped.', path, e)
  if key is not None:
    yield sample.get(image_key, b''), sample.get(caption_key, b'')


class _Seekable:
  """An open GFile as the file object pyarrow reads (it asks for `closed`, which GFile lacks)."""

  def __init__(self, f):
    self.closed = False
    self.read, self.seek, self.tell, self.size = f.read, f.seek, f.tell, f.size

  def seekable(self):
    return True

  def readable(self):
    return True


def _parquet_file(f):
  """A pyarrow ParquetFile over an open GFile (local or gs://), read in row groups."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top  (the `web` extra)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  return pq.ParquetFile(pa.PythonFile(_Seekable(f), mode='r'))


def _parquet_examples(path, image_key, caption_key):
  with tf.io.gfile.GFile(path, 'rb') as f:
    table = _parquet_file(f)
    for batch in table.iter_batches(batch_size=256, columns=[image_key, caption_key]):
      images, captions = batch.column(0).to_pylist(), batch.column(1).to_pylist()
      for image, caption in zip(images, captions):
        yield image or b'', (caption or '').encode() if isinstance(caption, str) else (caption or b'')


def _array_record_reader(path):
  """An ArrayRecordReader (the `web` extra); it reads local files only, so gs:// needs a gcsfuse mount."""
  if '://' in path:
    raise ValueError(f'data.files: ArrayRecord files are read from a local path; mount {path.split("://")[1]} '
                     'with gcsfuse (as MaxText does for grain) and name the mounted files.')
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  return array_record_module.ArrayRecordReader(path)


def _array_records(path):
  reader = _array_record_reader(path)
  try:
    for start in range(0, reader.num_records(), 256):
      yield from reader.read(list(range(start, min(start + 256, reader.num_records()))))
  finally:
    reader.close()


def _example_dataset(records, image_key, caption_key):
  """(image, caption) of serialized tf.train.Examples."""
  features = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=''),
              caption_key: tf.io.FixedLenFeature([], tf.string, default_value='')}

  def parse(record):
    example = tf.io.parse_single_example(record, features)
    return example[image_key], example[caption_key]
  return records.map(parse)


def _serialized(path, fmt):
  """The serialized tf.train.Examples of a TFRecord or ArrayRecord file."""
  if fmt == 'tfrecord':
    return tf.data.TFRecordDataset(path)
  return tf.data.Dataset.from_generator(lambda p: _array_records(p.decode()), args=(path,),
                                        output_signature=tf.TensorSpec([], tf.string))


def check_keys(path, fmt, image_key, caption_key):
  """A clear error when the first examples of `path` have no `image_key` or `caption_key` (naming the keys they
  have)."""
  if fmt == 'tar':
    with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(fileobj=f, mode='r|') as archive:
      members = [os.path.basename(m.name) for _, m in zip(range(16), archive)]
    present = sorted({m.partition('.')[2] for m in members}) if members else None
  elif fmt in ('tfrecord', 'array_record'):
    record = next(iter(_serialized(path, fmt).take(1)), None)
    present = sorted(tf.train.Example.FromString(record.numpy()).features.feature) if record is not None else None
  else:
    with tf.io.gfile.GFile(path, 'rb') as f:
      present = _parquet_file(f).schema_arrow.names
  for field, key in (('files_image_key', image_key), ('files_caption_key', caption_key)):
    if present is not None and key not in present:
      raise ValueError(f"data.files: the records of {path} have no key data.{field}='{key}'; their keys are "
                       f'{present}.')


def dataset(path, fmt, image_key, caption_key):
  """The (image bytes, caption) records of one file as a tf.data stream, in the file's order."""
  if fmt in ('tfrecord', 'array_record'):
    return _example_dataset(_serialized(path, fmt), image_key, caption_key)
  generator = {'tar': _tar_examples, 'parquet': _parquet_examples}[fmt]
  return tf.data.Dataset.from_generator(
      lambda p: generator(p.decode(), image_key, caption_key), args=(path,),
      output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string)))


def count(path, fmt):
  """Examples in one file: img2dataset's `<shard>_stats.json` ('successes') where it exists, the parquet
  footer or ArrayRecord index, else a pass over the records (tar headers only; TFRecord framing)."""
  stats = os.path.splitext(path)[0] + '_stats.json'
  if tf.io.gfile.exists(stats):
    with tf.io.gfile.GFile(stats) as f:
      return int(json.load(f)['successes'])
  if fmt == 'parquet':
    with tf.io.gfile.GFile(path, 'rb') as f:
      return _parquet_file(f).metadata.num_rows
  if fmt == 'array_record':
    reader = _array_record_reader(path)
    try:
      return reader.num_records()
    finally:
      reader.close()
  if fmt == 'tfrecord':
    return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
  keys = set()  # read as the stream reader reads a truncated file: the samples before the damage
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as archive:
      for member in archive:
        if member.isfile():
          keys.add(os.path.basename(member.name).partition('.')[0])
  except tarfile.ReadError:
    pass
  return len(keys)
