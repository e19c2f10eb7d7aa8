"""Concat conditioning (paper Sec. 3.3): inputs concatenated to the UNet's noisy latent along channels.

'low_res' (super-resolution): the image downsampled to the latent size. 'inpainting': the latent of the image
with a box masked out, scaled like z, and the mask at latent size. The `latents` stage stores them per example;
training and sampling concatenate them to x_t.
"""

import jax.numpy as jnp
import numpy as np

KINDS = ('', 'low_res', 'inpainting')
# The latent store's arrays each kind is made of.
KEYS = {'': (), 'low_res': ('low_res',), 'inpainting': ('masked_latent', 'inpaint_mask')}


def check(concat):
  if concat not in KINDS:
    raise ValueError(f"ldm.conditioning.concat='{concat}' is not one of {KINDS}.")


def num_channels(concat, latent_channels):
  check(concat)
  return {'': 0, 'low_res': 3, 'inpainting': latent_channels + 1}[concat]


def area_downsample(x, size):
  """[B, H, W, C] -> [B, size, size, C] by averaging blocks (H and W multiples of size)."""
  b, h, w, c = x.shape
  return x.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def box_masks(seed, process, positions, resolution):
  """Inpainting masks [N, R, R, 1] (1 = the region to fill): one box per example, each side 1/4 to 3/4 of the
  image, fixed by (seed, host, the example's position in the host's share of the split)."""
  masks = np.zeros((len(positions), resolution, resolution, 1), np.float32)
  for i, position in enumerate(positions):
    rng = np.random.default_rng([seed, process, position])
    h, w = rng.integers(resolution // 4, 3 * resolution // 4 + 1, size=2)
    y, x = rng.integers(0, resolution - h + 1), rng.integers(0, resolution - w + 1)
    masks[i, y:y + h, x:x + w] = 1.0
  return masks


def condition(arrays, concat, scale_factor):
  """What the UNet input is concatenated with, [B, h, w, k], from stored arrays: the low-res image, or the
  masked image's latent (scaled like z) and the mask; None without concat conditioning."""
  if not concat:
    return None
  if concat == 'low_res':
    return arrays['low_res']
  return jnp.concatenate([arrays['masked_latent'] * scale_factor, arrays['inpaint_mask']], axis=-1)


def with_concat(model_fn, condition):
  """Wraps `model_fn(x, t, context)` to concatenate `condition` to x (tiled when guidance doubles the batch)."""
  if condition is None:
    return model_fn
  def fn(x, t, context):
    tiled = jnp.tile(condition, (x.shape[0] // condition.shape[0], 1, 1, 1))
    return model_fn(jnp.concatenate([x, tiled], axis=-1), t, context)
  return fn
