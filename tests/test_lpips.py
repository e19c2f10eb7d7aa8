"""LPIPS parity with the `lpips` package (random VGG16, the package's shipped lin layers) and the weights file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latent_diffusion.losses import lpips
from latent_diffusion.weights import lpips as lpips_weights
from tests import torch_reference


@pytest.fixture(scope='module')
def reference_and_params():
  torch.manual_seed(0)
  reference = torch_reference.import_lpips().LPIPS(net='vgg', pnet_rand=True, verbose=False).eval()
  # The reference keeps torchvision's layer indices ('slice3.10.weight' is features.10): the .pth layout.
  vgg = {'features.' + k.split('.', 1)[1]: v.numpy() for k, v in reference.net.state_dict().items()}
  lin = {k: v.numpy() for k, v in reference.state_dict().items() if k.startswith('lin') and '.model.1.' in k
         and not k.startswith('lins')}
  return reference, lpips_weights.convert(vgg, lin)


@pytest.mark.parametrize('size', [32, 64, 67])
def test_lpips_matches_the_reference_package(reference_and_params, size):
  reference, params = reference_and_params
  rng = np.random.default_rng(size)
  x = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
  ours = jax.jit(lpips.lpips_fn(params))(x, y)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy().reshape(-1), atol=1e-4)
  assert float(jnp.min(ours)) > 0
  np.testing.assert_allclose(np.asarray(lpips.lpips_fn(params)(x, x)), 0.0, atol=1e-6)


def test_lpips_gradient_is_finite_for_identical_images_and_zero_features(reference_and_params):
  _, params = reference_and_params
  x = jnp.zeros((1, 32, 32, 3)) - 1.0  # dark images: many VGG features are exactly zero
  grad = jax.grad(lambda y: jnp.sum(lpips.lpips_fn(params)(x, y)))(x)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_weights_file_round_trip_and_clear_errors(reference_and_params, tmp_path):
  _, params = reference_and_params
  path = tmp_path / 'lpips_vgg.msgpack'
  lpips_weights.save(params, path)
  loaded = lpips_weights.load(path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match='vgg16-397923af.pth.*perceptual_weight=0'):
    lpips_weights.load(tmp_path / 'missing.msgpack')
  (tmp_path / 'bad.msgpack').write_bytes(b'\x80')
  with pytest.raises(ValueError, match='is not an LPIPS weights file'):
    lpips_weights.load(tmp_path / 'bad.msgpack')
