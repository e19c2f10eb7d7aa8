"""Our first stage from PyTorch weights: diffusers `AutoencoderKL` folders (config.json -> our
`autoencoder.model` fields, and its module names) and CompVis `.ckpt` files of the LDM first-stage zoo
(kl-f4 ... vq-f16) or of whole LDM / Stable Diffusion checkpoints (`first_stage_model.*`)."""

import re

from etils import epath
import jax
import jax.numpy as jnp

from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.weights import torch_convert


def compvis_key(path):
  """Our param path -> the CompVis (taming / ldm `model.py`) module name: our names with dots for the indices."""
  if path == ('quantize', 'embedding'):
    return 'quantize.embedding'
  names = []
  for name in path[:-1]:
    name = re.sub(r'^(down|up)_(\d+)_(block|attn)_(\d+)$', r'\1.\2.\3.\4', name)
    name = re.sub(r'^(down|up)_(\d+)_(downsample|upsample)$', r'\1.\2.\3', name)
    names.append(re.sub(r'^mid_(block_1|attn_1|block_2)$', r'mid.\1', name))
  return '.'.join(names)


_DIFFUSERS_INNER = {'nin_shortcut': 'conv_shortcut', 'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v',
                    'proj_out': 'to_out.0'}
_DIFFUSERS_MIDDLE = {'mid_block_1': 'mid_block.resnets.0', 'mid_attn_1': 'mid_block.attentions.0',
                     'mid_block_2': 'mid_block.resnets.1', 'norm_out': 'conv_norm_out'}


def diffusers_key(path, num_levels):
  """Our param path -> the diffusers AutoencoderKL module name (decoder levels count from the bottom)."""
  if len(path) == 2:  # quant_conv, post_quant_conv, quantize/embedding
    return 'quantize.embedding' if path[0] == 'quantize' else path[0]
  part, name, inner = path[0], path[1], [_DIFFUSERS_INNER.get(n, n) for n in path[2:-1]]
  level_name = lambda direction, level: f'{direction}_blocks.' + str(
      int(level) if direction == 'down' else num_levels - 1 - int(level))
  block = re.fullmatch(r'(down|up)_(\d+)_(block|attn)_(\d+)', name)
  resample = re.fullmatch(r'(down|up)_(\d+)_(downsample|upsample)', name)
  if block:
    name = f'{level_name(block[1], block[2])}.{"resnets" if block[3] == "block" else "attentions"}.{block[4]}'
  elif resample:
    name = f'{level_name(resample[1], resample[2])}.{resample[3]}rs.0'
  else:
    name = _DIFFUSERS_MIDDLE.get(name, name)
  return '.'.join([part, name] + inner)


# Names of attention tensors in diffusers checkpoints saved before diffusers 0.14.
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}

_FIXED = dict(in_channels=3, out_channels=3, act_fn='silu', use_quant_conv=True,
              use_post_quant_conv=True, shift_factor=None, norm_type='group')


def from_diffusers_config(config):
  """AutoencoderKL or VQModel config.json (dict) -> {'model': our autoencoder.model fields, 'scale_factor'}."""
  unsupported = {k: config[k] for k, v in _FIXED.items() if config.get(k, v) != v}
  channels = list(config['block_out_channels'])
  if any(t != 'DownEncoderBlock2D' for t in config['down_block_types']) or any(
      t != 'UpDecoderBlock2D' for t in config['up_block_types']) or any(c % channels[0] for c in channels):
    unsupported.update({k: config[k] for k in ('down_block_types', 'up_block_types', 'block_out_channels')})
  if unsupported:
    raise ValueError(f'This AutoencoderKL uses options our autoencoder does not express: {unsupported}.')
  model = dict(kind='kl', ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
               num_res_blocks=config['layers_per_block'], attn_resolutions=(), z_channels=config['latent_channels'],
               embed_dim=config['latent_channels'], norm_groups=config.get('norm_num_groups', 32),
               mid_attention=config.get('mid_block_add_attention', True))
  if config.get('_class_name') == 'VQModel':
    model.update(kind='vq', embed_dim=config.get('vq_embed_dim') or config['latent_channels'],
                 n_embed=config['num_vq_embeddings'])
  return dict(model=model, scale_factor=config.get('scaling_factor', 0.18215))


def abstract_params(model):
  """Param shapes of a first stage, boxed with their logical axes (no compute)."""
  size = 2 ** len(model.ch_mult)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                        jax.random.PRNGKey(0))['params']


def load_diffusers(folder, model_config):
  """(params, scale factor) for `autoencoder.model` from a diffusers AutoencoderKL or VQModel folder (or a Stable
  Diffusion folder holding one in `vae/`); the config's architecture must match the folder's config.json."""
  directory = torch_convert.find_model_dir(folder, 'vae', 'config.json')
  info = from_diffusers_config(torch_convert.read_json(directory / 'config.json'))
  torch_convert.check_config(model_config, info['model'], 'autoencoder.model', str(directory))
  model = autoencoder_lib.create_autoencoder(model_config)
  state_dict = {re.sub(r'\.(query|key|value|proj_attn)\.', lambda m: f'.{_LEGACY_ATTENTION[m.group(1)]}.', k): v
                for k, v in torch_convert.read_folder(directory, 'diffusion_pytorch_model').items()}
  levels = len(model.ch_mult)
  params = torch_convert.convert(state_dict, abstract_params(model), lambda p: diffusers_key(p, levels),
                                 source=str(directory))
  return params, info['scale_factor']


def convert_compvis(state_dict, model_config, source):
  """Params for `autoencoder.model` from a CompVis first-stage state dict: a zoo checkpoint (its `loss.*`
  discriminator and LPIPS are not read) or an LDM checkpoint's `first_stage_model.*`."""
  prefix = 'first_stage_model.'
  if any(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  model = autoencoder_lib.create_autoencoder(model_config)
  return torch_convert.convert(state_dict, abstract_params(model), compvis_key, source=source, ignore=('loss.',))


def load(path, model_config):
  """Params for `autoencoder.model` from a diffusers folder or a CompVis checkpoint file (`autoencoder.pretrained`)."""
  if epath.Path(path).is_dir():
    return load_diffusers(path, model_config)[0]
  return convert_compvis(torch_convert.read_state_dict(path), model_config, str(path))
