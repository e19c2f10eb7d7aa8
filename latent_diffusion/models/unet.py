"""The time-conditional `UNet` of the paper (ADM-style, CompVis `openaimodel.py`) with `SpatialTransformer`
cross-attention (CompVis `attention.py`), NHWC.

input blocks (ResBlock [+ SpatialTransformer] per block, a downsample per level) -> middle (ResBlock,
SpatialTransformer, ResBlock) -> output blocks (num_res_blocks + 1 per level on the concatenated skips, an
upsample per level) -> GroupNorm, SiLU, zero-initialised conv. Attention runs at the downsample factors in
`attention_resolutions`. Class labels (adm conditioning) add an embedding to the time embedding; concat
conditioning is extra input channels. Models without cross-attention (the reference's unconditional,
super-resolution, inpainting and semantic ones: `use_spatial_transformer=False`) use ADM's `AttentionBlock` there.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models import attention as attention_lib
from latent_diffusion.models import layers

zeros = nn.initializers.zeros
REMAT_KINDS = {'resblock', 'transformer'}
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')  # ldm.unet.dtype


def timestep_embedding(t, dim, max_period=10_000):
  """Sinusoidal embedding [B, dim] of timesteps [B]: cos then sin of t * max_period^(-i / (dim / 2))."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def unet_norm(name=None):
  """The UNet's GroupNorm32: 32 groups, eps 1e-5, statistics in float32."""
  return layers.group_norm(32, 1e-5, name=name)


class ResBlock(nn.Module):
  """ADM residual block: norm-SiLU-conv, + time embedding (or scale-shift norm), norm-SiLU-dropout-zero conv."""
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resample: Optional[str] = None  # 'down' or 'up': the block also resamples (resblock_updown)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, deterministic=True):
    h = nn.silu(unet_norm(name='in_norm')(x))
    if self.resample:
      h, x = _resample(h, self.resample), _resample(x, self.resample)
    h = layers.conv(self.out_channels, name='in_conv', dtype=self.dtype)(h)
    emb = layers.dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                       ('mlp', 'embed'), name='emb_proj', dtype=self.dtype)(nn.silu(emb))[:, None, None]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = unet_norm(name='out_norm')(h) * (1 + scale) + shift
    else:
      h = unet_norm(name='out_norm')(h + emb)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = layers.conv(self.out_channels, kernel_init=zeros, name='out_conv', dtype=self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, padding=0, name='skip', dtype=self.dtype)(x)
    return x + h


def _resample(x, direction):
  """2x average-pool down or nearest up, as openaimodel's ResBlock(up/down) without convs."""
  if direction == 'down':
    return nn.avg_pool(x, (2, 2), (2, 2))
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class CrossAttention(nn.Module):
  """Multi-head attention without q/k/v bias; attends to `context` (self-attention when None). `upcast`: the
  attention itself in float32 under a lower compute dtype (Stable Diffusion 2.1's upcast_attention)."""
  num_heads: int
  head_dim: int
  attention: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  upcast: bool = False

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    b, n, c = x.shape
    inner = self.num_heads * self.head_dim
    project = lambda name, y: layers.dense(inner, ('embed', 'heads'), use_bias=False, name=name, dtype=self.dtype)(
        y).reshape(y.shape[0], y.shape[1], self.num_heads, self.head_dim)
    q, k, v = project('to_q', x), project('to_k', context), project('to_v', context)
    if self.upcast:
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = attention_lib.attention(q, k, v, self.attention).astype(self.dtype)
    return layers.dense(c, ('heads', 'embed'), name='to_out', dtype=self.dtype)(out.reshape(b, n, inner))


class BasicTransformerBlock(nn.Module):
  """LN + self-attention, LN + cross-attention to the context, LN + GEGLU feed-forward (x4), each residual."""
  num_heads: int
  head_dim: int
  dropout: float = 0.0
  attention: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  upcast_attention: bool = False

  @nn.compact
  def __call__(self, x, context, deterministic=True):
    attn = lambda name: CrossAttention(self.num_heads, self.head_dim, self.attention, self.dtype,
                                       self.upcast_attention, name=name)
    x = x + attn('attn1')(layers.layer_norm(name='norm1')(x))
    x = x + attn('attn2')(layers.layer_norm(name='norm2')(x), context)
    dim = x.shape[-1]
    h = layers.dense(8 * dim, ('embed', 'mlp'), name='ff_proj', dtype=self.dtype)(layers.layer_norm(name='norm3')(x))
    h, gate = jnp.split(h, 2, axis=-1)
    h = nn.Dropout(self.dropout)(h * nn.gelu(gate, approximate=False), deterministic=deterministic)
    return x + layers.dense(dim, ('mlp', 'embed'), name='ff_out', dtype=self.dtype)(h)


