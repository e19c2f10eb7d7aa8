"""Our `UNet` from PyTorch weights: the diffusers `UNet2DConditionModel` (config.json -> our `ldm.unet` fields, and
its module names) and the CompVis `openaimodel.UNetModel` of LDM / Stable Diffusion `.ckpt` files (module names;
the architecture comes from our config, as the reference's yaml gives it)."""

import re

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from latent_diffusion.models import unet as unet_lib
from latent_diffusion.weights import torch_convert

# Our ResBlock's layers -> diffusers ResnetBlock2D's and CompVis ResBlock's.
_RES_DIFFUSERS = {'in_norm': 'norm1', 'in_conv': 'conv1', 'emb_proj': 'time_emb_proj', 'out_norm': 'norm2',
                  'out_conv': 'conv2', 'skip': 'conv_shortcut'}
_RES_COMPVIS = {'in_norm': 'in_layers.0', 'in_conv': 'in_layers.2', 'emb_proj': 'emb_layers.1',
                'out_norm': 'out_layers.0', 'out_conv': 'out_layers.3', 'skip': 'skip_connection'}
_BLOCK = re.compile(r'(down|up|middle)_(\d+)(?:_(\d+))?(_transformer|_attention|_downsample|_upsample)?')


def _transformer_key(prefix, sub):
  """A SpatialTransformer's inner path -> its name; diffusers' Transformer2DModel and CompVis' agree."""
  if sub[0] in ('norm', 'proj_in', 'proj_out'):
    return f'{prefix}.{sub[0]}'
  block = f'{prefix}.transformer_blocks.{sub[0].split("_")[1]}'
  if sub[1] in ('attn1', 'attn2'):
    return f'{block}.{sub[1]}.{"to_out.0" if sub[2] == "to_out" else sub[2]}'
  return f'{block}.{ {"ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2"}.get(sub[1], sub[1])}'


def _block_key(path, prefix, res_names):
  """A ResBlock's, SpatialTransformer's or AttentionBlock's param path under a module named `prefix` (the last
  two: norm, qkv and proj_out, the reference's names)."""
  if path[0].endswith('_transformer'):
    return _transformer_key(prefix, path[1:-1])
  if path[0].endswith('_attention'):
    return f'{prefix}.{path[1]}'
  return f'{prefix}.{res_names[path[1]]}'


def diffusers_key(path, num_levels):
  """Our UNet param path -> the UNet2DConditionModel module name."""
  simple = {'time_embed_0': 'time_embedding.linear_1', 'time_embed_1': 'time_embedding.linear_2',
            'label_emb': 'class_embedding', 'conv_in': 'conv_in', 'out_norm': 'conv_norm_out', 'out_conv': 'conv_out'}
  if path[0] in simple:
    return simple[path[0]]
  part, level, index, suffix = _BLOCK.fullmatch(path[0]).groups()
  if part == 'middle':
    return _block_key(path, 'mid_block.attentions.0' if suffix else f'mid_block.resnets.{level}', _RES_DIFFUSERS)
  block = f'down_blocks.{level}' if part == 'down' else f'up_blocks.{num_levels - 1 - int(level)}'
  if suffix in ('_downsample', '_upsample'):
    return f'{block}.{suffix[1:]}rs.0.conv'
  return _block_key(path, f'{block}.{"attentions" if suffix else "resnets"}.{index}', _RES_DIFFUSERS)


