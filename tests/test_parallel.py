"""Mesh creation, logical-axis sharding rules and sharded state creation on 8 simulated devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from latent_diffusion import parallel
from latent_diffusion.training import train_state


class TinyMLP(nn.Module):
  """Dense layers whose kernels carry logical axis names, as every model of the project does."""

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp'))
    x = nn.Dense(16, kernel_init=init, bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(x)
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('mlp', 'embed'))
    return nn.Dense(8, kernel_init=init, use_bias=False)(nn.gelu(x))


def test_mesh_fills_minus_one_and_rejects_mismatches():
  mesh = parallel.create_mesh(dict(data=-1, fsdp=2, tensor=1))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  with pytest.raises(ValueError, match='needs 16 devices but 8 are present'):
    parallel.create_mesh(dict(data=4, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match='at most one -1'):
    parallel.create_mesh(dict(data=-1, fsdp=-1, tensor=1))
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    parallel.create_mesh(dict(data=-1, fsdp=3, tensor=1))


def test_logical_rules_map_to_mesh_axes_and_drop_what_does_not_divide():
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  # fsdp joins tensor on its dimension (the XLA workaround in LOGICAL_AXIS_RULES), for kernels in either order.
  assert parallel.logical_sharding(('embed', 'mlp'), (8, 16), mesh).spec == P(None, ('tensor', 'fsdp'))
  assert parallel.logical_sharding(('mlp', 'embed'), (16, 8), mesh).spec == P(('tensor', 'fsdp'), None)
  assert parallel.logical_sharding(('embed', 'embed'), (8, 16), mesh).spec == P('fsdp', None)
  # Axes that do not divide are dropped, last first; fsdp never lands beside tensor on another dimension.
  assert parallel.logical_sharding(('embed', 'mlp'), (8, 6), mesh).spec == P(None, 'tensor')
  assert parallel.logical_sharding(('embed', 'mlp'), (8, 5), mesh).spec == P('fsdp', None)
  assert parallel.logical_sharding(('batch', None), (8, 3), mesh).spec == P(('data', 'fsdp'), None)
  assert parallel.logical_sharding(('batch',), (6,), mesh).spec == P('data')
  assert parallel.logical_sharding(('batch',), (5,), mesh).spec == P(None)
  assert parallel.logical_sharding((), (4, 4), mesh).spec == P(None, None)
  # An axis is used at most once per array.
  assert parallel.logical_sharding(('embed', 'conv_in'), (8, 8), mesh).spec == P('fsdp', None)


def test_shard_batch_splits_activations_over_the_batch_axes_that_divide_them():
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  double = jax.jit(lambda a: parallel.shard_batch(2 * a))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  with jax.set_mesh(mesh):
    for batch, shard in ((8, (2, 3)), (6, (3, 3)), (5, (5, 3))):  # over data x fsdp, data alone, none
      y = double(x[:batch])
      assert y.sharding.shard_shape(y.shape) == shard
      np.testing.assert_array_equal(y, 2 * x[:batch])
  np.testing.assert_array_equal(parallel.shard_batch(x), x)  # no mesh in context: unchanged


def test_sharded_state_equals_single_device_state_and_follows_the_rules():
  model = TinyMLP()
  tx = optax.adam(1e-3)

  def init(rng):
    params = model.init(rng, jnp.ones((1, 8)))['params']
    return train_state.TrainState.create(params, tx, ema_max_decay=0.999)

  rng = jax.random.PRNGKey(0)
  mesh8 = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  mesh1 = parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  state8, shardings = parallel.create_sharded(init, mesh8, rng)
  state1, _ = parallel.create_sharded(init, mesh1, rng)
  kernel = state8.params['Dense_0']['kernel']
  assert kernel.sharding.spec == P(None, ('tensor', 'fsdp'))
  assert shardings.opt_state[0].mu['Dense_0']['kernel'].spec == P(None, ('tensor', 'fsdp'))
  assert state8.ema_params['Dense_1']['kernel'].sharding.spec == P(('tensor', 'fsdp'), None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 4)}
  for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('logical_axes', [('embed', 'mlp'), ('mlp', 'embed'), ('embed', 'heads'), ('heads', 'embed')])
def test_dense_layers_sharded_by_the_rules_compute_exactly_on_a_three_axis_mesh(logical_axes):
  # XLA's SPMD partitioner miscomputes x @ w for w sharded (tensor, fsdp) and the result sharded (batch, tensor) on
  # a 2x2x2 mesh: with the rules of before (w of an output projection sharded that way) these gradients were off
  # by up to 752. The rules keep every kernel clear of that pattern, forward and backward.
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32), jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  out_sharding = jax.sharding.NamedSharding(mesh, P(parallel.BATCH_AXES, 'tensor'))

  def loss_and_grads(x, w):
    f = lambda x, w: jnp.sum(jax.lax.with_sharding_constraint(x @ w, out_sharding) ** 2)
    return jax.value_and_grad(f, argnums=(0, 1))(x, w)

  expected = jax.jit(loss_and_grads)(x, w)
  x8 = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(parallel.BATCH_AXES, 'tensor')))
  w8 = jax.device_put(w, parallel.logical_sharding(logical_axes, w.shape, mesh))
  for got, want in zip(jax.tree.leaves(jax.jit(loss_and_grads)(x8, w8)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)