class SpatialTransformer(nn.Module):
  """GroupNorm -> 1x1 proj_in -> depth x BasicTransformerBlock over the H*W tokens -> zero-init 1x1 proj_out, + x."""
  num_heads: int
  head_dim: int
  depth: int = 1
  dropout: float = 0.0
  attention: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  upcast_attention: bool = False

  @nn.compact
  def __call__(self, x, context, deterministic=True):
    b, h, w, c = x.shape
    inner = self.num_heads * self.head_dim
    y = layers.conv(inner, 1, padding=0, name='proj_in', dtype=self.dtype)(layers.group_norm(name='norm')(x))
    y = y.reshape(b, h * w, inner)
    for i in range(self.depth):
      y = BasicTransformerBlock(self.num_heads, self.head_dim, self.dropout, self.attention, self.dtype,
                                self.upcast_attention, name=f'block_{i}')(y, context, deterministic)
    y = layers.conv(c, 1, padding=0, kernel_init=zeros, name='proj_out', dtype=self.dtype)(y.reshape(b, h, w, inner))
    return x + y


class AttentionBlock(nn.Module):
  """ADM self-attention over the H*W positions: GroupNorm32 -> one 1x1 qkv projection -> attention -> zero-init
  1x1 projection, + x; no feed-forward. `new_order` splits q/k/v before heads (QKVAttention), else heads first
  (QKVAttentionLegacy, every CompVis model)."""
  num_heads: int
  head_dim: int
  new_order: bool = False
  attention: str = 'auto'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, deterministic=True):
    del context, deterministic  # the signature of SpatialTransformer, which it replaces
    b, h, w, c = x.shape
    qkv = layers.dense(3 * c, ('embed', 'heads'), name='qkv', dtype=self.dtype)(unet_norm(name='norm')(x))
    order = (3, self.num_heads) if self.new_order else (self.num_heads, 3)
    qkv = qkv.reshape(b, h * w, *order, self.head_dim)
    q, k, v = (jnp.take(qkv, i, axis=2 if self.new_order else 3) for i in range(3))
    out = attention_lib.attention(q, k, v, self.attention).astype(self.dtype).reshape(b, h, w, c)
    return x + layers.dense(c, ('heads', 'embed'), kernel_init=zeros, name='proj_out', dtype=self.dtype)(out)


