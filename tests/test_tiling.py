"""The tiled first stage (autoencoder.tiling, the reference's split_input_params): weights, stitching, agreement."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import txt2img
from latent_diffusion import config_lib
from latent_diffusion import validate
from latent_diffusion.models import autoencoder
from latent_diffusion.models import tiling
from latent_diffusion.training import latents


def tiles(size, stride):
  return ml_collections.ConfigDict(dict(size=size, stride=stride, min_weight=0.01, max_weight=0.5))


def test_border_weights_are_the_distance_to_the_nearest_border_clipped():
  w = tiling.border_weights(5, 9, 0.01, 0.5)
  # Rows are normalised by 4, columns by 8: (1, 2) is 1/4 from the top and 2/8 from the left.
  np.testing.assert_allclose(w[1, 2], 0.25)
  np.testing.assert_allclose(w[2, 4], 0.5)  # the centre
  np.testing.assert_allclose(w[2, 1], 0.125)
  np.testing.assert_allclose(w[0], 0.01)  # clipped up at the border
  np.testing.assert_allclose(tiling.border_weights(5, 5, 0.01, 0.2)[2, 2], 0.2)  # clipped down at the centre


@pytest.mark.parametrize('size, stride', [(8, 4), (8, 8), (8, 2), (32, 32)])
def test_crops_of_a_pixelwise_stage_stitch_back_to_the_whole_image(size, stride):
  """A decoder and an encoder that see no neighbours give every crop the whole image's values: the blend is exact."""
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  decode = lambda v: jnp.repeat(jnp.repeat(jnp.tanh(2 * v + 1), 4, axis=1), 4, axis=2)  # f = 4
  np.testing.assert_allclose(tiling.tiled(decode, z, size, stride), decode(z), atol=1e-6)
  x = decode(z)
  encode = lambda v: v.reshape(v.shape[0], v.shape[1] // 4, 4, v.shape[2] // 4, 4, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(tiling.tiled(encode, x, 4 * size, 4 * stride), encode(x), atol=1e-6)


def test_crops_that_do_not_end_at_the_side_are_refused():
  with pytest.raises(ValueError, match='autoencoder.tiling.stride: crops of 8 every 3 do not end at the side of 16'):
    tiling.crop_starts(16, 8, 3)
  assert tiling.crop_starts(16, 8, 4) == ([0, 4, 8], 8)
  assert tiling.crop_starts(6, 8, 4) == ([0], 6)  # a side no longer than a crop is one crop
  config = txt2img.get_config('smoke')
  config.autoencoder.tiling.update(size=4, stride=3)
  config.sampling.latent_size = 12  # sampled latents are decoded in crops too
  assert validate.problems(config) == [
      'autoencoder.tiling.stride: crops of 4 every 3 do not end at the side of 8; choose a stride that divides 4.',
      'autoencoder.tiling.stride: crops of 4 every 3 do not end at the side of 12; choose a stride that divides 8.']
  config.autoencoder.tiling.update(stride=5, min_weight=0.0)
  assert validate.problems(config) == ['autoencoder.tiling.stride=5 must be an integer in [1, 4].',
                                       'autoencoder.tiling.min_weight=0.0 must be a finite number in (0, 0.5].']


def test_a_tiled_first_stage_agrees_with_the_whole_image_and_blending_halves_the_seams():
  """Random smoke KL-f4 weights without the middle attention (whose reach is the whole image): the latents stage's
  encoder and the sampler's decoder in crops, against the whole image."""
  model_config = config_lib.autoencoder('kl-f4', smoke=True).model
  model_config.mid_attention = False
  model = autoencoder.create_autoencoder(model_config)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 128, 128, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(1), x[:, :32, :32], jax.random.PRNGKey(2))['params']
  z = jax.random.normal(jax.random.PRNGKey(3), (1, 32, 32, 3))
  whole = jax.jit(lambda p, v: model.apply({'params': p}, v, method='decode'))(params, z)
  errors = {}
  for size, stride in ((16, 8), (16, 16)):
    decoded = jax.jit(lambda p, v, t=tiles(size, stride): tiling.decode(model, p, v, t))(params, z)
    errors[size, stride] = float(jnp.abs(decoded - whole)[:, 32:-32, 32:-32].mean())
  # Measured: 0.081 (crops of 16 every 8), 0.161 (16 every 16: hard seams; crops of 8 every 4: 0.197); std 0.34.
  assert errors[16, 8] < 0.3 * float(whole.std())
  assert errors[16, 8] < 0.6 * errors[16, 16]

  encode = latents.make_encode(model, 'kl', '', tiles(16, 8))
  moments = jax.jit(lambda p, v: model.apply({'params': p}, v, method='encode'))(params, x)
  error = float(jnp.abs(encode(params, x, None)['latent'] - moments)[:, 8:-8, 8:-8].mean())
  assert error < 0.3 * float(moments.std())  # measured 0.033 against a std of 0.18
