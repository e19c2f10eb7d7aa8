"""The run's resolved config in `WORKDIR/config.json`, the refusal to mix incompatible runs in one workdir, and
the check that the workdir can be written before compute is spent."""

import json
import os
import shutil

from absl import logging
from etils import epath
import jax
import ml_collections

from latent_diffusion import files
from latent_diffusion import parallel

# Fields that fix what a workdir's checkpoints, latents and data order mean; changing any corrupts the run.
IDENTITY_FIELDS = ('seed', 'data', 'autoencoder.name', 'autoencoder.model', 'autoencoder.pretrained',
                   'autoencoder.batch_size', 'latents.dtype', 'latents.scale_factor', 'ldm.unet',
                   'ldm.conditioning', 'ldm.schedule', 'ldm.parameterization', 'ldm.batch_size',
                   'ldm.shuffle_window_shards')
# Fields under IDENTITY_FIELDS that may change between restarts (where to find files, how fast to read data).
MUTABLE_FIELDS = ('data.data_dir', 'data.prefetch', 'ldm.conditioning.vocab_file', 'ldm.conditioning.pretrained',
                  'ldm.unet.attention',
                  'ldm.unet.upcast_attention', 'ldm.unet.remat', 'ldm.unet.remat_policy', 'ldm.unet.dtype')
# Identity fields added after workdirs were made, with the value that reproduces those runs.
ADDED_FIELDS = {'autoencoder.model.norm_groups': 32, 'data.files': '', 'data.eval_files': '', 'data.files_format': '',
                'data.files_image_key': 'jpg', 'data.files_caption_key': 'txt', 'data.filters.min_size': 0,
                'data.filters.max_aspect_ratio': 0.0, 'data.filters.min_caption_length': 1,
                'data.filters.max_caption_length': 0}


def flatten(tree, prefix=''):
  """{'a': {'b': 1}} -> {'a.b': 1}, with lists made tuples so that JSON round trips compare equal."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(flatten(value, path + '.'))
    else:
      flat[path] = tuple(value) if isinstance(value, list) else value
  return flat


def _tuples(tree):
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  return tuple(_tuples(v) for v in tree) if isinstance(tree, list) else tree


def load_config(workdir):
  """The resolved config a workdir was run with (WORKDIR/config.json), e.g. to evaluate it from a notebook."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: is {workdir} a workdir of `python -m latent_diffusion.main`?')
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _is_identity(path):
  under = lambda prefixes: any(path == p or path.startswith(p + '.') for p in prefixes)
  return under(IDENTITY_FIELDS) and not under(MUTABLE_FIELDS)


def incompatible_fields(old, new):
  """The identity fields whose values differ between two config dicts: [(path, old value, new value)]. A field
  added since the old config was saved matches it when the new value is off ('', 0, False or ()) or the value
  of ADDED_FIELDS that reproduces the old runs."""
  old, new = flatten(old), flatten(new)
  added_off = lambda p: p not in old and (new[p] in ('', 0, ()) or ADDED_FIELDS.get(p, ()) == new[p])
  return [(p, old.get(p, '<absent>'), new.get(p, '<absent>')) for p in sorted(set(old) | set(new))
          if _is_identity(p) and old.get(p, '<absent>') != new.get(p, '<absent>') and not added_off(p)]


# Less free space than this on a local workdir's disk stops the run before any compute (checkpoints, latents).
MIN_FREE_BYTES = 1 << 30


def check_writable(workdir, min_free_bytes=MIN_FREE_BYTES):
  """A clear error, before compute is spent, for a workdir that cannot be written or whose disk is full."""
  if '://' not in str(workdir):
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
      raise ValueError(f'Only {free / 2**20:.0f} MiB free on the disk of --workdir={workdir} (at least '
                       f'{min_free_bytes / 2**20:.0f} MiB needed for checkpoints and latents); free space or '
                       'use a workdir on another disk.')
  probe = epath.Path(workdir) / f'.write_test.{jax.process_index()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except (OSError, PermissionError) as e:
    raise ValueError(f'--workdir={workdir} is not writable ({type(e).__name__}: {e}); fix its permissions or '
                     'choose another workdir.') from e


def prepare(config: ml_collections.ConfigDict, workdir):
  """Creates the workdir, refuses a config that differs from the saved one in identity fields, saves it."""
  check_writable(workdir)
  path = epath.Path(workdir) / 'config.json'
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}); restore it or use a new --workdir.') from e
    diffs = incompatible_fields(old, new)
    if diffs:
      lines = '\n'.join(f'  {p}: {o!r} (workdir) != {n!r} (now)' for p, o, n in diffs)
      raise ValueError(f'The workdir {workdir} was made with a different config, and these fields would corrupt '
                       f'the run:\n{lines}\nUse the same config (see {path}) or a new --workdir.')
    changed = sorted(p for p, v in flatten(new).items() if flatten(old).get(p) != v)
    if changed:
      logging.info('Config fields changed since the last run in %s: %s', workdir, ', '.join(changed))
  if parallel.is_main_process():
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(str(path), json.dumps(new, indent=2, sort_keys=True))
  parallel.sync('workdir.prepare')