class UNet(nn.Module):
  """eps (or v, x0) prediction [B, H, W, out_channels] from x_t [B, H, W, in_channels], timesteps [B], a context
  [B, L, context_dim] for cross-attention and optional class labels [B]."""
  model_channels: int
  out_channels: int
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4, 2, 1)
  num_heads: int = 8
  num_head_channels: int = -1  # > 0: heads of this width instead of a fixed number of heads
  transformer_depth: int = 1
  use_spatial_transformer: bool = True  # False: AttentionBlock (self-attention only), as the reference's
  use_new_attention_order: bool = False  # AttentionBlock's q/k/v split before heads
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  num_classes: int = 0  # > 0: class-label embedding added to the time embedding
  # > 0: the input channels after the latent's (concatenated class fractions) first pass a bias-free 1x1 conv
  # to this many channels, the learned map of the reference's SpatialRescaler (semantic synthesis).
  segmentation_map: int = 0
  attention: str = 'auto'
  upcast_attention: bool = False  # attention in float32 under a lower compute dtype (SD 2.1)
  # Blocks recomputed in the backward pass instead of keeping their activations: '', 'all', or a comma list of
  # 'resblock', 'transformer'; `remat_policy` (a jax.checkpoint_policies name) is what such a block still keeps.
  remat: str = ''
  remat_policy: str = 'nothing_saveable'
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  def _heads(self, channels):
    if self.num_head_channels > 0:
      return channels // self.num_head_channels, self.num_head_channels
    return self.num_heads, channels // self.num_heads

  def _rematerialised(self, block, kind):
    kinds = REMAT_KINDS if self.remat == 'all' else set(filter(None, self.remat.split(',')))
    if kinds - REMAT_KINDS or not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f"ldm.unet.remat='{self.remat}' / remat_policy='{self.remat_policy}': choose '', 'all' or "
                       f"a comma list of {sorted(REMAT_KINDS)}, and a jax.checkpoint_policies name.")
    if kind not in kinds:
      return block
    return nn.remat(block, static_argnums=(3,), policy=getattr(jax.checkpoint_policies, self.remat_policy))

  def _block(self, h, channels, name, attend, emb, context, deterministic, resample=None):
    """A ResBlock, then (where `attend`) a SpatialTransformer or AttentionBlock."""
    h = self._rematerialised(ResBlock, 'resblock')(channels, self.dropout, self.use_scale_shift_norm, resample,
                                                   self.dtype, name=name)(h, emb, deterministic)
    if not attend:
      return h
    heads, head_dim = self._heads(channels)
    if not self.use_spatial_transformer:
      return self._rematerialised(AttentionBlock, 'transformer')(
          heads, head_dim, self.use_new_attention_order, self.attention, self.dtype, name=name + '_attention')(
              h, context, deterministic)
    return self._rematerialised(SpatialTransformer, 'transformer')(
        heads, head_dim, self.transformer_depth, self.dropout, self.attention, self.dtype, self.upcast_attention,
        name=name + '_transformer')(h, context, deterministic)

  def embed(self, t, y):
    """The time embedding [B, 4 * model_channels], plus the class embedding of labels `y`."""
    emb_dim = 4 * self.model_channels
    emb = layers.dense(emb_dim, ('embed', 'mlp'), name='time_embed_0')(timestep_embedding(t, self.model_channels))
    emb = layers.dense(emb_dim, ('mlp', 'embed'), name='time_embed_1')(nn.silu(emb))
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes, emb_dim, name='label_emb', embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(1.0), ('vocab', 'embed')))(y)
    return emb

  def encode(self, x, emb, context, deterministic, added=None):
    """The input blocks and the middle block: (the middle's output, the skips in the order they are made).
    `added` (a ControlNet's embedded hint) is added to the first conv's output."""
    if context is not None and not self.use_spatial_transformer:
      raise ValueError('ldm.unet.use_spatial_transformer=False has no cross-attention for the conditioning '
                       "context; set it to True or ldm.conditioning.kind='none'.")
    block = lambda h, channels, name, attend, resample=None: self._block(
        h, channels, name, attend, emb, context, deterministic, resample)
    if self.segmentation_map:
      classes = layers.conv(self.segmentation_map, 1, padding=0, use_bias=False, name='segmentation_map')(
          x[..., self.out_channels:])
      x = jnp.concatenate([x[..., :self.out_channels], classes], axis=-1)
    h = layers.conv(self.model_channels, name='conv_in', dtype=self.dtype)(x.astype(self.dtype))
    if added is not None:
      h = h + added.astype(h.dtype)
    skips, ds = [h], 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(h, mult * self.model_channels, f'down_{level}_{i}', ds in self.attention_resolutions)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = block(h, h.shape[-1], f'down_{level}_downsample', False, resample='down')
        else:
          h = layers.conv(h.shape[-1], 3, strides=2, name=f'down_{level}_downsample', dtype=self.dtype)(h)
        skips.append(h)
        ds *= 2
    h = block(h, h.shape[-1], 'middle_0', True)
    return block(h, h.shape[-1], 'middle_1', False), skips

  @nn.compact
  def __call__(self, x, t, context=None, y=None, deterministic=True, controls=None):
    """`controls`: a ControlNet's residuals, one per skip and one for the middle block's output, added to them."""
    emb = self.embed(t, y)
    h, skips = self.encode(x, emb, context, deterministic)
    if controls is not None:
      h = h + controls[-1].astype(h.dtype)
      skips = [s + c.astype(s.dtype) for s, c in zip(skips, controls[:-1])]
    ds = 2 ** (len(self.channel_mult) - 1)
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._block(h, mult * self.model_channels, f'up_{level}_{i}', ds in self.attention_resolutions, emb,
                        context, deterministic)
      if level:
        if self.resblock_updown:
          h = self._block(h, h.shape[-1], f'up_{level}_upsample', False, emb, context, deterministic, resample='up')
        else:
          h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
          h = layers.conv(h.shape[-1], name=f'up_{level}_upsample', dtype=self.dtype)(h)
        ds //= 2
    h = nn.silu(unet_norm(name='out_norm')(h))
    return layers.conv(self.out_channels, kernel_init=zeros, name='out_conv', dtype=jnp.float32)(h)


def create_unet(unet_config, out_channels, num_classes=0, segmentation_map=0):
  """A `UNet` from the `ldm.unet` config section (`dtype`: the compute dtype; parameters stay float32)."""
  return UNet(model_channels=unet_config.model_channels, out_channels=out_channels, segmentation_map=segmentation_map,
              channel_mult=tuple(unet_config.channel_mult), num_res_blocks=unet_config.num_res_blocks,
              attention_resolutions=tuple(unet_config.attention_resolutions), num_heads=unet_config.num_heads,
              num_head_channels=unet_config.num_head_channels, transformer_depth=unet_config.transformer_depth,
              use_spatial_transformer=unet_config.use_spatial_transformer,
              use_new_attention_order=unet_config.use_new_attention_order,
              dropout=unet_config.dropout, use_scale_shift_norm=unet_config.use_scale_shift_norm,
              resblock_updown=unet_config.resblock_updown, num_classes=num_classes,
              attention=unet_config.attention, upcast_attention=unet_config.upcast_attention, remat=unet_config.remat,
              remat_policy=unet_config.remat_policy, dtype=jnp.dtype(unet_config.dtype))
