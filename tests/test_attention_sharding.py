"""Attention on a mesh: the shard_map wrapper of the TPU kernels gives unsharded attention's numbers, the splash
kernel (in Pallas' interpreter) pads and masks short contexts exactly, and 'auto' follows the mesh's platform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion import parallel
from latent_diffusion.models import attention


def _qkv(lq, lk, batch=4, heads=4, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, n, heads, dim)), jnp.float32) for n in (lq, lk, lk))


@pytest.mark.parametrize('mesh_shape', [dict(data=2, fsdp=2, tensor=2), dict(data=8, fsdp=1, tensor=1),
                                        dict(data=1, fsdp=2, tensor=4)])
def test_sharded_wrapper_equals_unsharded_attention(mesh_shape):
  q, k, v = _qkv(64, 77)
  expected = attention._reference(q, k, v, False)
  mesh = parallel.create_mesh(mesh_shape)
  kernel = functools.partial(attention._reference, causal=False)
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda q, k, v: attention.on_shards(kernel, q, k, v)).lower(q, k, v)
    out = lowered.compile()(q, k, v)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  text = lowered.as_text()
  # Batch 4 splits over data x fsdp as far as they divide it; 4 heads over tensor when it divides them.
  assert 'sdy.manual_computation' in text or 'shard_map' in text
  with jax.set_mesh(mesh):  # batch 1 (model init) falls back to replicated shards, with the same numbers
    one = jax.jit(lambda q, k, v: attention.on_shards(kernel, q, k, v))(q[:1], k[:1], v[:1])
  np.testing.assert_allclose(one, expected[:1], atol=1e-5)


@pytest.mark.parametrize('lq, lk, causal, dim', [(128, 77, False, 32), (200, 256, False, 32), (77, 77, True, 32),
                                                (128, 128, False, 192)])  # a head over 128 wide: padded to 256
def test_splash_kernel_pads_and_masks_to_the_reference(lq, lk, causal, dim):
  q, k, v = _qkv(lq, lk, batch=2, heads=2, dim=dim, seed=1)
  expected = attention._reference(q, k, v, causal)
  splash = functools.partial(attention._splash, causal=causal, interpret=True)
  np.testing.assert_allclose(splash(q, k, v), expected, atol=1e-5)
  with jax.set_mesh(parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))):
    sharded = jax.jit(lambda q, k, v: attention.on_shards(splash, q, k, v))(q, k, v)
  np.testing.assert_allclose(sharded, expected, atol=1e-5)


def test_auto_follows_the_platform_of_the_mesh_not_the_host():
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  q256, k256, _ = _qkv(256, 256)
  q64, k24, _ = _qkv(64, 24)
  assert attention.choose(q256, k256) == 'reference'  # this host's CPU, no mesh
  with jax.set_mesh(parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))):
    assert attention.platform() == 'cpu' and attention.choose(q256, k256) == 'reference'
  tpu = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices
  with jax.set_mesh(parallel.create_mesh(dict(data=2, fsdp=1, tensor=2), tpu)):
    assert attention.platform() == 'tpu'
    assert attention.choose(q256, k256) == 'pallas_tpu'
    assert attention.choose(q256, k24) == 'xla' and attention.choose(q64, k24) == 'xla'
    with attention.analytic():  # flops.py: matmuls, whatever kernel runs
      assert jax.make_jaxpr(lambda q, k: attention.attention(q, k, k))(q256, k256).eqns[0].primitive.name != \
          'pallas_call'
