"""Frechet Inception Distance as pytorch-fid computes it (float64 on the host), and statistics files in its
`.npz` format (`mu`, `sigma`), so published reference statistics work unchanged."""

import warnings

from absl import logging
import numpy as np
import scipy.linalg
import tensorflow as tf

from latent_diffusion import files


def statistics(features):
  """pool3 features [N, 2048] -> (mu, sigma) in float64 (np.cov, unbiased), as pytorch-fid."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f'FID statistics need at least 2 feature vectors [N, D]; got shape {features.shape}.')
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix):
  with warnings.catch_warnings():  # a near-singular product is detected below, as pytorch-fid does
    warnings.simplefilter('ignore', RuntimeWarning)
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)); an eps offset when the product's root is not finite, and an
  error when its imaginary part is not negligible (both as pytorch-fid)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'FID statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma '
                     f'{sigma1.shape} vs {sigma2.shape}; were both made from pool3 (2048) features?')
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning('FID: singular product; adding %g to the diagonal of the covariances.', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: imaginary component {np.max(np.abs(covmean.imag))} in the covariance root.')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_statistics(path, mu, sigma, **extra):
  """pytorch-fid's `.npz` (`mu`, `sigma`), plus any extra arrays (e.g. `features` for precision/recall)."""
  files.write_npz(path, {'mu': np.asarray(mu), 'sigma': np.asarray(sigma), **extra})


def load_statistics(path):
  """{'mu', 'sigma', ...} of a statistics file, with an error naming a missing or malformed file."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'FID reference statistics {path!r} not found (eval.reference_stats). Make them with '
                            '`python -m latent_diffusion.evaluation.reference_stats --config=... --out=FILE`, '
                            'use a published pytorch-fid .npz, or leave eval.reference_stats empty to compute '
                            'them from data.eval_split.')
  try:
    stats = files.read_npz(path)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable .npz statistics file ({e}).') from e
  if 'mu' not in stats or 'sigma' not in stats:
    raise ValueError(f'{path} holds {sorted(stats)}, not FID statistics (`mu`, `sigma`).')
  return stats
