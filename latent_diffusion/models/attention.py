"""Attention in one place: every model calls `attention`, so kernels change here only.

`implementation`:
  'xla'        `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs where it applies, XLA elsewhere);
  'reference'  the explicit softmax(q k^T / sqrt(d)) v with a float32 softmax, heads folded into the batch;
  'chunked'    queries in chunks and keys in chunks with an online (running max) softmax, so memory grows with
               the chunk sizes instead of Lq x Lk (Rabe & Staats 2021) - the fallback for long sequences;
  'pallas_tpu' the Pallas TPU flash-attention kernel (TPU only);
  'auto'       'pallas_tpu' on TPU when the sequence lengths suit its blocks, 'reference' on CPU (fastest
               there: benchmarks/unet_train_step.py), else 'xla'.
"""

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'reference', 'chunked', 'pallas_tpu')
CHUNK = 512  # query and key chunk of 'chunked'
_PALLAS_BLOCK = 128


def attention(q, k, v, implementation='auto', causal=False):
  """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D], scale 1/sqrt(D); `causal`: query i sees keys <= i
  (the CLIP text encoder)."""
  if implementation == 'auto':
    implementation = _automatic(q, k)
  if implementation == 'xla':
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if implementation == 'reference':
    return _reference(q, k, v, causal)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, causal=causal)
  if implementation == 'pallas_tpu':
    return _pallas_tpu(q, k, v, causal)
  raise ValueError(f"Unknown attention implementation '{implementation}'; choose one of {IMPLEMENTATIONS}.")


def _automatic(q, k):
  if jax.default_backend() == 'cpu':  # XLA:CPU runs dot_product_attention ~2.5x slower than 'reference' at 1k tokens
    return 'reference'
  return 'pallas_tpu' if _pallas_applies(q, k) else 'xla'


def _reference(q, k, v, causal):
  """softmax(q k^T / sqrt(D)) v with a float32 softmax, the heads folded into the batch (one batched matmul)."""
  b, lq, h, d = q.shape
  fold = lambda a: a.transpose(0, 2, 1, 3).reshape(b * h, a.shape[1], d)
  logits = jnp.einsum('bqd,bkd->bqk', fold(q), fold(k)).astype(jnp.float32) * d ** -0.5
  if causal:
    logits = jnp.where(_causal_mask(jnp.arange(lq), jnp.arange(k.shape[1])), logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bqk,bkd->bqd', weights, fold(v)).reshape(b, h, lq, d).transpose(0, 2, 1, 3)


def _causal_mask(query_positions, key_positions):
  return key_positions[None, :] <= query_positions[:, None]


def chunked_attention(q, k, v, query_chunk=CHUNK, key_chunk=CHUNK, causal=False):
  """Exact attention with O(query_chunk x key_chunk) memory per head; float32 statistics."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5

  def pad_to(x, length, multiple):
    extra = -length % multiple
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))), length + extra

  query_chunk, key_chunk = min(query_chunk, lq), min(key_chunk, lk)
  q, lq_padded = pad_to(q, lq, query_chunk)
  k, lk_padded = pad_to(k, lk, key_chunk)
  v, _ = pad_to(v, lk, key_chunk)
  keys = k.reshape(b, lk_padded // key_chunk, key_chunk, h, d).swapaxes(0, 1)
  values = v.reshape(b, lk_padded // key_chunk, key_chunk, h, d).swapaxes(0, 1)
  key_positions = jnp.arange(lk_padded).reshape(lk_padded // key_chunk, key_chunk)

  def one_query_chunk(inputs):
    q_chunk, query_positions = inputs

    def step(carry, chunk):
      out, row_max, row_sum = carry
      k_chunk, v_chunk, positions = chunk
      mask = jnp.broadcast_to(positions < lk, (query_chunk, key_chunk))
      if causal:
        mask &= _causal_mask(query_positions, positions)
      logits = jnp.einsum('bqhd,bkhd->bhqk', q_chunk, k_chunk).astype(jnp.float32) * scale
      logits = jnp.where(mask[None, None], logits, -jnp.inf)
      new_max = jnp.maximum(row_max, logits.max(axis=-1))
      correction = jnp.exp(row_max - new_max)  # key 0 is visible to every query, so new_max is finite
      weights = jnp.exp(logits - new_max[..., None])
      out = out * correction[..., None] + jnp.einsum('bhqk,bkhd->bhqd', weights, v_chunk.astype(jnp.float32))
      return (out, new_max, row_sum * correction + weights.sum(axis=-1)), None

    init = (jnp.zeros((b, h, q_chunk.shape[1], d), jnp.float32),
            jnp.full((b, h, q_chunk.shape[1]), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, q_chunk.shape[1]), jnp.float32))
    (out, _, row_sum), _ = jax.lax.scan(step, init, (keys, values, key_positions))
    return (out / row_sum[..., None]).transpose(0, 2, 1, 3)

  q_chunks = q.reshape(b, lq_padded // query_chunk, query_chunk, h, d).swapaxes(0, 1)
  query_positions = jnp.arange(lq_padded).reshape(lq_padded // query_chunk, query_chunk)
  out = jax.lax.map(one_query_chunk, (q_chunks, query_positions))  # [chunks, B, chunk, H, D]
  return out.swapaxes(0, 1).reshape(b, lq_padded, h, d)[:, :lq].astype(q.dtype)


def _pallas_applies(q, k):
  return jax.default_backend() == 'tpu' and q.shape[1] % _PALLAS_BLOCK == 0 and k.shape[1] % _PALLAS_BLOCK == 0


@functools.lru_cache(maxsize=None)
def _pallas_kernel():
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  return flash_attention.flash_attention


def _pallas_tpu(q, k, v, causal):
  if jax.default_backend() != 'tpu':
    raise ValueError("Attention implementation 'pallas_tpu' runs on TPUs only; use 'auto' or 'xla' here.")
  out = _pallas_kernel()(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), causal=causal,
                         sm_scale=q.shape[-1] ** -0.5)
  return out.swapaxes(1, 2)
