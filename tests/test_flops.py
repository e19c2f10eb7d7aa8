"""Analytic FLOPs from the jaxpr: exact for matmuls and convolutions, loops counted per iteration, a train step
about 3x its forward pass, and close to XLA's own count for the UNet; peak FLOP/s by device kind."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from latent_diffusion import flops
from latent_diffusion.models import attention
from latent_diffusion.models import unet as unet_lib


def test_matmul_conv_and_loops_are_counted_exactly():
  assert flops.count(lambda x, w: x @ w, jnp.zeros((4, 8)), jnp.zeros((8, 16))) == 2 * 4 * 8 * 16
  batched = flops.count(lambda x, w: jnp.einsum('bqd,bkd->bqk', x, w), jnp.zeros((3, 5, 8)), jnp.zeros((3, 7, 8)))
  assert batched == 2 * 3 * 5 * 7 * 8
  conv = nn.Conv(16, (3, 3), strides=2)
  params = conv.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 4)))
  assert flops.count(lambda p, x: conv.apply(p, x), params, jnp.zeros((2, 8, 8, 4))) == 2 * 2 * 4 * 4 * 16 * 9 * 4

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]
  assert flops.count(scanned, jnp.zeros((4, 8)), jnp.zeros((8, 8))) == 5 * 2 * 4 * 8 * 8
  assert flops.count(jax.jit(lambda x, w: x @ w), jnp.zeros((4, 8)), jnp.zeros((8, 16))) == 2 * 4 * 8 * 16

  def part_of_a_pullback(x, w):  # only w's gradient is kept: the forward product and x's gradient are dead code
    y, pullback = jax.vjp(lambda x, w: x @ w, x, w)
    return pullback(jnp.ones_like(y))[1]
  assert flops.count(part_of_a_pullback, jnp.zeros((4, 8)), jnp.zeros((8, 16))) == 2 * 4 * 8 * 16  # x^T @ ones


def test_unet_train_step_is_about_three_forward_passes_and_near_xla_s_count():
  model = unet_lib.UNet(64, 4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=4)
  x, t, context = jnp.zeros((8, 8, 8, 4)), jnp.zeros((8,), jnp.int32), jnp.zeros((8, 24, 128))
  params = model.init(jax.random.PRNGKey(0), x, t, context)
  forward = flops.count(lambda p: model.apply(p, x, t, context), params)
  train = flops.count(jax.grad(lambda p: jnp.sum(model.apply(p, x, t, context) ** 2)), params)
  assert 2.9 < train / forward < 3.05  # backward: 2x the forward matmuls (the first conv needs no input grad)
  cost = jax.jit(lambda p: model.apply(p, x, t, context)).lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)['flops']
  assert forward == pytest.approx(xla, rel=0.15)
  remat = model.clone(remat='all')  # recomputes every block's forward pass: counted, as executed
  assert 1.2 < flops.count(jax.grad(lambda p: jnp.sum(remat.apply(p, x, t, context) ** 2)), params) / train < 1.4


@pytest.mark.parametrize('kind,peak', [('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5p', 459e12),
                                       ('TPU v6 lite', 918e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                       ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H200', 989e12), ('cpu', None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert flops.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_attention_counts_as_its_matmuls_whichever_kernel_runs():
  q = jnp.zeros((2, 256, 4, 32))
  expected = 2 * (2 * 2 * 4 * 256 * 256 * 32)  # q k^T and weights v
  for implementation in ('reference', 'xla', 'chunked', 'pallas_tpu', 'splash_tpu'):
    assert flops.count(lambda q: attention.attention(q, q, q, implementation), q) == expected
  jitted = jax.jit(lambda q: attention.attention(q, q, q, 'auto'))
  jitted(q)  # traced once outside analytic(): the count must not reuse that trace
  assert flops.count(jitted, q) == expected
