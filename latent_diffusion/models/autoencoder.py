"""First-stage autoencoders of the paper (Sec. 3.1, App. G): `Encoder`, `Decoder`, the KL-regularised
`AutoencoderKL` with its `DiagonalGaussian` posterior, and the `VQModel` with its `VectorQuantizer`.

Layout NHWC. The architecture follows the reference (taming/ldm `model.py`): ResNet blocks with GroupNorm(32,
eps 1e-6) and swish, stride-2 downsampling after asymmetric (0, 1) padding, nearest upsampling + conv, a
Res-Attn-Res middle, self-attention at the configured resolutions, 1x1 quant_conv/post_quant_conv.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models import attention as attention_lib
from latent_diffusion.models import layers

KINDS = ('kl', 'vq')  # autoencoder.model.kind


def downsampling_factor(ch_mult):
  """f of the paper: the first stage halves the resolution after every level but the last."""
  return 2 ** (len(ch_mult) - 1)


class ResnetBlock(nn.Module):
  """norm -> swish -> conv -> norm -> swish -> dropout -> conv, plus a (1x1-projected) skip."""
  out_channels: int
  dropout: float = 0.0
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x, deterministic=True):
    norm = lambda name: layers.group_norm(self.norm_groups, name=name)
    h = layers.conv(self.out_channels, name='conv1')(layers.swish(norm('norm1')(x)))
    h = layers.swish(norm('norm2')(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = layers.conv(self.out_channels, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, padding=0, name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, 1x1 convs for q, k, v and the output projection."""
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = layers.group_norm(self.norm_groups, name='norm')(x)
    q, k, v = (layers.conv(c, 1, padding=0, name=n)(y).reshape(b, h * w, 1, c) for n in ('q', 'k', 'v'))
    y = attention_lib.attention(q, k, v).reshape(b, h, w, c)
    return x + layers.conv(c, 1, padding=0, name='proj_out')(y)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one pixel at the bottom and right only (the reference's asymmetric pad)."""

  @nn.compact
  def __call__(self, x):
    return layers.conv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(x.shape[-1], name='conv')(x)


def _middle(x, channels, dropout, deterministic, attention, groups):
  x = ResnetBlock(channels, dropout, groups, name='mid_block_1')(x, deterministic)
  if attention:
    x = AttnBlock(groups, name='mid_attn_1')(x)
  return ResnetBlock(channels, dropout, groups, name='mid_block_2')(x, deterministic)


def _attends(resolution, level, attn_resolutions):
  """Whether a level has attention: by the feature size it has at the configured `resolution` (the reference's
  curr_res), so that a larger or smaller input runs the same blocks."""
  return resolution // 2**level in attn_resolutions


class Encoder(nn.Module):
  """Image [B, H, W, 3] -> latent moments [B, H/f, W/f, 2 z] (double_z) or features [B, H/f, W/f, z], f = 2^(L-1)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  z_channels: int
  double_z: bool = True
  dropout: float = 0.0
  mid_attention: bool = True
  norm_groups: int = 32
  resolution: int = 256  # the training image size attn_resolutions refer to (the reference ddconfig's)

  @nn.compact
  def __call__(self, x, deterministic=True):
    h = layers.conv(self.ch, name='conv_in')(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dropout, self.norm_groups, name=f'down_{level}_block_{i}')(
            h, deterministic)
        if _attends(self.resolution, level, self.attn_resolutions):
          h = AttnBlock(self.norm_groups, name=f'down_{level}_attn_{i}')(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(name=f'down_{level}_downsample')(h)
    h = _middle(h, h.shape[-1], self.dropout, deterministic, self.mid_attention, self.norm_groups)
    h = layers.swish(layers.group_norm(self.norm_groups, name='norm_out')(h))
    return layers.conv(2 * self.z_channels if self.double_z else self.z_channels, name='conv_out')(h)


class Decoder(nn.Module):
  """Latent [B, h, w, z] -> image [B, h f, w f, out_ch]; num_res_blocks + 1 blocks per level, as the reference."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  out_ch: int = 3
  dropout: float = 0.0
  mid_attention: bool = True
  norm_groups: int = 32
  resolution: int = 256

  @nn.compact
  def __call__(self, z, deterministic=True):
    h = layers.conv(self.ch * self.ch_mult[-1], name='conv_in')(z)
    h = _middle(h, h.shape[-1], self.dropout, deterministic, self.mid_attention, self.norm_groups)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[level], self.dropout, self.norm_groups,
                        name=f'up_{level}_block_{i}')(h, deterministic)
        if _attends(self.resolution, level, self.attn_resolutions):
          h = AttnBlock(self.norm_groups, name=f'up_{level}_attn_{i}')(h)
      if level != 0:
        h = Upsample(name=f'up_{level}_upsample')(h)
    h = layers.swish(layers.group_norm(self.norm_groups, name='norm_out')(h))
    return layers.conv(self.out_ch, name='conv_out')(h)


