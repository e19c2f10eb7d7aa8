"""The tiled first stage (the reference's `split_input_params`): an encoder or decoder applied to overlapping
crops of an input too large for memory, the crops' outputs blended with weights that fall towards their borders.

Crops run one at a time (`lax.map`), so memory holds one crop's activations; a side no longer than the crop is
one crop, as in the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models import autoencoder


def border_weights(h, w, min_weight, max_weight):
  """[h, w]: each pixel's distance to the crop's nearest border, coordinates normalised by (h - 1, w - 1), so 0 at
  the border and 0.5 at the centre, clipped to [min_weight, max_weight] (the reference's weighting)."""
  y = np.arange(h)[:, None] / max(h - 1, 1)
  x = np.arange(w)[None, :] / max(w - 1, 1)
  return np.clip(np.minimum(np.minimum(y, 1 - y), np.minimum(x, 1 - x)), min_weight, max_weight)


def crop_starts(side, size, stride):
  """Where the crops along one side start: every `stride` from 0, the last one ending at the side."""
  size, stride = min(size, side), min(stride, side)
  if (side - size) % stride:
    raise ValueError(f'autoencoder.tiling.stride: crops of {size} every {stride} do not end at the side of {side}; '
                     f'choose a stride that divides {side - size}.')
  return list(range(0, side - size + 1, stride)), size


def tiled(fn, x, size, stride, *, min_weight=0.01, max_weight=0.5):
  """fn over the `size` x `size` crops of x [B, H, W, C], `stride` apart, blended into one output. fn must scale
  a crop's sides by one factor (a decoder's f, an encoder's 1/f) that maps crop starts to whole output pixels."""
  ys, size_h = crop_starts(x.shape[1], size, stride)
  xs, size_w = crop_starts(x.shape[2], size, stride)
  crops = jnp.stack([x[:, i:i + size_h, j:j + size_w] for i in ys for j in xs])
  out = jax.lax.map(fn, crops)  # [crops, B, h, w, C']
  out_h, out_w = out.shape[2:4]
  if any(i * out_h % size_h for i in ys) or any(j * out_w % size_w for j in xs):
    raise ValueError(f'Crops {stride} apart do not start on whole output pixels when a crop of {size_h} gives '
                     f'{out_h}; choose a stride that is a multiple of the first stage factor.')
  weights = jnp.asarray(border_weights(out_h, out_w, min_weight, max_weight), out.dtype)[None, :, :, None]
  total = jnp.zeros((x.shape[0], x.shape[1] * out_h // size_h, x.shape[2] * out_w // size_w, out.shape[-1]),
                    out.dtype)
  norm = jnp.zeros((1,) + total.shape[1:3] + (1,), out.dtype)
  for k, (i, j) in enumerate((i, j) for i in ys for j in xs):
    top, left = i * out_h // size_h, j * out_w // size_w
    total = total.at[:, top:top + out_h, left:left + out_w].add(out[k] * weights)
    norm = norm.at[:, top:top + out_h, left:left + out_w].add(weights)
  return total / norm


def _apply(fn, x, tiles, factor):
  """fn(x), or in crops of `tiles` (the autoencoder.tiling section, in latent pixels of `factor` input pixels)."""
  if not tiles.size:
    return fn(x)
  return tiled(fn, x, tiles.size * factor, tiles.stride * factor, min_weight=tiles.min_weight,
               max_weight=tiles.max_weight)


def encode(model, params, x, tiles):
  """The first stage's encoding of images x, in crops when autoencoder.tiling sets a size."""
  return _apply(lambda crop: model.apply({'params': params}, crop, method='encode'), x, tiles,
                autoencoder.downsampling_factor(model.ch_mult))


def decode(model, params, z, tiles):
  """The first stage's decoding of latents z, in crops when autoencoder.tiling sets a size."""
  return _apply(lambda crop: model.apply({'params': params}, crop, method='decode'), z, tiles, 1)
