r"""Input rates on this host: images/s through the train iterator (read, JPEG decode, resize to 256 px, batch)
from each sharded format, beside a TensorFlow-native decode of the same bytes and (if installed) grain over the
same ArrayRecord files; then latents/s from a streamed latent store and the reader's peak RSS at two store sizes.

  python benchmarks/input_pipeline.py [--images=1024 --store_shards=160]
grain is not a dependency: `pip install grain==0.2.18` to add its row.
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from latent_diffusion import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.data import export_shards  # pylint: disable=wrong-import-position
from latent_diffusion.data import input_pipeline  # pylint: disable=wrong-import-position
from latent_diffusion.data import latent_store  # pylint: disable=wrong-import-position

RESOLUTION, BATCH = 256, 32
EXTENSIONS = {'tar': 'tar', 'tfrecord': 'tfrecord', 'parquet': 'parquet', 'array_record': 'array_record'}


def synthetic_samples(count, rng):
  """LAION-like JPEGs (quality 95, 512x384 and 384x512, smooth colour fields with detail) and captions."""
  samples = []
  for i in range(count):
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    image = np.asarray(PIL.Image.fromarray(low).resize((512, 384), PIL.Image.BICUBIC), np.float32)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    if i % 2:
      image = image.transpose(1, 0, 2)
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format='JPEG', quality=95)
    samples.append({'key': f'{i:09d}', 'image': buffer.getvalue(), 'caption': f'a synthetic photo number {i}',
                    'width': image.shape[1], 'height': image.shape[0]})
  return samples


def images_per_second(batches, count):
  next(batches)  # warm-up: the first files opened, the pools started
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  return count * BATCH / (time.perf_counter() - start)


def ours(folder, fmt, num_batches):
  files = f'{folder}/{fmt}/*.{EXTENSIONS[fmt]}'
  config = config_lib.data('web', RESOLUTION, files=files, shuffle_block=256, prefetch=4)
  return images_per_second(input_pipeline.train_iterator(config, BATCH, seed=0), num_batches)


def tf_native(folder, num_batches):
  """The reference: TFRecord -> tf.io.decode_jpeg (full size) -> the same crop and area resize, all in TF."""
  features = {'jpg': tf.io.FixedLenFeature([], tf.string), 'txt': tf.io.FixedLenFeature([], tf.string)}

  def process(record):
    example = tf.io.parse_single_example(record, features)
    return {'image': input_pipeline.preprocess(tf.io.decode_jpeg(example['jpg'], channels=3), RESOLUTION),
            'caption': example['txt']}
  ds = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(f'{folder}/tfrecord/*.tfrecord'))).repeat()
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(4)
  return images_per_second(ds.as_numpy_iterator(), num_batches)


def grain_array_record(folder, num_batches):
  """grain 0.2's MapDataset over the same ArrayRecord files: shuffle, PIL decode (draft) + resize, threads."""
  import grain.python as grain  # pylint: disable=g-import-not-at-top

  def decode(record):
    example = tf.train.Example.FromString(record).features.feature
    with PIL.Image.open(io.BytesIO(example['jpg'].bytes_list.value[0])) as image:
      image.draft('RGB', (RESOLUTION, RESOLUTION))
      image = image.convert('RGB')
      side = min(image.size)
      left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
      image = image.crop((left, top, left + side, top + side)).resize((RESOLUTION, RESOLUTION), PIL.Image.BOX)
    return {'image': np.asarray(image, np.float32) / 127.5 - 1, 'caption': example['txt'].bytes_list.value[0]}
  source = grain.ArrayRecordDataSource(sorted(tf.io.gfile.glob(f'{folder}/array_record/*.array_record')))
  ds = grain.MapDataset.source(source).shuffle(seed=0).repeat().map(decode).batch(BATCH)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=16, prefetch_buffer_size=256))
  return images_per_second(iter(ds), num_batches)


def _peak_rss_reset():
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets VmHWM, the peak resident set


