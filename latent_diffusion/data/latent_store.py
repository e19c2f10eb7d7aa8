"""The latent store: the frozen first stage's posterior moments (KL) or pre-quantisation latents (VQ) of every
example, with its conditioning, in `.npz` shards under `WORKDIR/latents/<split>/`, plus `metadata.json`.

Each host writes the shards of its own share of the split; a shard is written under a temporary name and
renamed when complete, so a restart skips complete shards and a reader never sees a partial one. The store
records which stage-1 checkpoint made it, and readers refuse a store made by another.
"""

import concurrent.futures
import json
import math
import os
import zipfile

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
  """The shard appears only when complete (temporary name, then rename)."""
  files.write_npz(os.path.join(directory, name), arrays)


def _shard_complete(directory, name):
  """A shard counts only if it exists and opens as a complete npz."""
  path = os.path.join(directory, name)
  if not tf.io.gfile.exists(path):
    return False
  try:
    files.read_npz(path)
    return True
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('Latent shard %s is unreadable (%s); it will be rewritten.', path, e)
    return False


def _all_hosts(flag):
  """True only if `flag` holds on every host (so that hosts skip the same shards, in lockstep)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(parallel.to_host(np.array([flag]))))


def write_shards(directory, *, num_examples, examples_per_shard, encode_batches, dtype):
  """Writes this host's shards of a split, skipping those complete on every host; `encode_batches(start,
  count)` yields host-local dicts of arrays (`latent` plus conditioning) for examples [start, start + count)
  of this host's share. Returns the names of all hosts' shards."""
  tf.io.gfile.makedirs(directory)
  num_shards = math.ceil(num_examples / examples_per_shard)
  for index in range(num_shards):
    name = shard_name(jax.process_index(), index)
    if _all_hosts(_shard_complete(directory, name)):
      logging.info('Latent shard %s/%s is complete; skipped.', directory, name)
      continue
    start = index * examples_per_shard
    count = min(examples_per_shard, num_examples - start)
    parts = list(encode_batches(start, count))
    arrays = {k: np.concatenate([p[k] for p in parts])[:count] for k in parts[0]}
    for key, value in arrays.items():  # latents and concat conditions in the store's dtype
      if value.dtype.kind == 'f':
        value = value.astype(DTYPES[dtype])
        arrays[key] = value.view(np.uint16) if dtype == 'bfloat16' else value  # npz has no bfloat16
    write_shard(directory, name, arrays)
    logging.info('Wrote latent shard %s/%s (%d examples).', directory, name, count)
  parallel.sync('latent_store.write_shards')
  return sorted(shard_name(p, i) for p in range(jax.process_count()) for i in range(num_shards))


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
  """The number of examples in each of `metadata['shards']`: every host wrote `examples_per_shard` per shard of
  its equal share, the last shard of each host holding the rest."""
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


class LatentBatches:
  """Endless host-local batches from a store's shards, in an order fixed by the seed alone; each global batch is
  the stream's next `global_batch_size` examples, and each host takes its rows of it. So the global batches do
  not depend on the number of hosts, and starting at step k gives the batches of an uninterrupted run.

  `window_shards=0` holds the whole store in memory: epoch e is the permutation `default_rng([seed, e])` of all
  examples. N > 0 streams stores larger than memory: epoch e visits the shards in a seed-fixed order, N at a time,
  each window permuted; two windows are in memory, the next read in the background while this one trains.
  """

  def __init__(self, shards, global_batch_size, *, seed, start_step=0, window_shards=0):
    self.shards, self.sizes = shards, np.asarray(shards.sizes)
    self.num_examples = int(self.sizes.sum())
    self.window = min(window_shards or len(self.sizes), len(self.sizes))
    if global_batch_size % jax.process_count():
      raise ValueError(f'The global batch size {global_batch_size} is not divisible by the {jax.process_count()} '
                       'hosts.')
    self.global_batch_size = global_batch_size
    local = global_batch_size // jax.process_count()
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
      self._loaded[indices] = self._reader.submit(self.shards.read_many, indices)
    return self._loaded[indices]

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
