"""Inception Score (Salimans et al. 2016) and improved precision/recall (Kynkaanniemi et al. 2019) of features."""

import numpy as np
import scipy.special


def inception_score(logits, splits=10):
  """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))), from the 1008 Inception logits."""
  logits = np.asarray(logits, np.float64)
  if len(logits) < splits:
    raise ValueError(f'The Inception Score needs at least {splits} images (one per split); got {len(logits)}.')
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for part in np.array_split(log_p, splits):
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a, b):
  return np.maximum(np.sum(a * a, 1)[:, None] - 2 * a @ b.T + np.sum(b * b, 1)[None, :], 0.0)


def _radii(features, k, batch_size):
  """Distance of every feature to its k-th nearest other feature (the radius of its manifold ball)."""
  radii = []
  for start in range(0, len(features), batch_size):
    d = _squared_distances(features[start:start + batch_size], features)
    radii.append(np.sqrt(np.partition(d, k, axis=1)[:, k]))  # index 0 is the point itself
  return np.concatenate(radii)


def _coverage(manifold, radii, queries, batch_size):
  """Fraction of `queries` inside at least one ball of the manifold."""
  inside = []
  for start in range(0, len(queries), batch_size):
    d = np.sqrt(_squared_distances(queries[start:start + batch_size], manifold))
    inside.append(np.any(d <= radii[None, :], axis=1))
  return float(np.mean(np.concatenate(inside)))


def precision_recall(real, fake, k=3, batch_size=1024):
  """Precision: fake samples inside the real manifold; recall: real samples inside the fake manifold."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f'Precision/recall with k={k} needs more than {k} real and fake features; got '
                     f'{len(real)} and {len(fake)}.')
  precision = _coverage(real, _radii(real, k, batch_size), fake, batch_size)
  recall = _coverage(fake, _radii(fake, k, batch_size), real, batch_size)
  return precision, recall
