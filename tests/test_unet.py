"""The UNet: reference timestep embedding, zero-initialised output, conditioning paths, attention kernels,
and the same output and training step on 1 device and sharded on 8."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion import parallel
from latent_diffusion.models import attention
from latent_diffusion.models import unet as unet_lib
from latent_diffusion.training import train_state

SMALL = dict(model_channels=32, out_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
             num_heads=4)


def inputs(batch=8, size=8, context_len=5, context_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32),
          jnp.asarray(rng.integers(0, 1000, batch)),
          jnp.asarray(rng.normal(size=(batch, context_len, context_dim)), jnp.float32))


def test_timestep_embedding_is_the_reference_formula():
  t = np.array([0, 1, 17, 999])
  dim, half = 8, 4
  freqs = np.exp(-np.log(10_000) * np.arange(half) / half)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(np.asarray(unet_lib.timestep_embedding(jnp.asarray(t), dim)), expected, atol=1e-4)


def perturb(params, scale=0.02):
  """Adds independent noise to every parameter (leaving the zero-initialised layers)."""
  leaves, treedef = jax.tree.flatten(params)
  noise = [np.random.default_rng(i).normal(0, scale, leaf.shape) for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, [leaf + n.astype(np.float32) for leaf, n in zip(leaves, noise)])


def test_output_is_zero_at_init_and_depends_on_every_input():
  model = unet_lib.UNet(**SMALL)
  x, t, context = inputs()
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, context))['params']
  np.testing.assert_array_equal(np.asarray(model.apply({'params': params}, x, t, context)), 0.0)
  params = perturb(params)
  out = model.apply({'params': params}, x, t, context)
  assert float(jnp.abs(out).mean()) > 1e-4
  for changed in (model.apply({'params': params}, x, t + 100, context),
                  model.apply({'params': params}, x, t, context + 1.0),
                  model.apply({'params': params}, x * 0.5, t, context)):
    assert float(jnp.abs(changed - out).max()) > 1e-6


@pytest.mark.parametrize('variant', [
    dict(use_scale_shift_norm=True, resblock_updown=True), dict(num_head_channels=8), dict(remat='all')])
def test_variants_build_and_keep_the_shape(variant):
  model = unet_lib.UNet(**{**SMALL, **variant})
  x, t, context = inputs(batch=2)
  variables = model.init(jax.random.PRNGKey(0), x, t, context)
  assert model.apply(variables, x, t, context).shape == x.shape
  larger = jnp.zeros((2, 16, 24, 4))  # sampling at a larger latent size than training
  assert model.apply(variables, larger, t, context).shape == larger.shape


def _count_checkpoints(jaxpr):
  return sum((e.primitive.name in ('checkpoint', 'remat2')) + sum(
      _count_checkpoints(sub) for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)


@pytest.mark.slow  # 90 s here
def test_remat_per_block_keeps_the_gradients_and_checkpoints_only_those_blocks():
  x, t, context = inputs(batch=2)
  model = unet_lib.UNet(**SMALL)
  params = model.init(jax.random.PRNGKey(0), x, t, context)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x + 0.3, t, context) ** 2)
  expected = jax.grad(loss(model))(params)
  counts = {}
  for remat, policy in (('resblock', 'nothing_saveable'), ('transformer', 'dots_saveable'),
                        ('all', 'nothing_saveable')):
    rematerialised = model.clone(remat=remat, remat_policy=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.grad(loss(rematerialised))(params), expected)
    counts[remat] = _count_checkpoints(jax.make_jaxpr(loss(rematerialised))(params).jaxpr)
  # SMALL has 2 levels x 1 block + 2 middle + 2 x 2 up blocks = 8 ResBlocks, attention in 7 of them.
  assert counts == {'resblock': 8, 'transformer': 7, 'all': 15}
  with pytest.raises(ValueError, match="remat='mlp'"):
    model.clone(remat='mlp').init(jax.random.PRNGKey(0), x, t, context)


def test_class_labels_change_the_output():
  model = unet_lib.UNet(**SMALL, num_classes=10)
  x, t, context = inputs(batch=2)
  variables = model.init(jax.random.PRNGKey(0), x, t, context, jnp.array([1, 2]))
  variables = perturb(variables)  # leave the zero-initialised output
  a = model.apply(variables, x, t, context, jnp.array([1, 2]))
  b = model.apply(variables, x, t, context, jnp.array([3, 2]))
  assert float(jnp.abs(a - b)[0].max()) > 1e-6 and float(jnp.abs(a - b)[1].max()) == 0.0


def test_attention_implementations_agree():
  rng = np.random.default_rng(0)
  for lq, lk in ((6, 9), (64, 77), (130, 130)):
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 4, 8)), jnp.float32) for n in (lq, lk, lk))
    expected = np.asarray(attention.attention(q, k, v, implementation='reference'))
    on_cpu = ('auto', 'xla', 'reference', 'chunked')
    for implementation in on_cpu:
      np.testing.assert_allclose(attention.attention(q, k, v, implementation=implementation), expected, atol=1e-5)
    for chunks in ((4, 5), (16, 16), (lq, lk)):  # chunk sizes that do and do not divide the lengths
      np.testing.assert_allclose(attention.chunked_attention(q, k, v, *chunks), expected, atol=1e-5)
    halves = [attention.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), i)
              for i in ('chunked', 'reference')]
    assert halves[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(halves[0], np.float32), np.asarray(halves[1], np.float32), atol=2e-2)
  for kernel in attention.TPU_KERNELS:
    with pytest.raises(ValueError, match=f"'{kernel}' runs on TPUs only"):
      attention.attention(q, k, v, implementation=kernel)
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    attention.attention(q, k, v, implementation='flash')


def test_causal_attention_agrees_with_a_masked_softmax():
  rng = np.random.default_rng(1)
  for length in (7, 77):
    q, k, v = (rng.normal(size=(2, length, 3, 8)).astype(np.float32) for _ in range(3))
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8)
    logits[..., np.triu_indices(length, 1)[0], np.triu_indices(length, 1)[1]] = -np.inf
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum('bhqk,bkhd->bqhd', weights / weights.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(expected[:, 0], v[:, 0], atol=1e-6)  # the first token sees only itself
    for implementation in ('auto', 'xla', 'reference', 'chunked'):
      np.testing.assert_allclose(attention.attention(q, k, v, implementation, causal=True), expected, atol=1e-5)
    for chunks in ((3, 5), (32, 16)):
      np.testing.assert_allclose(attention.chunked_attention(q, k, v, *chunks, causal=True), expected, atol=1e-5)


@pytest.mark.slow  # 165 s: the default suite keeps test_attention_sharding's and test_parallel's mesh checks
def test_output_and_training_step_equal_on_1_and_8_devices():
  """All three axes at once: the fsdp and tensor rules together (each alone is a special case of the specs)."""
  mesh_shape = dict(data=2, fsdp=2, tensor=2)
  model = unet_lib.UNet(**SMALL)
  x, t, context = inputs()
  tx = optax.adamw(1e-3)

  def init(rng):
    return train_state.TrainState.create(model.init(rng, x[:1], t[:1], context[:1])['params'], tx)

  def step(state, batch):
    def loss_fn(p):
      return jnp.mean((model.apply({'params': p}, batch['x'], batch['t'], batch['context']) - batch['x']) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), loss

  results = []
  for mesh in (parallel.create_mesh(mesh_shape),
               parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])):
    state, shardings = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
    batch = jax.device_put({'x': x, 't': t, 'context': context}, parallel.batch_sharding(mesh))
    state = state.replace(params=jax.device_put(perturb(state.params), shardings.params))  # non-zero output
    run = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)), out_shardings=(shardings, None))
    out = jax.jit(lambda p, b: model.apply({'params': p}, b['x'], b['t'], b['context']))(state.params, batch)
    state, loss1 = run(state, batch)
    _, loss2 = run(state, batch)
    results.append((np.asarray(out), float(loss1), float(loss2), state))
  (out8, a8, b8, s8), (out1, a1, b1, _) = results
  np.testing.assert_allclose(out8, out1, atol=1e-5)
  assert a8 == pytest.approx(a1, rel=1e-5) and b8 == pytest.approx(b1, rel=1e-4)
  q = s8.params['down_0_0_transformer']['block_0']['attn1']['to_q']['kernel']
  heads = ('tensor', 'fsdp')  # both on the heads dimension
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, heads)
  to_out = s8.params['down_0_0_transformer']['block_0']['attn1']['to_out']['kernel']
  assert to_out.sharding.spec == jax.sharding.PartitionSpec(heads, None)
