"""Our `ControlNet` from a diffusers `ControlNetModel` folder: its config.json checked against the UNet's and the
`ldm.controlnet` section, its module names (the UNet's for the copied blocks) mapped to ours."""

import jax
import jax.numpy as jnp

from latent_diffusion.weights import torch_convert
from latent_diffusion.weights import unet as weights_unet


def diffusers_key(path, num_levels):
  """Our ControlNet param path -> the ControlNetModel module name."""
  if path[0] == 'cond_embedding':
    name = path[1] if path[1] in ('conv_in', 'conv_out') else f'blocks.{path[1].split("_")[1]}'
    return f'controlnet_cond_embedding.{name}'
  if path[0].startswith('zero_conv_'):
    return f'controlnet_down_blocks.{path[0].split("_")[-1]}'
  if path[0] == 'middle_zero_conv':
    return 'controlnet_mid_block'
  return weights_unet.diffusers_key(path, num_levels)


def from_diffusers_config(config):
  """ControlNetModel config.json (dict) -> (our ldm.unet fields as `weights.unet.from_diffusers_config` gives
  them, the ldm.controlnet fields); raises for what ours cannot express."""
  if config.get('conditioning_channels', 3) != 3 or config.get('global_pool_conditions', False):
    raise ValueError('This ControlNetModel takes conditioning_channels='
                     f'{config.get("conditioning_channels", 3)}, global_pool_conditions='
                     f'{config.get("global_pool_conditions", False)}; ours reads 3-channel images, unpooled.')
  if config.get('controlnet_conditioning_channel_order', 'rgb') != 'rgb':
    raise ValueError('This ControlNetModel reads BGR control images; ours reads RGB.')
  up = ['CrossAttnUpBlock2D' if t == 'CrossAttnDownBlock2D' else 'UpBlock2D'
        for t in reversed(config['down_block_types'])]
  info = weights_unet.from_diffusers_config({**config, 'up_block_types': up, 'out_channels': config['in_channels']})
  return info, dict(embedding_channels=tuple(config.get('conditioning_embedding_out_channels') or (16, 32, 96, 256)))


def load(folder, abstract, unet_config, controlnet_config):
  """ControlNet params shaped like `abstract` from a diffusers ControlNetModel folder (or a pipeline folder's
  `controlnet/`), whose config.json must describe the `ldm.unet` and `ldm.controlnet` architecture."""
  directory = torch_convert.find_model_dir(folder, 'controlnet', 'config.json')
  info, fields = from_diffusers_config(torch_convert.read_json(directory / 'config.json'))
  ignored = ('dropout', 'upcast_attention') + (('num_heads',) if info['unet']['num_head_channels'] > 0 else ())
  torch_convert.check_config(unet_config, {k: v for k, v in info['unet'].items() if k not in ignored}, 'ldm.unet',
                             str(directory))
  torch_convert.check_config(controlnet_config, fields, 'ldm.controlnet', str(directory))
  return torch_convert.convert(torch_convert.read_folder(directory, 'diffusion_pytorch_model'), abstract,
                               lambda p: diffusers_key(p, len(unet_config.channel_mult)), source=str(directory))


def abstract_params(controlnet, in_channels, context_dim):
  """Param shapes of a ControlNet, boxed with their logical axes (no compute)."""
  size = 2 ** len(controlnet.channel_mult)
  factor = 2 ** (len(controlnet.embedding_channels) - 1)
  args = (jnp.zeros((1, size, size, in_channels)), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, size * factor, size * factor, 3)), jnp.zeros((1, 1, context_dim)) if context_dim else None)
  return jax.eval_shape(controlnet.init, jax.random.PRNGKey(0), *args)['params']
