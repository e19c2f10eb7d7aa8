"""The FID InceptionV3 exactly as pytorch-fid builds it (the TF 2015-12-05 graph), and its input preprocessing.

Names follow torchvision / pytorch-fid (`Conv2d_1a_3x3`, `Mixed_5b`, `branch1x1`, ...) so a reader of the FID
code recognises every block. The FID blocks differ from torchvision's Inception: average pools exclude the
padding, and the last block (`Mixed_7c`) max-pools its pool branch. Weights: `latent_diffusion.weights.inception`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
FEATURES = 2048  # pool3
NUM_CLASSES = 1008  # the TF graph's logits, for the Inception Score
# How images reach the network: pytorch-fid (bilinear without antialias on [0, 1], then 2x - 1) and clean-fid
# (antialiased bicubic on [0, 255], then (x - 128) / 128, the TF graph's own scaling).
PREPROCESSING = ('pytorch_fid', 'clean')


def preprocess(images, mode='pytorch_fid'):
  """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3], the network's input, resized and scaled as `mode` does."""
  if mode not in PREPROCESSING:
    raise ValueError(f"Unknown FID preprocessing '{mode}'; choose one of {PREPROCESSING}.")
  x = images.astype(jnp.float32)
  shape = (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3])
  if mode == 'pytorch_fid':
    x = x / 255.0
    if x.shape != shape:  # F.interpolate(mode='bilinear', align_corners=False): half-pixel centres, no antialias
      x = jax.image.resize(x, shape, 'bilinear', antialias=False)
    return 2.0 * x - 1.0
  if x.shape != shape:  # PIL's bicubic (a = -0.5) with its antialiasing when shrinking
    x = jnp.clip(jax.image.resize(x, shape, 'bicubic', antialias=True), 0.0, 255.0)
  return (x - 128.0) / 128.0


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""
  features: int
  kernel_size: tuple = (1, 1)
  strides: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel_size, (self.strides,) * 2, padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=2, padding='VALID'):
  return nn.max_pool(x, (3, 3), (strides, strides), padding=padding)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = BasicConv2d(64, name='branch1x1')(x)
    branch5x5 = BasicConv2d(48, name='branch5x5_1')(x)
    branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
    dbl = BasicConv2d(64, name='branch3x3dbl_1')(x)
    dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(dbl)
    pool = BasicConv2d(self.pool_features, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([branch1x1, branch5x5, dbl, pool], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv2d(384, (3, 3), strides=2, name='branch3x3')(x)
    dbl = BasicConv2d(64, name='branch3x3dbl_1')(x)
    dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = BasicConv2d(96, (3, 3), strides=2, name='branch3x3dbl_3')(dbl)
    return jnp.concatenate([branch3x3, dbl, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """Factorised 7x7 convolutions (1x7 and 7x1)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    branch1x1 = BasicConv2d(192, name='branch1x1')(x)
    b7 = BasicConv2d(c, name='branch7x7_1')(x)
    b7 = BasicConv2d(c, **row, name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, **col, name='branch7x7_3')(b7)
    dbl = BasicConv2d(c, name='branch7x7dbl_1')(x)
    dbl = BasicConv2d(c, **col, name='branch7x7dbl_2')(dbl)
    dbl = BasicConv2d(c, **row, name='branch7x7dbl_3')(dbl)
    dbl = BasicConv2d(c, **col, name='branch7x7dbl_4')(dbl)
    dbl = BasicConv2d(192, **row, name='branch7x7dbl_5')(dbl)
    pool = BasicConv2d(192, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([branch1x1, b7, dbl, pool], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name='branch3x3_1')(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """Expanded filter bank; the FID graph's second E block max-pools its pool branch (`pool='max'`)."""
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    branch1x1 = BasicConv2d(320, name='branch1x1')(x)
    b3 = BasicConv2d(384, name='branch3x3_1')(x)
    b3 = [BasicConv2d(384, **row, name='branch3x3_2a')(b3), BasicConv2d(384, **col, name='branch3x3_2b')(b3)]
    dbl = BasicConv2d(448, name='branch3x3dbl_1')(x)
    dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = [BasicConv2d(384, **row, name='branch3x3dbl_3a')(dbl),
           BasicConv2d(384, **col, name='branch3x3dbl_3b')(dbl)]
    pooled = _avg_pool(x) if self.pool == 'avg' else _max_pool(x, 1, ((1, 1), (1, 1)))
    pool = BasicConv2d(192, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, *b3, *dbl, pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """Preprocessed images [B, 299, 299, 3] in the network's range -> {'pool3': [B, 2048], 'logits': [B, 1008]}.

  `num_classes=0` builds the feature extractor without the classifier (weights that carry no logits layer).
  """
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = BasicConv2d(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool(x)
    x = BasicConv2d(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    out = {'pool3': pool3}
    if self.num_classes:
      out['logits'] = nn.Dense(self.num_classes, precision=jax.lax.Precision.HIGHEST, name='fc')(pool3)
    return out
