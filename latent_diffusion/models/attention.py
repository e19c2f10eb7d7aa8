"""Attention in one place: every model calls `attention`, so kernels change here only.

`implementation`: 'xla' is `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs where it applies,
XLA elsewhere); 'reference' is the explicit softmax(q k^T / sqrt(d)) v with float32 softmax.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'reference')


def attention(q, k, v, implementation='xla'):
  """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D], scale 1/sqrt(D), no mask."""
  if implementation == 'xla':
    return jax.nn.dot_product_attention(q, k, v)
  if implementation == 'reference':
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', weights, v)
  raise ValueError(f"Unknown attention implementation '{implementation}'; choose one of {IMPLEMENTATIONS}.")