class DiagonalGaussian:
  """The KL autoencoder's posterior N(mean, exp(logvar)) from moments [..., 2 C]; logvar clamped to [-30, 20]."""

  def __init__(self, moments):
    self.mean, logvar = jnp.split(moments, 2, axis=-1)
    self.logvar = jnp.clip(logvar, -30.0, 20.0)
    self.std = jnp.exp(0.5 * self.logvar)
    self.var = jnp.exp(self.logvar)

  def sample(self, rng):
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, I)) summed over all but the batch axis."""
    return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=tuple(range(1, self.mean.ndim)))


class VectorQuantizer(nn.Module):
  """Nearest-codebook quantisation with the straight-through estimator (van den Oord et al. 2017).

  Returns z_q and the VQ loss ||sg(z) - e||^2 + beta ||z - sg(e)||^2. The reference's default (`legacy=True`
  in taming) puts beta on the codebook term instead of the commitment term; we use the paper's weighting.
  `l2_normalize` compares unit vectors (cosine similarity codebook, Yu et al. 2021), an addition.
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  l2_normalize: bool = False

  @nn.compact
  def __call__(self, z):
    codebook = self.param('embedding', nn.with_logical_partitioning(_uniform(1 / self.n_embed), (None, 'embed')),
                          (self.n_embed, self.embed_dim))
    flat = z.reshape(-1, self.embed_dim)
    if self.l2_normalize:
      flat, codebook = _unit(flat), _unit(codebook)
    distances = (jnp.sum(flat**2, 1, keepdims=True) - 2 * flat @ codebook.T + jnp.sum(codebook**2, 1)[None])
    indices = jnp.argmin(distances, axis=1)
    z_q = codebook[indices].reshape(z.shape)
    z = flat.reshape(z.shape)
    codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - z_q) ** 2)
    commitment_loss = jnp.mean((z - jax.lax.stop_gradient(z_q)) ** 2)
    z_q = z + jax.lax.stop_gradient(z_q - z)  # straight-through
    usage = jnp.mean(jax.nn.one_hot(indices, self.n_embed, dtype=jnp.float32), axis=0)
    perplexity = jnp.exp(-jnp.sum(usage * jnp.log(usage + 1e-10)))
    return z_q, {'codebook_loss': codebook_loss, 'commitment_loss': commitment_loss,
                 'vq_loss': codebook_loss + self.beta * commitment_loss, 'perplexity': perplexity,
                 'indices': indices.reshape(z.shape[:-1])}


def _uniform(scale):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def _unit(x):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x**2, axis=-1, keepdims=True), 1e-12))


