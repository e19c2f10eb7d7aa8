"""Attention in one place: every model calls `attention`, so kernels change here only.

`implementation`:
  'xla'        `jax.nn.dot_product_attention`, XLA's own fused attention;
  'reference'  the explicit softmax(q k^T / sqrt(d)) v with a float32 softmax, heads folded into the batch;
  'chunked'    queries in chunks and keys in chunks with an online (running max) softmax, so memory grows with
               the chunk sizes instead of Lq x Lk (Rabe & Staats 2021) - the fallback for long sequences;
  'pallas_tpu' the Pallas TPU flash-attention kernel; 'splash_tpu' the Pallas TPU splash kernel. Both run inside
               `shard_map` over the mesh in context (batch over its batch axes, heads over 'tensor'), since a
               Mosaic kernel cannot be partitioned automatically; lengths are padded to the kernel's 128-token
               blocks, padded keys masked out (segment ids);
  'cudnn'      cuDNN's fused flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs, bf16/fp16);
  'auto'       by the platform the program is compiled for (the devices of the mesh set with `jax.set_mesh`, so a
               CPU host compiling for a TPU slice chooses TPU kernels; without a mesh, the default backend):
               'reference' on CPU (fastest there: benchmarks/unet_train_step.py), on TPU 'pallas_tpu' when both
               lengths are multiples of 128 (else 'xla'), on GPU 'cudnn' where it applies (else 'xla').
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

from latent_diffusion import parallel

IMPLEMENTATIONS = ('auto', 'xla', 'reference', 'chunked', 'pallas_tpu', 'splash_tpu', 'cudnn')
TPU_KERNELS = ('pallas_tpu', 'splash_tpu')
CHUNK = 512  # query and key chunk of 'chunked'
BLOCK = 128  # the TPU kernels' smallest block: lengths are padded to a multiple of it
_ANALYTIC = contextvars.ContextVar('analytic_attention', default=False)


def attention(q, k, v, implementation='auto', causal=False):
  """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D], scale 1/sqrt(D); `causal`: query i sees keys <= i
  (the CLIP text encoder)."""
  if _ANALYTIC.get():
    implementation = 'reference'
  elif implementation == 'auto':
    implementation = choose(q, k)
  if implementation == 'xla':
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='cudnn')
  if implementation == 'reference':
    return _reference(q, k, v, causal)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, causal=causal)
  if implementation in TPU_KERNELS:
    if platform() != 'tpu':
      raise ValueError(f"Attention implementation '{implementation}' runs on TPUs only; use 'auto' or 'xla' here.")
    kernel = _flash if implementation == 'pallas_tpu' else _splash
    return on_shards(functools.partial(kernel, causal=causal), q, k, v)
  raise ValueError(f"Unknown attention implementation '{implementation}'; choose one of {IMPLEMENTATIONS}.")


@contextlib.contextmanager
def analytic():
  """Traces every attention as its plain matmuls, whatever kernel would run: flops.py counts model FLOPs so."""
  token = _ANALYTIC.set(True)
  try:
    yield
  finally:
    _ANALYTIC.reset(token)


def platform():
  """'cpu', 'gpu' or 'tpu': the platform of the mesh in context (`jax.set_mesh`), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def choose(q, k):
  """What 'auto' runs for these shapes on this platform."""
  target = platform()
  if target == 'cpu':  # XLA:CPU runs dot_product_attention ~2.5x slower than 'reference' at 1k tokens
    return 'reference'
  if target == 'tpu':
    sharded = not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1
    suits = q.shape[1] % BLOCK == 0 and k.shape[1] % BLOCK == 0
    return 'pallas_tpu' if sharded and suits else 'xla'
  if target == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0:
    return 'cudnn'
  return 'xla'


def on_shards(kernel, q, k, v):
  """`kernel(q, k, v)` on each device's shard: batch split over the mesh's batch axes that divide it, heads over
  'tensor' when it divides them; replicated over the other axes. Without a mesh in context, called directly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v)
  batch_axes = parallel.batch_axes(mesh, q.shape[0])
  tensor = mesh.shape.get('tensor', 1)
  heads = 'tensor' if tensor > 1 and q.shape[2] % tensor == 0 else None
  spec = jax.sharding.PartitionSpec(batch_axes or None, None, heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


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


def block_size(length, head_dim, largest=512, budget=512 * 128):
  """The largest of 512, 256, 128 that divides a (padded) length with block x head_dim within `budget`: bigger
  blocks mean fewer grid steps, but the backward kernels hold several [block, head_dim] tiles in the 16 MiB of
  scoped VMEM (the KL-f8 autoencoder's 512-wide head at 512 x 512 blocks exceeds it)."""
  return next((b for b in (largest, 256) if length % b == 0 and b * head_dim <= budget), BLOCK)


def _padded(q, k, v):
  """q, k, v [B, H, L, D] with both lengths padded to a multiple of BLOCK and a head wider than BLOCK to a
  multiple of it (the flash kernel refuses other widths, e.g. cin256-v2's 576; zero columns change no product),
  and the kv mask (1 real, 0 padding) when keys were padded."""
  lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
  wide = -d % BLOCK if d > BLOCK else 0
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, n), (0, wide))) if n or wide else a
  q, k, v = pad(q, -lq % BLOCK), pad(k, -lk % BLOCK), pad(v, -lk % BLOCK)
  kv_mask = None
  if lk % BLOCK:
    kv_mask = jnp.broadcast_to((jnp.arange(k.shape[2]) < lk).astype(jnp.int32), (q.shape[0], k.shape[2]))
  return q, k, v, kv_mask


def _flash(q, k, v, causal):
  """The Pallas flash-attention kernel on one shard, [B, L, H, D] in and out."""
  from jax.experimental.pallas.ops.tpu import flash_attention as flash  # pylint: disable=g-import-not-at-top
  lq, d = q.shape[1], q.shape[3]
  q, k, v, kv_mask = _padded(*(a.swapaxes(1, 2) for a in (q, k, v)))
  segment_ids = None
  if kv_mask is not None:
    segment_ids = flash.SegmentIds(q=jnp.ones(q.shape[:1] + q.shape[2:3], jnp.int32), kv=kv_mask)
  bq, bk = block_size(q.shape[2], q.shape[-1]), block_size(k.shape[2], q.shape[-1])
  blocks = flash.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                            block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                            block_k_dq=bk, block_q_dq=bq)
  out = flash.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=d ** -0.5,
                              block_sizes=blocks)
  return out[:, :, :lq, :d].swapaxes(1, 2)


def _splash(q, k, v, causal, interpret=False):
  """The Pallas splash-attention kernel on one shard, [B, L, H, D] in and out (`interpret`: on the CPU)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  lq, heads, d = q.shape[1], q.shape[2], q.shape[3]
  q, k, v, kv_mask = _padded(*(a.swapaxes(1, 2) for a in (q, k, v)))
  shape = (q.shape[2], k.shape[2])
  mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  bq, bk = block_size(shape[0], q.shape[-1]), block_size(shape[1], q.shape[-1])
  blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                             block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  q = q * jnp.asarray(d ** -0.5, q.dtype)  # splash applies no scale of its own
  if kv_mask is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    ids = jax.vmap(lambda kv: splash.SegmentIds(q=jnp.ones(shape[:1], jnp.int32), kv=kv))(kv_mask)
    out = jax.vmap(kernel)(q, k, v, segment_ids=ids)
  return out[:, :, :lq, :d].swapaxes(1, 2)
