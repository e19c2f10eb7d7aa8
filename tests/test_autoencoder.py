"""First stage: architecture shapes, posterior KL, vector quantiser, GAN losses, adaptive weight, sharded step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from latent_diffusion import config_lib
from latent_diffusion import parallel
from latent_diffusion.losses import autoencoder as losses
from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.models import discriminator as discriminator_lib
from latent_diffusion.training import autoencoder as stage


@pytest.mark.parametrize('name', sorted(config_lib.AUTOENCODERS))
def test_latent_shapes_of_every_paper_variant(name):
  config = config_lib.autoencoder(name)
  model = autoencoder_lib.create_autoencoder(config.model)
  factor = int(name.split('-')[1][1:])
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), jax.random.PRNGKey(1)))
  latent = jax.eval_shape(lambda v, x: model.apply(v, x, method='encode'), variables, x)
  channels = config.model.embed_dim * (2 if name.startswith('kl') else 1)
  assert latent.shape == (2, 256 // factor, 256 // factor, channels)
  z = jax.ShapeDtypeStruct((2, 256 // factor, 256 // factor, config.model.embed_dim), jnp.float32)
  assert jax.eval_shape(lambda v, z: model.apply(v, z, method='decode'), variables, z).shape == x.shape


@pytest.mark.parametrize('scale', [2, 0.5])
def test_attention_is_placed_by_the_configured_resolution(scale):
  """kl-f16's first stage (attention at 16 of 256: its third level) trained at 64 px keeps running its attention
  blocks on latents twice and half the training size, as the reference (curr_res) does: altering any attention
  block's params changes the decoded image."""
  model_config = config_lib.autoencoder('kl-f16').model
  model_config.update(ch=32, num_res_blocks=1, resolution=64)  # attention where the features are 16: level 2
  model = autoencoder_lib.create_autoencoder(model_config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jax.random.PRNGKey(1))['params']
  attention = sorted(k for k in params['decoder'] if k.startswith('up_') and '_attn_' in k)
  assert attention == ['up_2_attn_0', 'up_2_attn_1']
  size = int(64 // 16 * scale)
  z = jax.random.normal(jax.random.PRNGKey(2), (1, size, size, model_config.embed_dim))
  decode_fn = jax.jit(lambda p: model.apply({'params': p}, z, method='decode'))  # one compile for every variant
  decode = lambda p: np.asarray(decode_fn(p))
  image = decode(params)
  assert image.shape == (1, 16 * size, 16 * size, 3)
  for name in attention:
    altered = jax.tree.map(lambda x: x, params)
    altered['decoder'] = {**params['decoder'], name: jax.tree.map(lambda w: w * 3.0 + 0.1, params['decoder'][name])}
    assert np.abs(decode(altered) - image).max() > 1e-3, name
  x = jax.random.uniform(jax.random.PRNGKey(3), (1, 16 * size, 16 * size, 3), minval=-1, maxval=1)
  assert model.apply({'params': params}, x, method='encode').shape == (1, size, size, 2 * model_config.embed_dim)


def test_diagonal_gaussian_kl_matches_torch_distributions():
  rng = np.random.default_rng(0)
  moments = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)
  moments[..., 3:] *= 3  # logvar spread
  posterior = autoencoder_lib.DiagonalGaussian(jnp.asarray(moments))
  mean, logvar = torch.from_numpy(moments[..., :3]), torch.from_numpy(moments[..., 3:])
  q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
  expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(posterior.kl()), expected.numpy(), rtol=1e-5)
  clamped = autoencoder_lib.DiagonalGaussian(jnp.concatenate([jnp.zeros((1, 2)), jnp.array([[-50.0, 40.0]])], -1))
  np.testing.assert_allclose(np.asarray(clamped.logvar), [[-30.0, 20.0]])
  samples = posterior.sample(jax.random.PRNGKey(0))
  assert not np.allclose(np.asarray(samples), np.asarray(posterior.mode()))


