"""Concat conditioning (paper Sec. 3.3): inputs concatenated to the UNet's noisy latent along channels.

'low_res' (super-resolution): the image downsampled to the latent size. 'inpainting': the latent of the image
with a box masked out, scaled like z, and the mask at latent size. 'segmentation' (semantic synthesis): the
class-id map as one-hot classes averaged over each latent pixel's block (the reference's SpatialRescaler: two
bilinear halvings average 4x4 blocks the same way), which the UNet maps to `segmentation_map_channels` with the
SpatialRescaler's learned 1x1 conv. The `latents` stage stores them per
example (the map at image resolution, as uint8 ids); training and sampling concatenate them to x_t.
"""

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('', 'low_res', 'inpainting', 'segmentation')
# The latent store's arrays each kind is made of.
KEYS = {'': (), 'low_res': ('low_res',), 'inpainting': ('masked_latent', 'inpaint_mask'),
        'segmentation': ('segmentation',)}


def check(concat):
  if concat not in KINDS:
    raise ValueError(f"ldm.conditioning.concat='{concat}' is not one of {KINDS}.")


def num_channels(concat, latent_channels, segmentation_classes=0):
  check(concat)
  if concat == 'segmentation' and segmentation_classes < 1:
    raise ValueError("ldm.conditioning.concat='segmentation' needs ldm.conditioning.segmentation_classes, the "
                     'number of classes of the maps (ids 0 .. classes - 1).')
  return {'': 0, 'low_res': 3, 'inpainting': latent_channels + 1, 'segmentation': segmentation_classes}[concat]


def check_segmentation(segmentation, num_classes):
  """Refuses class ids the one-hot encoding would silently drop."""
  if segmentation.size and segmentation.max() >= num_classes:
    raise ValueError(f'A segmentation map holds class id {segmentation.max()}, but '
                     f'ldm.conditioning.segmentation_classes={num_classes}; set it to at least '
                     f'{segmentation.max() + 1}.')


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


def condition(arrays, concat, scale_factor, *, size=0, segmentation_classes=0):
  """What the UNet input is concatenated with, [B, h, w, k], from stored arrays: the low-res image, the masked
  image's latent (scaled like z) and the mask, or the class fractions of the segmentation map at the latent
  `size`; None without concat conditioning."""
  if not concat:
    return None
  if concat == 'low_res':
    return arrays['low_res']
  if concat == 'segmentation':
    return area_downsample(jax.nn.one_hot(arrays['segmentation'], segmentation_classes), size)
  return jnp.concatenate([arrays['masked_latent'] * scale_factor, arrays['inpaint_mask']], axis=-1)


def with_concat(model_fn, condition):
  """Wraps `model_fn(x, t, context)` to concatenate `condition` to x (each row repeated when guidance doubles the
  batch: `sampling.guided` interleaves an example's two rows)."""
  if condition is None:
    return model_fn
  def fn(x, t, context):
    repeated = jnp.repeat(condition, x.shape[0] // condition.shape[0], axis=0)
    return model_fn(jnp.concatenate([x, repeated], axis=-1), t, context)
  return fn