class _Autoencoder(nn.Module):
  """Architecture fields shared by both first stages (the CompVis ddconfig)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  z_channels: int
  embed_dim: int
  dropout: float = 0.0
  norm_groups: int = 32  # the reference's; fewer keep its channels per group at a smoke width
  resolution: int = 256
  mid_attention: bool = True  # False: vq-f4-noattn (the reference's attn_type 'none')

  def _encoder_decoder(self, double_z):
    arch = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                attn_resolutions=self.attn_resolutions, dropout=self.dropout, norm_groups=self.norm_groups,
                resolution=self.resolution, mid_attention=self.mid_attention)
    return Encoder(z_channels=self.z_channels, double_z=double_z, **arch), Decoder(**arch)


class AutoencoderKL(_Autoencoder):
  """Encoder -> quant_conv -> DiagonalGaussian; z -> post_quant_conv -> Decoder."""

  def setup(self):
    self.encoder, self.decoder = self._encoder_decoder(double_z=True)
    self.quant_conv = layers.conv(2 * self.embed_dim, 1, padding=0)
    self.post_quant_conv = layers.conv(self.z_channels, 1, padding=0)

  def encode(self, x, deterministic=True):
    """Image -> posterior moments [B, h, w, 2 embed_dim] (mean, logvar): what the latent store keeps."""
    return self.quant_conv(self.encoder(x, deterministic))

  def decode(self, z, deterministic=True):
    return self.decoder(self.post_quant_conv(z), deterministic)

  def __call__(self, x, rng, sample_posterior=True, deterministic=True):
    """Reconstruction and the regulariser: (x_hat, mean KL over the batch, {})."""
    posterior = DiagonalGaussian(self.encode(x, deterministic))
    z = posterior.sample(rng) if sample_posterior else posterior.mode()
    return self.decode(z, deterministic), jnp.mean(posterior.kl()), {}


class VQModel(_Autoencoder):
  """Encoder -> quant_conv -> VectorQuantizer; z_q -> post_quant_conv -> Decoder."""
  n_embed: int = 16384
  beta: float = 0.25
  l2_normalize: bool = False

  def setup(self):
    self.encoder, self.decoder = self._encoder_decoder(double_z=False)
    self.quant_conv = layers.conv(self.embed_dim, 1, padding=0)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.l2_normalize)
    self.post_quant_conv = layers.conv(self.z_channels, 1, padding=0)

  def encode(self, x, deterministic=True):
    """Image -> pre-quantisation latent [B, h, w, embed_dim] (what the latent store keeps)."""
    return self.quant_conv(self.encoder(x, deterministic))

  def decode(self, h, deterministic=True):
    """Pre-quantisation latent (e.g. a diffusion sample) -> quantised -> image, as the reference decodes."""
    z_q, _ = self.quantize(h)
    return self.decoder(self.post_quant_conv(z_q), deterministic)

  def __call__(self, x, rng=None, sample_posterior=False, deterministic=True):
    """Reconstruction and the regulariser: (x_hat, VQ loss, {perplexity, ...})."""
    del rng, sample_posterior  # Deterministic.
    z_q, info = self.quantize(self.encode(x, deterministic))
    return self.decoder(self.post_quant_conv(z_q), deterministic), info.pop('vq_loss'), info


def create_autoencoder(model_config):
  """`AutoencoderKL` or `VQModel` from the `autoencoder.model` config section."""
  arch = dict(ch=model_config.ch, ch_mult=tuple(model_config.ch_mult), num_res_blocks=model_config.num_res_blocks,
              attn_resolutions=tuple(model_config.attn_resolutions), z_channels=model_config.z_channels,
              embed_dim=model_config.embed_dim, dropout=model_config.dropout, norm_groups=model_config.norm_groups,
              resolution=model_config.resolution, mid_attention=model_config.mid_attention)
  if model_config.kind == 'kl':
    return AutoencoderKL(**arch)
  if model_config.kind == 'vq':
    return VQModel(n_embed=model_config.n_embed, l2_normalize=model_config.l2_normalize, **arch)
  raise ValueError(f"autoencoder.model.kind='{model_config.kind}' is not one of {KINDS}.")