def test_vector_quantizer_terms_and_straight_through_gradient():
  codebook = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]], np.float32)
  z = np.array([[[[0.2, -0.1], [0.9, 1.3]], [[-0.8, 1.5], [0.6, 0.7]]]], np.float32)  # [1, 2, 2, 2]
  quantizer = autoencoder_lib.VectorQuantizer(n_embed=3, embed_dim=2, beta=0.25)
  params = {'embedding': jnp.asarray(codebook)}
  z_q, info = quantizer.apply({'params': params}, z)
  np.testing.assert_array_equal(np.asarray(info['indices']), [[[0, 1], [2, 1]]])
  nearest = codebook[[0, 1, 2, 1]].reshape(z.shape)
  np.testing.assert_allclose(np.asarray(z_q), nearest, atol=1e-6)
  mse = np.mean((z - nearest) ** 2)
  np.testing.assert_allclose(info['codebook_loss'], mse, rtol=1e-6)
  np.testing.assert_allclose(info['vq_loss'], 1.25 * mse, rtol=1e-6)
  np.testing.assert_allclose(info['perplexity'], np.exp(-(0.25 * np.log(0.25) * 2 + 0.5 * np.log(0.5))), rtol=1e-5)

  weights = np.random.default_rng(0).normal(size=z.shape).astype(np.float32)
  grad_z = jax.grad(lambda z: jnp.sum(quantizer.apply({'params': params}, z)[0] * weights))(jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(grad_z), weights, rtol=1e-6)  # straight-through: identity
  loss = lambda p, z: quantizer.apply({'params': p}, z)[1]['vq_loss']
  grad_codebook = jax.grad(loss)(params, jnp.asarray(z))['embedding']
  expected = np.zeros_like(codebook)
  for index, vector in zip([0, 1, 2, 1], z.reshape(-1, 2)):
    expected[index] += 2 * (codebook[index] - vector) / z.size  # codebook term only
  np.testing.assert_allclose(np.asarray(grad_codebook), expected, rtol=1e-5, atol=1e-7)
  grad_commit = jax.grad(loss, argnums=1)(params, jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(grad_commit), 0.25 * 2 * (z - nearest) / z.size, rtol=1e-5, atol=1e-7)


def test_discriminator_losses_on_known_logits():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.75))
  softplus = lambda v: np.log1p(np.exp(v))
  expected = 0.5 * (np.mean(softplus(-np.array([2.0, 0.5]))) + np.mean(softplus(np.array([-2.0, 0.5]))))
  assert float(losses.vanilla_d_loss(real, fake)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.hinge_d_loss(jnp.array([1.5]), jnp.array([-1.5]))) == 0.0


def test_patchgan_layout_and_init():
  disc = discriminator_lib.NLayerDiscriminator(ndf=64, n_layers=3)
  variables = nn.meta.unbox(disc.init(jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), train=False))
  params = variables['params']
  assert [params[f'conv_{n}']['kernel'].shape[-1] for n in range(4)] == [64, 128, 256, 512]
  assert 'bias' not in params['conv_1'] and 'norm_1' in variables['batch_stats']
  kernel = np.asarray(params['conv_2']['kernel'])
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.001
  logits, _ = disc.apply(variables, jnp.zeros((2, 64, 64, 3)), train=True, mutable=['batch_stats'])
  assert logits.shape == (2, 6, 6, 1)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6


def tiny_config(kind='kl'):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.autoencoder = config_lib.autoencoder('kl-f4' if kind == 'kl' else 'vq-f4', smoke=True)
  config.autoencoder.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3)
  config.autoencoder.loss.update(disc_start=0, disc_weight=0.5, disc_ndf=8, disc_num_layers=2)
  config.autoencoder.total_steps = 10
  return config


def _setup(config, mesh):
  model = autoencoder_lib.create_autoencoder(config.autoencoder.model)
  disc = discriminator_lib.NLayerDiscriminator(ndf=config.autoencoder.loss.disc_ndf,
                                               n_layers=config.autoencoder.loss.disc_num_layers)
  init = stage.make_init(config, model, disc, (16, 16, 3))
  state, shardings = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
  step = jax.jit(stage.make_train_step(config, model, disc, None), in_shardings=(
      shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)), out_shardings=(shardings, None))
  return model, disc, state, step


def _batch(mesh):
  images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
  return {'image': jax.device_put(images, parallel.batch_sharding(mesh))}


