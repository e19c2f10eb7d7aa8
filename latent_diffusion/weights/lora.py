"""LoRA files of the PyTorch world (a UNet's adapters, and a CLIP text encoder's) <-> our adapters
(`models/lora.py`).

Read: diffusers / PEFT (`unet.<module>.lora_A.weight`, `.lora_B.weight`, `text_encoder.text_model.<module>...`:
what `save_lora_weights` writes today), the older diffusers names (`<module>.lora.down.weight`,
`.lora_linear_layer.down.weight`, `<attn>.processor.to_q_lora.down.weight`, `self_attn.to_q_lora.down.weight`)
and kohya / A1111 (`lora_unet_<module, dots as _>.lora_down.weight`, `.lora_up.weight`, `.alpha`, the module
named as diffusers or as the CompVis UNetModel names it; `lora_te_text_model_<module>` for the text encoder). A
module's scale is alpha / rank, its alpha from the `.alpha` key, else from the PEFT config diffusers stores in
the file's metadata (`lora_adapter_metadata`: lora_alpha, alpha_pattern, use_rslora), else the rank (scale 1, as
diffusers loads such files). Write: the diffusers / PEFT names (the scale folded into lora_B, so no metadata is
needed) or kohya's (with the alpha).
"""

import collections
import json
import re

from etils import epath
import flax
import numpy as np
import safetensors
import safetensors.numpy

from latent_diffusion.models import lora
from latent_diffusion.weights import clip
from latent_diffusion.weights import torch_convert
from latent_diffusion.weights import unet as weights_unet

# Key endings -> the part they hold; the longest match wins.
_PARTS = {'.lora_A.weight': 'down', '.lora.down.weight': 'down', '.lora_down.weight': 'down',
          '_lora.down.weight': 'down', '.lora_linear_layer.down.weight': 'down', '.lora_B.weight': 'up',
          '.lora.up.weight': 'up', '.lora_up.weight': 'up', '_lora.up.weight': 'up',
          '.lora_linear_layer.up.weight': 'up', '.alpha': 'alpha'}
_PROCESSOR = {'.processor.to_q': '.to_q', '.processor.to_k': '.to_k', '.processor.to_v': '.to_v',
              '.processor.to_out': '.to_out.0', 'self_attn.to_q': 'self_attn.q_proj', 'self_attn.to_k':
              'self_attn.k_proj', 'self_attn.to_v': 'self_attn.v_proj', 'self_attn.to_out': 'self_attn.out_proj'}
_PREFIXES = {'unet': ('unet.base_model.model.', 'unet.', 'base_model.model.'),
             'text': ('text_encoder.base_model.model.', 'text_encoder.')}
_KOHYA = {'unet': 'lora_unet_', 'text': 'lora_te_'}
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
      index[name] = (path[:-1], None)
      for spelling in (name, weights_unet.compvis_key(path, unet_config)):
        kohya[spelling.replace('.', '_')] = name
  return index, kohya


def text_index(text_params):
  """{CLIP module name: (our module path, the projection's index in a fused kernel or None)} of a TextTransformer's
  layers, and {kohya stem: CLIP module name}."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(text_params))
  index, kohya = {}, {}
  for path in flat:
    if path[-1] == 'kernel' and lora.text_part(path[0]):
      names = clip.torch_key(path[:-1])
      for i, name in enumerate(names) if isinstance(names, tuple) else ((None, names),):
        index[name] = (path[:-1], i)
        for spelling in (name, 'text_model.' + name):  # transformers 5 names, and 4's (published files')
          kohya[spelling.replace('.', '_')] = name
  return index, kohya


def _module_name(key, kohya_names):
  """A file key's (model, module name, part): model 'unet' or 'text', the name as diffusers' UNet or CLIP's
  CLIPTextModel (without `text_model.`) calls the module; None for a key that is not an adapter's."""
  end = max((e for e in _PARTS if key.endswith(e)), key=len, default=None)
  if end is None:
    return None
  name = key[:-len(end)]
  for model, stem in _KOHYA.items():
    if name.startswith(stem):
      return model, kohya_names[model].get(name[len(stem):], name), _PARTS[end]
  model = 'text' if name.startswith('text_encoder.') else 'unet'
  name = next((name[len(p):] for p in _PREFIXES[model] if name.startswith(p)), name)
  name = name[len('text_model.'):] if model == 'text' and name.startswith('text_model.') else name
  for old, new in _PROCESSOR.items():
    if name.endswith(old):
      name = name[:-len(old)] + new
  return model, name, _PARTS[end]


