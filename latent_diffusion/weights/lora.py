"""UNet LoRA files of the PyTorch world <-> our adapters (`models/lora.py`).

Read: diffusers / PEFT (`unet.<module>.lora_A.weight`, `.lora_B.weight`, what `save_lora_weights` writes today),
the older diffusers names (`<module>.lora.down.weight`, `<attn>.processor.to_q_lora.down.weight`) and kohya /
A1111 (`lora_unet_<module, dots as _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; the module named as
diffusers or as the CompVis UNetModel names it). A module's scale is
alpha / rank, its alpha from the `.alpha` key, else from the PEFT config diffusers stores in the file's metadata
(`lora_adapter_metadata`: lora_alpha, alpha_pattern, use_rslora), else the rank (scale 1, as diffusers loads
such files). Write: the diffusers / PEFT names (the scale folded into lora_B, so no metadata is needed) or
kohya's (with the alpha).
"""

import collections
import json
import re

from etils import epath
import flax
import numpy as np

from latent_diffusion.models import lora
from latent_diffusion.weights import torch_convert
from latent_diffusion.weights import unet as weights_unet

# Key endings -> the part they hold; the longest match wins.
_PARTS = {'.lora_A.weight': 'down', '.lora.down.weight': 'down', '.lora_down.weight': 'down',
          '_lora.down.weight': 'down', '.lora_B.weight': 'up', '.lora.up.weight': 'up', '.lora_up.weight': 'up',
          '_lora.up.weight': 'up', '.alpha': 'alpha'}
_PROCESSOR = {'.processor.to_q': '.to_q', '.processor.to_k': '.to_k', '.processor.to_v': '.to_v',
              '.processor.to_out': '.to_out.0'}  # the attention processors' `to_q_lora.down.weight` names
FORMATS = ('diffusers', 'kohya')


def module_index(unet_params, unet_config):
  """{diffusers module name: our module path} of every module of the UNet that holds a kernel and has a diffusers
  counterpart (ours alone, such as the semantic models' segmentation_map, have none), and {kohya stem: diffusers
  name} for both kohya spellings: diffusers' module names and the CompVis UNetModel's (A1111-era files)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
  index, kohya = {}, {}
  for path in flat:
    if path[-1] == 'kernel' and path[0] != 'segmentation_map':
      name = weights_unet.diffusers_key(path, len(unet_config.channel_mult))
      index[name] = path[:-1]
      for spelling in (name, weights_unet.compvis_key(path, unet_config)):
        kohya[spelling.replace('.', '_')] = name
  return index, kohya


def _module_name(key, kohya_names):
  """A file key's (diffusers module name, part), or None for a key that is not an adapter's."""
  end = max((e for e in _PARTS if key.endswith(e)), key=len, default=None)
  if end is None:
    return None
  name = key[:-len(end)]
  if name.startswith('lora_unet_'):
    return kohya_names.get(name[len('lora_unet_'):], name), _PARTS[end]
  for prefix in ('unet.base_model.model.', 'unet.', 'base_model.model.'):
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  for old, new in _PROCESSOR.items():
    if name.endswith(old):
      name = name[:-len(old)] + new
  return name, _PARTS[end]


def _peft_config(path):
  """The UNet's PEFT LoraConfig fields that diffusers' save_lora_weights keeps in the file's metadata ({} when none)."""
  if not str(path).endswith('.safetensors'):
    return {}
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(path), 'np') as f:
    metadata = json.loads((f.metadata() or {}).get('lora_adapter_metadata', '{}'))
  return {k[len('unet.'):]: v for k, v in metadata.items() if k.startswith('unet.')}


def _scale(name, rank, alpha, peft):
  """alpha / rank of one module: the file's alpha, else PEFT's (its alpha_pattern as PEFT matches it), else 1."""
  if alpha is None and peft.get('lora_alpha') is not None:
    patterns = peft.get('alpha_pattern') or {}
    alpha = next((v for k, v in patterns.items() if re.match(rf'(.*\.)?({k})$', name)), peft['lora_alpha'])
    return float(alpha) / (rank**0.5 if peft.get('use_rslora') else rank)
  return 1.0 if alpha is None else float(np.asarray(alpha).reshape(())) / rank  # a scalar, 0-d or [1]