@pytest.mark.slow  # 50 s here
def test_adaptive_weight_equals_the_ratio_of_gradient_norms_by_hand():
  config = tiny_config()
  config.autoencoder.loss.disc_factor = 0.5  # the reference's disc_factor scales both adversarial terms
  mesh = parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  model, disc, state, step = _setup(config, mesh)
  batch, rng = _batch(mesh), jax.random.PRNGKey(7)
  _, metrics = step(state, batch, rng)

  sample_rng, dropout_rng = jax.random.split(rng)
  x = batch['image']
  params = state.generator.params

  def reconstruct(ae_params):
    return model.apply({'params': ae_params}, x, sample_rng, sample_posterior=True, deterministic=False,
                       rngs={'dropout': dropout_rng})[0]

  def nll(ae_params):
    rec = jnp.abs(x - reconstruct(ae_params))
    return jnp.sum(rec / jnp.exp(params['logvar']) + params['logvar']) / x.shape[0]

  def g_loss(ae_params):
    logits, _ = disc.apply({'params': state.discriminator.params, 'batch_stats': state.disc_batch_stats},
                           reconstruct(ae_params), train=True, mutable=['batch_stats'])
    return -jnp.mean(logits)

  last = lambda g: g['decoder']['conv_out']['kernel']
  grad_nll = last(jax.grad(nll)(params['autoencoder']))
  grad_g = last(jax.grad(g_loss)(params['autoencoder']))
  expected = np.linalg.norm(grad_nll) / (np.linalg.norm(grad_g) + 1e-4) * config.autoencoder.loss.disc_weight
  assert float(metrics['d_weight']) == pytest.approx(float(expected), rel=1e-4)
  assert float(metrics['disc_factor']) == 0.5
  assert float(metrics['nll_loss']) == pytest.approx(float(nll(params['autoencoder'])), rel=1e-5)
  expected_loss = metrics['nll_loss'] + 1e-6 * metrics['reg_loss'] + 0.5 * metrics['d_weight'] * metrics['g_loss']
  assert float(metrics['loss']) == pytest.approx(float(expected_loss), rel=1e-5)


def test_disc_start_gates_the_adversarial_terms():
  config = tiny_config()
  config.autoencoder.loss.disc_start = 5
  mesh = parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  _, _, state, step = _setup(config, mesh)
  new_state, metrics = step(state, _batch(mesh), jax.random.PRNGKey(0))
  assert float(metrics['disc_factor']) == 0.0 and float(metrics['disc_loss']) == 0.0
  for a, b in zip(jax.tree.leaves(state.discriminator.params), jax.tree.leaves(new_state.discriminator.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # zero gradient: Adam leaves params unchanged
  assert float(metrics['loss']) == pytest.approx(float(metrics['nll_loss'] + 1e-6 * metrics['reg_loss']), rel=1e-6)


@pytest.mark.slow  # 60-80 s each here; test_unet's 3-axis mesh check is the whole-model one (slow too)
@pytest.mark.parametrize('kind', ['kl', 'vq'])
def test_train_step_sharded_on_8_devices_equals_1_device(kind):
  config = tiny_config(kind)
  mesh8 = parallel.create_mesh(dict(data=4, fsdp=2, tensor=1))
  mesh1 = parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  results = []
  for mesh in (mesh8, mesh1):
    _, _, state, step = _setup(config, mesh)
    history = []
    for i in range(2):
      state, metrics = step(state, _batch(mesh), jax.random.PRNGKey(i))
      history.append(metrics)
    results.append((history, state))
  (h8, s8), (h1, s1) = results
  for m8, m1 in zip(h8, h1):  # the second step's values also check the first update
    for key in ('loss', 'nll_loss', 'disc_loss', 'd_weight', 'reg_loss', 'logits_fake'):
      assert float(m8[key]) == pytest.approx(float(m1[key]), rel=1e-4, abs=1e-6), key
  # Adam moves each weight by about lr * sign(grad), so near-zero gradients may differ by up to 2 lr per step.
  bound = 2 * 2 * config.autoencoder.optimizer.learning_rate
  for a, b in zip(jax.tree.leaves(s8.generator.params), jax.tree.leaves(s1.generator.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=bound)
  kernel = s8.generator.params['autoencoder']['decoder']['up_1_block_0']['conv1']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, 'fsdp')  # on conv_out: parallel.py