def compvis_key(path, unet_config):
  """Our UNet param path -> the CompVis UNetModel module name (input_blocks / middle_block / output_blocks)."""
  simple = {'time_embed_0': 'time_embed.0', 'time_embed_1': 'time_embed.2', 'label_emb': 'label_emb',
            'conv_in': 'input_blocks.0.0', 'out_norm': 'out.0', 'out_conv': 'out.2',
            'segmentation_map': 'segmentation_map'}
  if path[0] in simple:
    return simple[path[0]]
  part, level, index, suffix = _BLOCK.fullmatch(path[0]).groups()
  if part == 'middle':
    return _block_key(path, f'middle_block.{1 if suffix else 2 * int(level)}', _RES_COMPVIS)
  blocks, level = unet_config.num_res_blocks + 1, int(level)  # res blocks and the resampler of one level
  if part == 'down':
    position = 1 + level * blocks + (blocks - 1 if suffix == '_downsample' else int(index))
    if suffix == '_downsample':
      return f'input_blocks.{position}.0.' + (_RES_COMPVIS[path[1]] if unet_config.resblock_updown else 'op')
    return _block_key(path, f'input_blocks.{position}.{1 if suffix else 0}', _RES_COMPVIS)
  position = (len(unet_config.channel_mult) - 1 - level) * blocks + (
      blocks - 1 if suffix == '_upsample' else int(index))
  if suffix == '_upsample':
    slot = 2 if 2**level in unet_config.attention_resolutions else 1  # after the ResBlock (and transformer)
    if unet_config.resblock_updown:
      return f'output_blocks.{position}.{slot}.{_RES_COMPVIS[path[1]]}'
    return f'output_blocks.{position}.{slot}.conv'
  return _block_key(path, f'output_blocks.{position}.{1 if suffix else 0}', _RES_COMPVIS)


# UNet2DConditionModel options our UNet has no counterpart for, with the only value it can take.
_FIXED = dict(center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, mid_block_type='UNetMidBlock2DCrossAttn',
              only_cross_attention=False, downsample_padding=1, mid_block_scale_factor=1, act_fn='silu',
              norm_num_groups=32, norm_eps=1e-5, encoder_hid_dim=None, dual_cross_attention=False,
              class_embed_type=None, addition_embed_type=None, resnet_skip_time_act=False,
              resnet_out_scale_factor=1.0, time_embedding_type='positional', time_embedding_dim=None,
              time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
              conv_out_kernel=3, attention_type='default', class_embeddings_concat=False, cross_attention_norm=None)


def _per_level(value, levels, name):
  values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
  if len(values) != levels:
    raise ValueError(f'UNet config: {name}={value} does not give one value per level ({levels}).')
  return values


def from_diffusers_config(config):
  """UNet2DConditionModel config.json (dict) -> {'unet': our ldm.unet fields, 'in_channels', 'out_channels',
  'context_dim', 'num_classes'}; raises for what our UNet cannot express, naming the option."""
  unsupported = {k: config[k] for k, v in _FIXED.items() if config.get(k, v) != v}
  channels = list(config['block_out_channels'])
  levels = len(channels)
  down, up = config['down_block_types'], config['up_block_types']
  attends = [t == 'CrossAttnDownBlock2D' for t in down]
  if any(t not in ('CrossAttnDownBlock2D', 'DownBlock2D') for t in down) or list(up) != [
      'CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attends)]:
    unsupported.update(down_block_types=down, up_block_types=up)
  if any(c % channels[0] for c in channels):
    unsupported['block_out_channels'] = channels
  depths = set(_per_level(config.get('transformer_layers_per_block', 1), levels, 'transformer_layers_per_block'))
  res_blocks = set(_per_level(config['layers_per_block'], levels, 'layers_per_block'))
  if len(depths) > 1 or len(res_blocks) > 1 or isinstance(config.get('cross_attention_dim'), (list, tuple)):
    unsupported.update(transformer_layers_per_block=config.get('transformer_layers_per_block'),
                       layers_per_block=config['layers_per_block'])
  if config.get('resnet_time_scale_shift', 'default') not in ('default', 'scale_shift'):
    unsupported['resnet_time_scale_shift'] = config['resnet_time_scale_shift']
  # diffusers' `attention_head_dim` holds head counts (a historical misnomer) unless num_attention_heads is set.
  heads = _per_level(config.get('num_attention_heads') or config.get('attention_head_dim', 8), levels, 'heads')
  used = [h for h, a in zip(heads, attends) if a] + [heads[-1]]  # the middle block uses the last level's
  widths = {c // h for c, h, a in zip(channels, heads, attends) if a} | {channels[-1] // heads[-1]}
  if len(set(used)) == 1:
    num_heads, num_head_channels = used[0], -1
  elif len(widths) == 1:
    num_heads, num_head_channels = 8, widths.pop()
  else:
    unsupported['attention_head_dim'] = heads
  if unsupported:
    raise ValueError(f'This UNet2DConditionModel uses options our UNet does not express: {unsupported}.')
  unet = dict(model_channels=channels[0], channel_mult=tuple(c // channels[0] for c in channels),
              num_res_blocks=res_blocks.pop(), attention_resolutions=tuple(2**l for l, a in enumerate(attends) if a),
              num_heads=num_heads, num_head_channels=num_head_channels, transformer_depth=depths.pop(),
              dropout=float(config.get('dropout', 0.0)),
              use_scale_shift_norm=config.get('resnet_time_scale_shift') == 'scale_shift', resblock_updown=False,
              upcast_attention=bool(config.get('upcast_attention', False)))
  return dict(unet=unet, in_channels=config['in_channels'], out_channels=config['out_channels'],
              context_dim=config['cross_attention_dim'], num_classes=config.get('num_class_embeds') or 0)


def abstract_params(model, in_channels, context_dim):
  """Param shapes of a UNet, boxed with their logical axes (no compute)."""
  size = 2 ** len(model.channel_mult)
  args = (jnp.zeros((1, size, size, in_channels)), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, 1, context_dim)) if context_dim else None, jnp.zeros((1,), jnp.int32))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)['params']


