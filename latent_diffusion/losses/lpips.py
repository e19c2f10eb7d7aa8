"""LPIPS (Zhang et al. 2018) with VGG16 features, the perceptual term of the first-stage loss.

Features relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the shifted/scaled inputs are unit-normalised over
channels, their squared differences weighted by 1x1 non-negative `lin` layers, averaged over space and
summed over layers. Weights are frozen and come from `latent_diffusion.weights.lpips` (converted once from
torchvision's VGG16 and the `lpips` package's lin layers).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16().features: conv widths, 'M' = 2x2 max pool. LPIPS taps the ReLU before each pool.
VGG16_FEATURES = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
# numpy, not jnp: a module-level JAX array would start the backend at import, before jax.distributed.initialize.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def vgg16_conv_indices():
  """Indices of the conv layers in torchvision's `features` Sequential (conv, ReLU pairs and pools)."""
  indices, index = [], 0
  for item in VGG16_FEATURES:
    if item == 'M':
      index += 1
    else:
      indices.append(index)
      index += 2
  return indices


class VGG16Features(nn.Module):
  """The five LPIPS taps of VGG16, each after the last ReLU of its block."""

  @nn.compact
  def __call__(self, x):
    taps = []
    conv_names = iter(vgg16_conv_indices())
    for item in VGG16_FEATURES:
      if item == 'M':
        taps.append(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
      else:
        x = nn.relu(nn.Conv(item, (3, 3), padding=1, name=f'features_{next(conv_names)}')(x))
    return taps + [x]


def _unit_normalize(features, eps=1e-10):
  """x / (||x||_channels + eps), with a gradient that stays finite where a feature vector is all zero."""
  norm = jnp.sqrt(jnp.maximum(jnp.sum(features**2, axis=-1, keepdims=True), 1e-20))
  return features / (norm + eps)


class LPIPS(nn.Module):
  """Perceptual distance per image, [B], between images in [-1, 1] (NHWC)."""

  @nn.compact
  def __call__(self, x, y):
    vgg = VGG16Features(name='vgg')
    feats_x, feats_y = vgg((x - _SHIFT) / _SCALE), vgg((y - _SHIFT) / _SCALE)
    distance = 0.0
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
      diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
      distance += jnp.mean(nn.Conv(1, (1, 1), use_bias=False, name=f'lin_{i}')(diff), axis=(1, 2, 3))
    return distance


def lpips_fn(params):
  """A jittable (x, y) -> [B] distance with frozen `params` (no gradient flows into them)."""
  params = jax.lax.stop_gradient(params)
  return lambda x, y: LPIPS().apply({'params': params}, x, y)