def _peft_config(path, model):
  """The PEFT LoraConfig fields of a model that diffusers' save_lora_weights keeps in the file's metadata ({} when
  none)."""
  if not str(path).endswith('.safetensors'):
    return {}
  with safetensors.safe_open(str(path), 'np') as f:
    metadata = json.loads((f.metadata() or {}).get('lora_adapter_metadata', '{}'))
  prefix = {'unet': 'unet.', 'text': 'text_encoder.'}[model]
  return {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}


def _scale(name, rank, alpha, peft):
  """alpha / rank of one module: the file's alpha, else PEFT's (its alpha_pattern as PEFT matches it), else 1."""
  if alpha is None and peft.get('lora_alpha') is not None:
    patterns = peft.get('alpha_pattern') or {}
    alpha = next((v for k, v in patterns.items() if re.match(rf'(.*\.)?({k})$', name)), peft['lora_alpha'])
    return float(alpha) / (rank**0.5 if peft.get('use_rslora') else rank)
  return 1.0 if alpha is None else float(np.asarray(alpha).reshape(())) / rank  # a scalar, 0-d or [1]


def _ours(path, name, p, peft):
  """One file adapter's (down [(kh, kw,) in, r], up [r, out] with its scale folded in)."""
  if 'down' not in p or 'up' not in p:
    raise ValueError(f'LoRA file {path}: {name} has only {sorted(p)}; an adapter needs its down and up weights.')
  down, up = p['down'], p['up']
  rank = down.shape[0]
  down = down.T if down.ndim == 2 else down.transpose(2, 3, 1, 0)  # [r, in(, kh, kw)] -> [(kh, kw,) in, r]
  return down, up.reshape(up.shape[0], rank).T * _scale(name, rank, p.get('alpha'), peft)  # -> [r, out]


def _fused(projections, parts):
  """A fused kernel's adapter from some of its projections' {index: (down, up)}: down [p, in, r], up [p, r, out],
  every projection padded with zeros to the largest rank (a missing one all zeros: no change)."""
  rank = max(d.shape[-1] for d, _ in projections.values())
  any_down, any_up = next(iter(projections.values()))
  down = np.zeros((parts,) + any_down.shape[:-1] + (rank,), np.float32)
  up = np.zeros((parts, rank, any_up.shape[-1]), np.float32)
  for i, (d, u) in projections.items():
    down[i, ..., :d.shape[-1]], up[i, :u.shape[0]] = d, u
  return down, up


def read(path, unet_params, unet_config, text_params=None):
  """The adapters of a LoRA file as our trees (UNet adapters, text-encoder adapters: {module path: {'down',
  'up'}}, the module's scale folded into up), for models/lora.merge. Text-encoder adapters need `text_params`, a
  CLIP TextTransformer's; keys of other models are refused by name."""
  state = torch_convert.read_state_dict(path)
  indices = {'unet': module_index(unet_params, unet_config),
             'text': text_index(text_params) if text_params is not None else ({}, {})}
  parts, unknown = collections.defaultdict(dict), []
  for key, value in state.items():
    found = _module_name(key, {model: kohya for model, (_, kohya) in indices.items()})
    if found is None or found[1] not in indices[found[0]][0]:
      unknown.append(key)
      continue
    parts[found[:2]][found[2]] = value
  if unknown:
    raise ValueError(f'LoRA file {path}: {len(unknown)} tensors are not adapters of this model, e.g. {unknown[:3]} '
                     '(check the file is for this architecture; text-encoder adapters need the CLIP text encoder, '
                     "ldm.conditioning.kind='clip').")
  adapters, fused, names = {'unet': {}, 'text': {}}, collections.defaultdict(dict), {}
  for (model, name), p in parts.items():
    module, projection = indices[model][0][name]
    names[model, module] = name
    adapter = _ours(path, name, p, _peft_config(path, model))
    if projection is None:
      adapters[model][module] = adapter
    else:
      fused[module][projection] = adapter
  for module, projections in fused.items():
    adapters['text'][module] = _fused(projections, lora.FUSED[lora.text_part(module[-1])])
  trees = []
  for model, params in (('unet', unet_params), ('text', text_params)):
    kernels = flax.traverse_util.flatten_dict(flax.core.unfreeze(params)) if params is not None else {}
    for module, (down, up) in adapters[model].items():
      shape = tuple(kernels[module + ('kernel',)].shape)
      made = tuple(np.shape(lora.delta(down, up)))
      if shape != made:
        raise ValueError(f'LoRA file {path}: the adapter of {names[model, module]} makes a kernel of {made}, but '
                         f'the model\'s is {shape}; check the file is for this architecture.')
    trees.append(flax.traverse_util.unflatten_dict(
        {module: {'down': down, 'up': up} for module, (down, up) in adapters[model].items()}))
  return tuple(trees)