def _read_diffusers(folder):
  """(directory, config translation) of a diffusers UNet folder, or of a Stable Diffusion folder's `unet/`."""
  directory = torch_convert.find_model_dir(folder, 'unet', 'config.json')
  return directory, from_diffusers_config(torch_convert.read_json(directory / 'config.json'))


def _convert_diffusers(directory, abstract, num_levels):
  return torch_convert.convert(torch_convert.read_folder(directory, 'diffusion_pytorch_model'), abstract,
                               lambda p: diffusers_key(p, num_levels), source=str(directory))


def load_diffusers(folder):
  """(UNet, params, the config translation of `from_diffusers_config`), the UNet built from the folder's config."""
  directory, info = _read_diffusers(folder)
  model = unet_lib.UNet(out_channels=info['out_channels'], num_classes=info['num_classes'], **info['unet'])
  abstract = abstract_params(model, info['in_channels'], info['context_dim'])
  return model, _convert_diffusers(directory, abstract, len(model.channel_mult)), info


def convert_compvis(state_dict, abstract, unet_config, source):
  """Params shaped like `abstract` from a CompVis UNetModel state dict. In an LDM checkpoint (`model.diffusion_model.*`)
  the EMA copies are read when it keeps them (`model_ema.*`, named as the reference's LitEma does: without dots),
  since the reference samples with them, and a semantic model's SpatialRescaler map (`cond_stage_model.
  channel_mapper`) becomes our UNet's `segmentation_map`; other models in the file are not read."""
  prefix = 'model.diffusion_model.'
  names = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
  if names:
    ema_key = lambda name: 'model_ema.' + f'diffusion_model.{name}'.replace('.', '')
    ema = all(ema_key(name) in state_dict for name in names)
    if ema:
      logging.info('%s keeps EMA weights; converting those.', source)
    mapper = state_dict.get('cond_stage_model.channel_mapper.weight')
    state_dict = {name: state_dict[ema_key(name) if ema else key] for name, key in names.items()}
    if mapper is not None:
      state_dict['segmentation_map.weight'] = mapper
  return torch_convert.convert(state_dict, abstract, lambda p: compvis_key(p, unet_config), source=source)


def load(path, abstract, unet_config):
  """(params, state_dict): params shaped like `abstract` for the `ldm.unet` architecture from a diffusers folder
  (its config.json must describe the same architecture) or a CompVis LDM / Stable Diffusion checkpoint file
  (.ckpt, .safetensors), and that file's tensors (None for a folder), so its other models convert without a
  second read."""
  if not epath.Path(path).is_dir():
    state_dict = torch_convert.read_state_dict(path)
    return convert_compvis(state_dict, abstract, unet_config, str(path)), state_dict
  directory, info = _read_diffusers(path)
  ignored = ('dropout', 'upcast_attention') + (('num_heads',) if info['unet']['num_head_channels'] > 0 else ())
  torch_convert.check_config(unet_config, {k: v for k, v in info['unet'].items() if k not in ignored}, 'ldm.unet',
                             str(directory))
  return _convert_diffusers(directory, abstract, len(unet_config.channel_mult)), None