def _rss(field):
  """VmRSS (resident now) or VmHWM (the peak since the last reset), in bytes."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def write_store(directory, num_shards, per_shard, rng):
  """A store of float16 32x32x4 latents (the KL-f8 first stage at 256 px) with captions."""
  def encode_shard(index):
    latent = rng.normal(size=(per_shard, 32, 32, 4)).astype(np.float32)
    yield {'latent': latent, 'caption': np.array([f'caption {index} {i}'.encode() for i in range(per_shard)])}
  names, sizes = latent_store.write_shards(directory, num_shards=num_shards, encode_shard=encode_shard,
                                           dtype='float16')
  latent_store.write_metadata(directory, {'shards': names, 'sizes': sizes, 'dtype': 'float16',
                                          'autoencoder_step': 0, 'count': sum(sizes)})
  return sum(os.path.getsize(os.path.join(directory, n)) for n in names)


def store_rate(directory, batch, window):
  """Latents/s over one epoch of the streamed store; the process's RSS before it and its peak during it."""
  shards = latent_store.Shards(directory)
  batches = latent_store.LatentBatches(shards, batch, seed=0, window_shards=window)
  steps = sum(shards.sizes) // batch
  next(batches)
  _peak_rss_reset()
  before = _rss('VmRSS')
  start = time.perf_counter()
  for _ in range(steps - 1):
    next(batches)
  seconds = time.perf_counter() - start
  return (steps - 1) * batch / seconds, before, _rss('VmHWM')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=1024)
  parser.add_argument('--batches', type=int, default=24)
  parser.add_argument('--store_shards', type=int, default=160)
  parser.add_argument('--per_shard', type=int, default=2048)
  parser.add_argument('--window', type=int, default=2)
  parser.add_argument('--ldm_batch', type=int, default=256)
  args = parser.parse_args()
  tf.config.set_visible_devices([], 'GPU')
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as folder:
    samples = synthetic_samples(args.images, rng)
    for fmt in EXTENSIONS:
      export_shards.write(f'{folder}/{fmt}', samples, fmt=fmt, num_shards=8)
    print(f'{os.cpu_count()} CPU cores; {args.images} JPEGs of 512x384 / 384x512 (q95, '
          f'{np.mean([len(s["image"]) for s in samples]) / 1024:.0f} KiB), to {RESOLUTION} px, batches of {BATCH}')
    reference = tf_native(folder, args.batches)
    rows = [('TFRecord, tf.io.decode_jpeg in TF (reference)', reference)]
    rows += [(f'ours: {fmt}', ours(folder, fmt, args.batches)) for fmt in EXTENSIONS]
    try:
      rows.append(('grain 0.2.18: ArrayRecord, PIL, 16 threads', grain_array_record(folder, args.batches)))
    except ImportError:
      print('(grain is not installed: no grain row)')
    print(f'{"pipeline":48s} {"images/s":>9s} {"per core":>9s} {"vs reference":>12s}')
    for name, rate in rows:
      print(f'{name:48s} {rate:9.1f} {rate / os.cpu_count():9.1f} {rate / reference:11.2f}x')

    print(f'\nLatent store (float16 32x32x4 + captions, {args.per_shard} per shard, window of {args.window} '
          f'shards, batches of {args.ldm_batch}):')
    print(f'{"store":>22s} {"latents/s":>10s} {"RSS before":>11s} {"peak RSS":>9s}')
    for shards in (args.store_shards // 4, args.store_shards):
      directory = f'{folder}/store{shards}'
      size = write_store(directory, shards, args.per_shard, rng)
      rate, before, peak = store_rate(directory, args.ldm_batch, args.window)
      print(f'{shards:4d} shards, {size / 2**20:6.0f} MiB {rate:10.0f} {before / 2**20:7.0f} MiB {peak / 2**20:5.0f} MiB')
      tf.io.gfile.rmtree(directory)


if __name__ == '__main__':
  main()
