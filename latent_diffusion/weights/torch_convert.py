"""What every PyTorch-weights converter shares: reading a state dict (safetensors without torch; .ckpt/.bin/.pth
with torch) and filling a Flax param tree from it by a per-model name map, in Flax's kernel layouts."""

import json

from absl import logging
from etils import epath
import flax
import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

_WEIGHT = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


def read_state_dict(path):
  """{name: float32 numpy array} from a .safetensors file (no torch needed) or a torch pickle (.ckpt, .bin, .pth,
  whose `state_dict` entry is used when present; needs the optional torch extra: pip install -e '.[torch]')."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'Weights file {path} not found.')
  if path.suffix == '.safetensors':
    tensors = safetensors.numpy.load_file(str(path))
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading {path} needs torch: pip install -e ".[torch]" (or convert the file to '
                        '.safetensors).') from e
    try:
      loaded = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception:  # pylint: disable=broad-except  (pickles of training checkpoints hold callback objects)
      logging.warning('%s holds more than tensors (a training checkpoint); loading it as a full pickle, which '
                      'runs code from the file: only do this for files you trust.', path)
      loaded = torch.load(str(path), map_location='cpu', weights_only=False)
    loaded = loaded.get('state_dict', loaded)
    tensors = {k: v.float().numpy() for k, v in loaded.items() if hasattr(v, 'numpy') and v.is_floating_point()}
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def find_model_dir(folder, subdir, filename):
  """`folder/subdir` or `folder` itself, whichever holds `filename`: a Stable Diffusion folder (unet/, vae/,
  text_encoder/, tokenizer/) or one model's own folder."""
  folder = epath.Path(folder)
  for directory in (folder / subdir, folder):
    if (directory / filename).exists():
      return directory
  raise FileNotFoundError(f'No {filename} in {folder / subdir} or {folder}: expected a Stable Diffusion folder '
                          f'(with {subdir}/) or the {subdir} folder itself, as save_pretrained writes them.')


def read_folder(directory, stem):
  """The weights of a Hugging Face model folder: `<stem>.safetensors`, its sharded `.index.json`, or `<stem>.bin`
  (stem `model` for transformers, `diffusion_pytorch_model` for diffusers)."""
  directory = epath.Path(directory)
  single, index, pickle = (directory / f'{stem}{s}' for s in ('.safetensors', '.safetensors.index.json', '.bin'))
  if single.exists():
    return read_state_dict(single)
  if index.exists():
    state = {}
    for name in sorted(set(read_json(index)['weight_map'].values())):
      state.update(read_state_dict(directory / name))
    return state
  if pickle.exists():
    return read_state_dict(pickle)
  raise FileNotFoundError(f'No weights in {directory}: expected {single.name}, {index.name} or {pickle.name}.')


def read_json(path):
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} not found.')
  return json.loads(path.read_text())


def check_config(section, expected, name, source):
  """Names every field of the config section `name` that differs from the architecture `source` was saved with."""
  wrong = {k: (section[k], v) for k, v in expected.items()
           if (tuple(section[k]) if isinstance(v, tuple) else section[k]) != v}
  if wrong:
    raise ValueError(f'{name} does not describe {source}: ' + ', '.join(
        f'{name}.{k}={have} should be {want}' for k, (have, want) in wrong.items()) + '. Set these in the config.')


def _to_flax_layout(array, target_ndim):
  """torch Linear [out, in] / Conv [out, in, kh, kw] -> Flax Dense [in, out] / Conv [kh, kw, in, out], across the
  two where they are the same map (a Linear as a 1x1 conv and back; a kernel-1 Conv1d [out, in, 1] as a Linear)."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 4:
    array = array.transpose(2, 3, 1, 0)
    return array[0, 0] if target_ndim == 2 else array
  if array.ndim == 2:
    return array.T[None, None] if target_ndim == 4 else array.T
  return array


def convert(state_dict, abstract_params, torch_key, *, source, ignore=()):
  """A Flax param tree shaped like `abstract_params` from `state_dict`.

  torch_key(path) -> for a param path of ours (a tuple of names ending in the param's), the state-dict name of
  its module (`.weight`/`.bias` is added for kernels, scales, embeddings and biases; other params map to a full
  name), or a tuple of such names whose tensors are concatenated along the output axis (fused q/k/v).
  Missing tensors, shape mismatches and tensors left unused (other than those starting with a prefix in
  `ignore`) are errors that name `source`.
  """
  used, problems = set(), []

  def fill(path, target):
    names = [p.key for p in path]
    modules = torch_key(tuple(names))
    keys = [f'{m}.{_WEIGHT[names[-1]]}' if names[-1] in _WEIGHT else m for m in (
        modules if isinstance(modules, tuple) else (modules,))]
    absent = [k for k in keys if k not in state_dict]
    if absent:
      problems.append(f'missing {absent[0]} (for {"/".join(names)})')
      return np.zeros(target.shape, np.float32)
    used.update(keys)
    parts = [_to_flax_layout(state_dict[k], len(target.shape)) if names[-1] == 'kernel' else state_dict[k]
             for k in keys]
    array = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if array.shape != tuple(target.shape):
      problems.append(f'{"/".join(names)} expects {tuple(target.shape)} but {keys[0]} gives {array.shape}')
    return array

  params = jax.tree_util.tree_map_with_path(fill, flax.core.unfreeze(nn.meta.unbox(abstract_params)))
  unused = sorted(k for k in state_dict if k not in used and not k.startswith(tuple(ignore)))
  if unused:
    problems.append(f'{len(unused)} tensors the configured model has no place for, e.g. {unused[:3]}')
  if problems:
    raise ValueError(f'{source} does not match the configured model: ' + '; '.join(problems[:6]) +
                     ('' if len(problems) <= 6 else f'; and {len(problems) - 6} more') +
                     '. Check that the config describes the same architecture as the checkpoint.')
  return params