def merge_files(unet_params, files, weights, unet_config, text_params=None):
  """(UNet params, text-encoder params) with the adapters of each LoRA file merged in at its weight
  (sampling.loras)."""
  for path, weight in zip(files, weights):
    unet_adapters, text_adapters = read(path, unet_params, unet_config, text_params)
    unet_params = lora.merge(unet_params, unet_adapters, weight)
    if text_adapters:
      text_params = lora.merge(text_params, text_adapters, weight)
  return unet_params, text_params


def _torch_adapters(adapters, names):
  """{module name: (down [r, in(, kh, kw)], up [out, r(, 1, 1)])} in PyTorch's layout; a fused kernel's adapter
  is one per projection, named by `names(module path)`, a name or a tuple of them."""
  torch = {}
  for module, adapter in lora.adapter_paths(adapters).items():
    down, up = np.asarray(adapter['down'], np.float32), np.asarray(adapter['up'], np.float32)
    name = names(module)
    if isinstance(name, tuple):  # fused: [p, in, r], [p, r, out]
      torch.update({n: (down[i].T, up[i].T) for i, n in enumerate(name)})
    elif down.ndim == 2:
      torch[name] = (down.T, up.T)
    else:
      torch[name] = (down.transpose(3, 2, 0, 1), up.T[:, :, None, None])
  return torch


def _text_names(module):
  """The CLIPTextModel module name(s) of a TextTransformer module, as PEFT names them (under `text_model.`)."""
  names = clip.torch_key(module)
  return tuple(f'text_model.{n}' for n in names) if isinstance(names, tuple) else f'text_model.{names}'


def write(path, adapters, scale, unet_config, fmt='diffusers', text_adapters=None):
  """Writes the UNet's adapters (and a CLIP text encoder's) trained at `scale` as a .safetensors file in `fmt`:
  'diffusers' (PEFT names under `unet.` and `text_encoder.`, what diffusers' `load_lora_weights` reads) or
  'kohya'."""
  if fmt not in FORMATS:
    raise ValueError(f"LoRA format '{fmt}' is not one of {FORMATS}.")
  models = [('unet.', 'lora_unet_', _torch_adapters(
      adapters, lambda m: weights_unet.diffusers_key(m + ('kernel',), len(unet_config.channel_mult))))]
  if text_adapters:
    models.append(('text_encoder.', 'lora_te_', _torch_adapters(text_adapters, _text_names)))
  tensors = {}
  for prefix, kohya, modules in models:
    for name, (down, up) in modules.items():
      if fmt == 'diffusers':
        tensors.update({f'{prefix}{name}.lora_A.weight': down, f'{prefix}{name}.lora_B.weight': scale * up})
      else:
        stem = kohya + name.replace('.', '_')
        tensors.update({f'{stem}.lora_down.weight': down, f'{stem}.lora_up.weight': up,
                        f'{stem}.alpha': np.asarray(scale * down.shape[0], np.float32)})
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.array(v, np.float32, order='C') for k, v in tensors.items()}  # 0-d stays 0-d
  safetensors.numpy.save_file(tensors, str(path))
