"""The latent store: the frozen first stage's posterior moments (KL) or pre-quantisation latents (VQ) of every
example, with its conditioning, in `.npz` shards under `WORKDIR/latents/<split>/`, plus `metadata.json`.

Each host writes the shards of its own share of the split and commits each one, once written, in its own
index (`index-p000-NNNNN.json`: shard name -> examples), so a restart skips committed shards that still exist and
never trusts a shard cut short; no rename is needed (gs:// has none that is atomic). `metadata.json`, written last, lists every
host's shards. The store records which stage-1 checkpoint made it, and readers refuse a store made by another.
"""

import concurrent.futures
import json
import os
import time

from absl import logging
import jax
import ml_dtypes
import numpy as np
import tensorflow as tf

from latent_diffusion import files
from latent_diffusion import parallel

METADATA = 'metadata.json'
DTYPES = {'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}


def split_dir(workdir, split):
  return os.path.join(workdir, 'latents', split)


def shard_name(process, index):
  return f'shard-p{process:03d}-{index:05d}.npz'


def read_metadata(directory):
  path = os.path.join(directory, METADATA)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def check_source(metadata, autoencoder_step, directory):
  """Refuses a store that another stage-1 checkpoint made."""
  if metadata['autoencoder_step'] != autoencoder_step:
    raise ValueError(
        f'The latent store {directory} was made by the stage-1 checkpoint at step {metadata["autoencoder_step"]}, '
        f'but the configured autoencoder is at step {autoencoder_step}. Delete {directory} to re-encode, or '
        'use the stage-1 checkpoint that made it.')


def write_shard(directory, name, arrays):
  """The shard appears only when complete (on a local disk a temporary name, then rename)."""
  files.write_npz(os.path.join(directory, name), arrays)


def _commit_number(path):
  return int(path.rsplit('-', 1)[1].split('.')[0])


def _index_paths(directory, process):
  """Host `process`'s index files, oldest first (by commit number)."""
  return sorted(tf.io.gfile.glob(os.path.join(directory, f'index-p{process:03d}-*.json')), key=_commit_number)


def read_index(directory, process):
  """{shard name: examples} of the shards host `process` has committed: its newest index file."""
  paths = _index_paths(directory, process)
  if not paths:
    return {}
  with tf.io.gfile.GFile(paths[-1]) as f:
    return json.load(f)


def _commit(directory, process, index):
  """Records `index` in a new index file numbered one past the newest, never overwriting one (an object store
  replaces nothing in place; a rebuilt shard leaves the index's length as it was), then removes the older ones."""
  old = _index_paths(directory, process)
  number = _commit_number(old[-1]) + 1 if old else 1
  files.write_atomically(os.path.join(directory, f'index-p{process:03d}-{number:05d}.json'), json.dumps(index))
  for path in old:
    tf.io.gfile.remove(path)


def write_shards(directory, *, num_shards, encode_shard, dtype):
  """Writes this host's `num_shards` shards of a split, skipping those committed on every host;
  `encode_shard(index)` yields host-local dicts of arrays (`latent` plus conditioning) of shard `index`'s
  examples (every host calls it for the same index at once: encoding is a global computation). Returns
  (the names of all hosts' shards, their example counts)."""
  tf.io.gfile.makedirs(directory)
  process = jax.process_index()
  index = read_index(directory, process)
  for i in range(num_shards):
    name = shard_name(process, i)
    if parallel.every_process(name in index and tf.io.gfile.exists(os.path.join(directory, name))):
      logging.info('Latent shard %s/%s is complete; skipped.', directory, name)
      continue
    parts = [p for p in encode_shard(i) if len(p['latent'])]
    if not parts:
      raise ValueError(f'Latent shard {directory}/{name} would be empty: every example of its input was skipped.')
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for key, value in arrays.items():  # latents and concat conditions in the store's dtype
      if value.dtype.kind == 'f':
        value = value.astype(DTYPES[dtype])
        arrays[key] = value.view(np.uint16) if dtype == 'bfloat16' else value  # npz has no bfloat16
    write_shard(directory, name, arrays)
    index[name] = len(arrays['latent'])
    _commit(directory, process, index)
    logging.info('Wrote latent shard %s/%s (%d examples).', directory, name, index[name])
  parallel.sync('latent_store.write_shards')
  sizes = np.array([[index[shard_name(process, i)] for i in range(num_shards)]], np.int64)
  all_sizes = parallel.to_host(sizes) if jax.process_count() > 1 else sizes
  names = [shard_name(p, i) for p in range(jax.process_count()) for i in range(num_shards)]
  return names, [int(n) for n in np.asarray(all_sizes).reshape(-1)]


def write_metadata(directory, metadata):
  """Written last, by one host: its presence with every listed shard marks the split complete."""
  if parallel.is_main_process():
    files.write_atomically(os.path.join(directory, METADATA), json.dumps(metadata, indent=2))
  parallel.sync('latent_store.metadata')


def is_complete(directory):
  """Every shard that the metadata lists exists."""
  metadata = read_metadata(directory)
  return bool(metadata) and all(tf.io.gfile.exists(os.path.join(directory, n)) for n in metadata['shards'])


def read_shard(directory, name, dtype):
  """One shard as {key: array}, its latents (and concat conditions) as float32."""
  arrays = files.read_npz(os.path.join(directory, name))
  for key, value in arrays.items():
    if dtype == 'bfloat16' and value.dtype == np.uint16:
      arrays[key] = value.view(ml_dtypes.bfloat16).astype(np.float32)
    elif value.dtype.kind == 'f':
      arrays[key] = value.astype(np.float32)
  return arrays


def load(directory):
  """All examples of a complete store, in shard order: ({key: array}, metadata); latents as float32."""
  shards = Shards(directory)
  return shards.read_many(range(len(shards.sizes))), shards.metadata


def shard_sizes(metadata):
  """The number of examples in each of `metadata['shards']`: as recorded, or (stores written before sizes were)
  every host wrote `examples_per_shard` per shard of its equal share, the last shard of each host holding the
  rest."""
  if 'sizes' in metadata:
    return metadata['sizes']
  hosts = len({name.rsplit('-', 1)[0] for name in metadata['shards']})
  per_host, per_shard = metadata['count'] // hosts, metadata['examples_per_shard']
  return [min(per_shard, per_host - int(name.rsplit('-', 1)[1].split('.')[0]) * per_shard)
          for name in metadata['shards']]


class Shards:
  """A complete store read shard by shard: `metadata`, `sizes` (examples per shard), `read(index)` and
  `read_many(indices)`."""

  def __init__(self, directory):
    if not is_complete(directory):
      raise ValueError(f'The latent store {directory} is missing or incomplete; run the `latents` stage.')
    self.directory, self.metadata = directory, read_metadata(directory)
    self.sizes = shard_sizes(self.metadata)

  def read(self, index):
    return read_shard(self.directory, self.metadata['shards'][index], self.metadata['dtype'])

  def read_many(self, indices):
    """The shards `indices` as one {key: array}, in that order."""
    parts = [self.read(i) for i in indices]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def check_fits_in_memory(shards, available):
  """Refuses to hold a whole store (ldm.shuffle_window_shards=0) that would need more than `available` bytes of
  host memory (its latents as float32: twice a 16-bit store's shard files), before any compute."""
  first = os.path.join(shards.directory, shards.metadata['shards'][0])
  widen = 2 if shards.metadata['dtype'] in ('float16', 'bfloat16') else 1
  needed = tf.io.gfile.stat(first).length / max(shards.sizes[0], 1) * sum(shards.sizes) * widen
  if needed > available:
    raise ValueError(
        f'The latent store {shards.directory} ({sum(shards.sizes)} examples) needs about {needed / 2**30:.1f} GiB '
        f'of host memory to hold whole (ldm.shuffle_window_shards=0), more than the {available / 2**30:.1f} GiB '
        'allowed (half of this host\'s memory): stream it, e.g. --config.ldm.shuffle_window_shards=8.')


class HostShards:
  """Host `process`'s share of a store's shards: every `count`-th shard from its index."""

  def __init__(self, shards, process, count):
    if len(shards.sizes) < count:
      raise ValueError(f'The latent store has {len(shards.sizes)} shards, fewer than the {count} hosts that '
                       'stream it (ldm.shuffle_window_shards > 0): write more (latents.examples_per_shard).')
    self.shards, self.indices = shards, list(range(process, len(shards.sizes), count))
    self.sizes = [shards.sizes[i] for i in self.indices]

  def read(self, index):
    return self.shards.read(self.indices[index])

  read_many = Shards.read_many


class LatentBatches:
  """Endless host-local batches from a store's shards, in an order fixed by the seed alone; starting at step k
  gives the batches of an uninterrupted run.

  `window_shards=0` holds the whole store in memory: epoch e is the permutation `default_rng([seed, e])` of all
  examples; each global batch is the stream's next `global_batch_size` examples and each host takes its rows, so
  the batches do not depend on the number of hosts. N > 0 streams stores larger than memory: each host reads only
  its own shards (HostShards; its rows of a batch are its stream's next examples), visiting them in a
  seed-fixed order N at a time, each window permuted; two windows are in memory, the next read in the
  background while this one trains.
  """

  def __init__(self, shards, global_batch_size, *, seed, start_step=0, window_shards=0):
    if window_shards and jax.process_count() > 1:
      shards = HostShards(shards, jax.process_index(), jax.process_count())
    self.shards, self.sizes = shards, np.asarray(shards.sizes)
    self.num_examples = int(self.sizes.sum())
    self.window = min(window_shards or len(self.sizes), len(self.sizes))
    if global_batch_size % jax.process_count():
      raise ValueError(f'The global batch size {global_batch_size} is not divisible by the {jax.process_count()} '
                       'hosts.')
    local = global_batch_size // jax.process_count()
    if isinstance(shards, HostShards):
      self.global_batch_size, self.rows = local, slice(None)
    else:
      self.global_batch_size = global_batch_size
      self.rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    self.seed, self.position = seed, start_step * global_batch_size
    self._windows, self._order, self._loaded = {}, (None, None), {}
    self._reader = concurrent.futures.ThreadPoolExecutor(1)

  def _epoch_windows(self, epoch):
    """Epoch e's windows: [(shard indices, the seed of their permutation)]."""
    if epoch not in self._windows:
      count = len(self.sizes)
      if self.window == count:
        windows = [(tuple(range(count)), (self.seed, epoch))]
      else:
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(count).tolist()
        windows = [(tuple(order[i:i + self.window]), (self.seed, epoch, 2, i)) for i in range(0, count, self.window)]
      self._windows = {e: w for e, w in self._windows.items() if e >= epoch - 1}
      self._windows[epoch] = windows
    return self._windows[epoch]

  def _read(self, indices):
    """A future of the concatenated arrays of shards `indices`, read once and kept while in use."""
    if indices not in self._loaded:
      self._loaded[indices] = self._reader.submit(self._timed_read, indices)
    return self._loaded[indices]

  def _timed_read(self, indices):
    start = time.perf_counter()
    arrays = self.shards.read_many(indices)
    seconds = time.perf_counter() - start
    count = len(next(iter(arrays.values())))
    logging.info('Latent store: read %d shards, %d examples in %.2f s (%.0f examples/s).', len(indices), count,
                 seconds, count / max(seconds, 1e-9))
    return arrays

  def _locate(self, position):
    """(arrays, order, offset, size) of the window holding the stream's example `position`; the next window's
    read starts."""
    epoch, offset = divmod(position, self.num_examples)
    windows, start = self._epoch_windows(epoch), 0
    for i, (indices, seed) in enumerate(windows):
      size = int(self.sizes[list(indices)].sum())
      if offset < start + size:
        break
      start += size
    following = windows[i + 1][0] if i + 1 < len(windows) else self._epoch_windows(epoch + 1)[0][0]
    current = self._read(indices)
    self._read(following)
    self._loaded = {k: v for k, v in self._loaded.items() if k in (indices, following)}
    if self._order[0] != seed:
      self._order = (seed, np.random.default_rng(list(seed)).permutation(size))
    return current.result(), self._order[1], offset - start, size

  def __iter__(self):
    return self

  def __next__(self):
    parts, needed = [], self.global_batch_size
    while needed:
      arrays, order, offset, size = self._locate(self.position)
      take = min(needed, size - offset)
      rows = order[offset:offset + take]
      parts.append({k: v[rows] for k, v in arrays.items()})
      self.position, needed = self.position + take, needed - take
    return {k: np.concatenate([p[k] for p in parts])[self.rows] for k in parts[0]}