def read(path, unet_params, unet_config):
  """The adapters of a LoRA file as our tree ({module path: {'down', 'up'}}, down [in, r] or [kh, kw, in, r],
  up [r, out] with the module's scale folded in), for models/lora.merge. Keys of other models (a text encoder's
  `lora_te_*`, `text_encoder.*`) are refused by name."""
  state = torch_convert.read_state_dict(path)
  peft = _peft_config(path)
  index, kohya_names = module_index(unet_params, unet_config)
  kernels = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
  parts, unknown = collections.defaultdict(dict), []
  for key, value in state.items():
    found = _module_name(key, kohya_names)
    if found is None or found[0] not in index:
      unknown.append(key)
      continue
    parts[found[0]][found[1]] = value
  if unknown:
    raise ValueError(f'LoRA file {path}: {len(unknown)} tensors are not adapters of this UNet, e.g. {unknown[:3]} '
                     '(text-encoder adapters are not supported; check the file is for this architecture).')
  adapters = {}
  for name, p in parts.items():
    if 'down' not in p or 'up' not in p:
      raise ValueError(f'LoRA file {path}: {name} has only {sorted(p)}; an adapter needs its down and up weights.')
    down, up = p['down'], p['up']
    rank = down.shape[0]
    down = down.T if down.ndim == 2 else down.transpose(2, 3, 1, 0)  # [r, in(, kh, kw)] -> [(kh, kw,) in, r]
    up = up.reshape(up.shape[0], rank).T * _scale(name, rank, p.get('alpha'), peft)  # -> [r, out]
    shape = kernels[index[name] + ('kernel',)].shape
    if tuple(shape) != down.shape[:-1] + up.shape[-1:]:
      raise ValueError(f'LoRA file {path}: the adapter of {name} makes a kernel of {down.shape[:-1] + up.shape[-1:]}'
                       f', but the UNet\'s is {tuple(shape)}; check the file is for this architecture.')
    adapters[index[name]] = {'down': down, 'up': up}
  return flax.traverse_util.unflatten_dict(adapters)


def merge_files(unet_params, files, weights, unet_config):
  """The UNet params with the adapters of each LoRA file merged in at its weight (sampling.loras)."""
  for path, weight in zip(files, weights):
    unet_params = lora.merge(unet_params, read(path, unet_params, unet_config), weight)
  return unet_params


def write(path, adapters, scale, unet_config, fmt='diffusers'):
  """Writes an adapters tree trained at `scale` as a .safetensors file in `fmt`: 'diffusers' (PEFT names under
  `unet.`, what diffusers' `load_lora_weights` reads) or 'kohya'."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"LoRA format '{fmt}' is not one of {FORMATS}.")
  tensors = {}
  for module, adapter in lora.adapter_paths(adapters).items():
    down, up = np.asarray(adapter['down'], np.float32), np.asarray(adapter['up'], np.float32)
    rank = down.shape[-1]
    name = weights_unet.diffusers_key(module + ('kernel',), len(unet_config.channel_mult))
    torch_down = down.T if down.ndim == 2 else down.transpose(3, 2, 0, 1)  # -> [r, in(, kh, kw)]
    torch_up = up.T if down.ndim == 2 else up.T[:, :, None, None]  # -> [out, r(, 1, 1)]
    if fmt == 'diffusers':
      tensors[f'unet.{name}.lora_A.weight'] = torch_down
      tensors[f'unet.{name}.lora_B.weight'] = scale * torch_up
    else:
      stem = 'lora_unet_' + name.replace('.', '_')
      tensors.update({f'{stem}.lora_down.weight': torch_down, f'{stem}.lora_up.weight': torch_up,
                      f'{stem}.alpha': np.asarray(scale * rank, np.float32)})
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  save_file({k: np.array(v, np.float32, order='C') for k, v in tensors.items()}, str(path))  # 0-d stays 0-d
