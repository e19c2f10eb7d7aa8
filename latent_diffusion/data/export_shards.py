r"""Writes a TFDS split as img2dataset writes a web dataset: numbered WebDataset tar, TFRecord, parquet (or
ArrayRecord) shards with `jpg` (or `png`) image bytes, a `txt` caption and the size, and each shard's
`_stats.json`. For trying
`data.files` on the built-in data (tests, the README) before a bucket of LAION shards exists:

  python -m latent_diffusion.data.export_shards --name=captioned_shapes/32 --split=train --format=tar \
      --num_shards=20 --output=/tmp/shapes/train
"""

import io
import json
import os
import tarfile

from absl import app
from absl import flags
import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds

from latent_diffusion.data import captioned_shapes  # pylint: disable=unused-import  (registers the builder)
from latent_diffusion.data import shards

flags.DEFINE_string('name', 'captioned_shapes/32', 'TFDS dataset.')
flags.DEFINE_string('data_dir', '', 'TFDS data_dir.')
flags.DEFINE_string('split', 'train', 'Split (slices such as train[:1000] work).')
flags.DEFINE_enum('format', 'tar', shards.FORMATS, 'Shard format.')
flags.DEFINE_integer('num_shards', 20, 'How many shards.')
flags.DEFINE_enum('image_format', 'jpg', ('jpg', 'png'), "Image encoding (img2dataset's default: jpg, quality 95).")
flags.DEFINE_string('output', None, 'Output folder (local or gs://).')
FLAGS = flags.FLAGS


def encode(image, image_format):
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format='JPEG' if image_format == 'jpg' else 'PNG', quality=95)
  return buffer.getvalue()


def _tar(path, samples, image_format):
  with tf.io.gfile.GFile(path, 'wb') as f, tarfile.open(fileobj=f, mode='w') as archive:
    for sample in samples:
      meta = {k: sample[k] for k in ('key', 'caption', 'width', 'height')}
      for extension, data in ((image_format, sample['image']), ('txt', sample['caption'].encode()),
                              ('json', json.dumps(meta).encode())):
        info = tarfile.TarInfo(f"{sample['key']}.{extension}")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def _examples(samples, image_format):
  """Serialized tf.train.Examples with img2dataset's feature names."""
  feature = lambda v: (tf.train.Feature(int64_list=tf.train.Int64List(value=[v])) if isinstance(v, int) else
                       tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])))
  for s in samples:
    yield tf.train.Example(features=tf.train.Features(feature={
        'key': feature(s['key'].encode()), image_format: feature(s['image']), 'txt': feature(s['caption'].encode()),
        'width': feature(s['width']), 'height': feature(s['height'])})).SerializeToString()


def _tfrecord(path, samples, image_format):
  with tf.io.TFRecordWriter(path) as writer:
    for record in _examples(samples, image_format):
      writer.write(record)


def _array_record(path, samples, image_format):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top  (the `web` extra)
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for record in _examples(samples, image_format):
    writer.write(record)
  writer.close()


def _parquet(path, samples, image_format):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top  (the `web` extra)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.table({'key': [s['key'] for s in samples], image_format: [s['image'] for s in samples],
                    'txt': [s['caption'] for s in samples], 'width': [s['width'] for s in samples],
                    'height': [s['height'] for s in samples]})
  buffer = io.BytesIO()
  pq.write_table(table, buffer)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())


WRITERS = {'tar': (_tar, '.tar'), 'tfrecord': (_tfrecord, '.tfrecord'), 'parquet': (_parquet, '.parquet'),
           'array_record': (_array_record, '.array_record')}


def samples(name, split, *, image_format='jpg', data_dir=None):
  """The examples of `split` of TFDS `name` as img2dataset's samples: key, encoded image, caption, size."""
  examples = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))
  return [{'key': f'{i:09d}', 'image': encode(e['image'], image_format), 'caption': e['caption'].decode(),
           'width': int(e['image'].shape[1]), 'height': int(e['image'].shape[0])} for i, e in enumerate(examples)]


def write(output, all_samples, *, fmt='tar', num_shards=20, image_format='jpg'):
  """`all_samples` as `num_shards` numbered shards (and their `_stats.json`) under `output`; their paths."""
  tf.io.gfile.makedirs(output)
  writer, extension = WRITERS[fmt]
  paths = []
  for index, part in enumerate(np.array_split(np.arange(len(all_samples)), num_shards)):
    path = os.path.join(output, f'{index:05d}{extension}')
    writer(path, [all_samples[j] for j in part], image_format)
    with tf.io.gfile.GFile(os.path.join(output, f'{index:05d}_stats.json'), 'w') as f:
      json.dump({'count': len(part), 'successes': len(part)}, f)
    paths.append(path)
  return paths


def export(name, split, output, *, fmt='tar', num_shards=20, image_format='jpg', data_dir=None):
  """Writes `split` of TFDS `name` as `num_shards` shards under `output`; returns their paths."""
  return write(output, samples(name, split, image_format=image_format, data_dir=data_dir), fmt=fmt,
               num_shards=num_shards, image_format=image_format)


def main(argv):
  del argv
  paths = export(FLAGS.name, FLAGS.split, FLAGS.output, fmt=FLAGS.format, num_shards=FLAGS.num_shards,
                 image_format=FLAGS.image_format, data_dir=FLAGS.data_dir or None)
  print(f'Wrote {len(paths)} {FLAGS.format} shards to {FLAGS.output}: data.files='
        f"'{FLAGS.output}/{{00000..{len(paths) - 1:05d}}}{WRITERS[FLAGS.format][1]}'")


if __name__ == '__main__':
  flags.mark_flag_as_required('output')
  app.run(main)
