"""ControlNet (Zhang et al. 2023): a trainable copy of the `UNet`'s input and middle blocks that reads a control
image (a segmentation map, edges) and returns, through zero-initialised 1x1 convolutions, one residual per skip
and one for the middle block, which the frozen UNet adds to its own (`UNet(..., controls=...)`). The layout is
diffusers' `ControlNetModel`, so its published weights load (`weights/controlnet.py`).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models import layers
from latent_diffusion.models import unet as unet_lib

KINDS = ('', 'segmentation', 'edges', 'image')  # ldm.controlnet.kind
# The stored array each kind's control image is drawn from: a class-id map, or the control image itself.
STORED = {'segmentation': 'segmentation', 'edges': 'segmentation', 'image': 'control'}
zeros = nn.initializers.zeros


class ControlEmbedding(nn.Module):
  """The control image [B, H, W, c] -> [B, H / 2^(n-1), W / 2^(n-1), out_channels]: conv-SiLU, then per channel
  step a conv-SiLU and a stride-2 conv-SiLU, then a zero-initialised conv (so training starts at the base)."""
  out_channels: int
  channels: Sequence[int] = (16, 32, 96, 256)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    conv = lambda features, name, **kw: layers.conv(features, name=name, dtype=self.dtype, **kw)
    h = nn.silu(conv(self.channels[0], 'conv_in')(image.astype(self.dtype)))
    for i, (width, next_width) in enumerate(zip(self.channels[:-1], self.channels[1:])):
      h = nn.silu(conv(width, f'block_{2 * i}')(h))
      h = nn.silu(conv(next_width, f'block_{2 * i + 1}', strides=2)(h))
    return conv(self.out_channels, 'conv_out', kernel_init=zeros)(h)


class ControlNet(unet_lib.UNet):
  """The residuals [one per skip of the UNet, then the middle's] for x_t, t, the control image and the context.
  Its time embedding, input and middle blocks have the UNet's param names, so it starts as a copy of them."""
  embedding_channels: Sequence[int] = (16, 32, 96, 256)

  @nn.compact
  def __call__(self, x, t, control, context=None, y=None, deterministic=True):
    emb = self.embed(t, y)
    hint = ControlEmbedding(self.model_channels, self.embedding_channels, self.dtype, name='cond_embedding')(control)
    h, skips = self.encode(x, emb, context, deterministic, added=hint)
    zero_conv = lambda y, name: layers.conv(y.shape[-1], 1, padding=0, kernel_init=zeros, name=name,
                                            dtype=self.dtype)(y)
    return [zero_conv(s, f'zero_conv_{i}') for i, s in enumerate(skips)] + [zero_conv(h, 'middle_zero_conv')]


def create(unet, controlnet_config):
  """The ControlNet of a `UNet` (its architecture) for the `ldm.controlnet` section."""
  fields = {f: getattr(unet, f) for f in unet.__dataclass_fields__ if f not in ('parent', 'name')}
  return ControlNet(**fields, embedding_channels=tuple(controlnet_config.embedding_channels))


def image_size(controlnet, latent_size):
  """The control image's side for a latent side: the control embedding's downsampling undone."""
  return latent_size * 2 ** (len(controlnet.embedding_channels) - 1)


def copy_base(controlnet_params, unet_params):
  """ControlNet params whose time embedding, input and middle blocks are the UNet's (training's start)."""
  return {k: unet_params[k] if k in unet_params else v for k, v in controlnet_params.items()}


def palette(num_classes):
  """[num_classes, 3] colours in [0, 1], class 0 black: the PASCAL VOC colour map (bits of the id interleaved)."""
  ids = np.arange(num_classes)
  colours = np.zeros((num_classes, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      colours[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
  return colours.astype(np.float32) / 255.0


def control_image(stored, kind, num_classes=256):
  """The control image [B, H, W, 3] in [0, 1] (diffusers' convention) from a batch of stored arrays: for
  'segmentation' and 'edges', of the class-id maps [B, H, W]: 'segmentation' colours each class by `palette`;
  'edges' is white where a pixel's class differs from its right or lower neighbour's (the objects' outlines),
  black elsewhere; for 'image', the stored uint8 control images [B, H, W, 3] scaled."""
  if kind not in STORED:
    raise ValueError(f"ldm.controlnet.kind='{kind}' is not one of {KINDS[1:]}.")
  if kind == 'image':
    return jnp.asarray(stored['control']).astype(jnp.float32) / 255.0
  ids = jnp.asarray(stored['segmentation']).astype(jnp.int32)
  if kind == 'segmentation':
    return jnp.asarray(palette(num_classes))[ids]
  right = jnp.pad(ids[:, :, 1:] != ids[:, :, :-1], ((0, 0), (0, 0), (0, 1)))
  down = jnp.pad(ids[:, 1:] != ids[:, :-1], ((0, 0), (0, 1), (0, 0)))
  return jnp.repeat((right | down)[..., None].astype(jnp.float32), 3, axis=-1)


def controlled(unet, controlnet, params, control=None, control_scale=1.0, **kwargs):
  """(x, t, context) -> the UNet's output under params['unet']; with a `control` image [B, H, W, 3] the UNet adds
  the residuals of the ControlNet (params['controlnet']) times `control_scale`. Each control row is repeated when
  guidance doubles the batch (`sampling.guided` interleaves an example's two rows); `kwargs` go to both."""
  def fn(x, t, context):
    controls = None
    if control is not None:
      repeated = jnp.repeat(control, x.shape[0] // control.shape[0], axis=0)
      residuals = controlnet.apply({'params': params['controlnet']}, x, t, repeated, context, **kwargs)
      controls = [control_scale * r for r in residuals]
    return unet.apply({'params': params['unet']}, x, t, context, controls=controls, **kwargs)
  return fn
