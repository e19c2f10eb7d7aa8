"""Per-image reconstruction metrics on images in [-1, 1]: PSNR and SSIM (Wang et al. 2004), jittable."""

import jax
import jax.numpy as jnp


def _to_unit(x):
  return (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0


def psnr(x, y):
  """[B] PSNR in dB of images in [-1, 1], measured on [0, 1] (peak 1)."""
  mse = jnp.mean((_to_unit(x) - _to_unit(y)) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def _gaussian_filter(x, size, sigma):
  """Valid-mode separable Gaussian blur of [B, H, W, C] per channel."""
  coords = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-coords**2 / (2 * sigma**2))
  g = g / g.sum()
  c = x.shape[-1]
  dn = ('NHWC', 'HWIO', 'NHWC')
  x = jax.lax.conv_general_dilated(x, jnp.tile(g[:, None, None, None], (1, 1, 1, c)), (1, 1), 'VALID',
                                   dimension_numbers=dn, feature_group_count=c)
  return jax.lax.conv_general_dilated(x, jnp.tile(g[None, :, None, None], (1, 1, 1, c)), (1, 1), 'VALID',
                                      dimension_numbers=dn, feature_group_count=c)


def ssim(x, y, *, size=11, sigma=1.5, k1=0.01, k2=0.03):
  """[B] mean SSIM of images in [-1, 1] on [0, 1], with the standard 11x11 Gaussian window (sigma 1.5)."""
  x, y = _to_unit(x).astype(jnp.float32), _to_unit(y).astype(jnp.float32)
  c1, c2 = k1**2, k2**2
  mu_x, mu_y = _gaussian_filter(x, size, sigma), _gaussian_filter(y, size, sigma)
  var_x = _gaussian_filter(x * x, size, sigma) - mu_x**2
  var_y = _gaussian_filter(y * y, size, sigma) - mu_y**2
  cov = _gaussian_filter(x * y, size, sigma) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))
