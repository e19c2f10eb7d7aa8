"""FID and friends of generated images against real ones: Inception features of a reference split (cached in
the workdir), fresh samples conditioned like the reference images, and the metrics of their features. Shared by
the `eval` stage and the periodic evaluation of `ldm` training."""

import os
import time

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from latent_diffusion import parallel
from latent_diffusion.data import latent_store
from latent_diffusion.data import sources
from latent_diffusion.diffusion import generate
from latent_diffusion.evaluation import features as features_lib
from latent_diffusion.evaluation import fid
from latent_diffusion.evaluation import sample_metrics
from latent_diffusion.models import conditioning
from latent_diffusion.weights import inception as inception_weights


def output_dir(workdir):
  return os.path.join(workdir, 'eval')


def guidance_scale(config):
  """eval.guidance_scale, or the first of sampling.guidance_scales when it is 0."""
  scale = config.eval.guidance_scale
  return float(scale if scale > 0 else config.sampling.guidance_scales[0])


def with_eval_sampler(config):
  """A copy of `config` whose sampling section draws as the eval stage does (eval.sampler, eval.num_steps)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.sampling.sampler = config.eval.sampler or config.sampling.sampler
  config.sampling.num_steps = config.eval.num_steps or config.sampling.num_steps
  return config


class Evaluator:
  """Inception features and the real reference of one workdir; FID and friends of any batch of images."""

  def __init__(self, config, workdir, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    variables = inception_weights.load_default(config.eval.inception_weights)  # fails before any compute
    self.extract = features_lib.Extractor(variables, mesh, config.eval.preprocessing)
    self._reference = None

  def reference(self):
    """{'mu', 'sigma'[, 'features']}: eval.reference_stats if set, else the first eval.num_reference images of
    eval.reference_split, computed once into WORKDIR/eval/reference_<split>_<n>_<preprocessing>.npz."""
    if self._reference is None:
      e = self.config.eval
      if e.reference_stats:
        self._reference = fid.load_statistics(e.reference_stats)
      else:
        name = f'reference_{e.reference_split}_{e.num_reference}_{e.preprocessing}.npz'
        path = os.path.join(output_dir(self.workdir), name)
        if not tf.io.gfile.exists(path):
          start = time.time()
          real = self.extract(features_lib.dataset_batches(self.config.data, e.reference_split, e.batch_size,
                                                           e.num_reference))['pool3']
          logging.info('Reference statistics of %d images of %s in %.1f s -> %s', len(real), e.reference_split,
                       time.time() - start, path)
          if parallel.is_main_process():
            tf.io.gfile.makedirs(output_dir(self.workdir))
            fid.save_statistics(path, *fid.statistics(real), features=real.astype(np.float32))
          parallel.sync('eval.reference')
        self._reference = fid.load_statistics(path)
    return self._reference

  def metrics(self, out):
    """FID (and IS, precision/recall where the weights and reference allow) of extracted features."""
    ref = self.reference()
    scalars = {'fid': fid.frechet_distance(*fid.statistics(out['pool3']), ref['mu'], ref['sigma'])}
    if 'logits' in out and len(out['logits']) >= 10:
      scalars['inception_score'], scalars['inception_score_std'] = sample_metrics.inception_score(out['logits'])
    k = self.config.eval.precision_recall_k
    if 'features' in ref and min(len(ref['features']), len(out['pool3'])) > k:
      scalars['precision'], scalars['recall'] = sample_metrics.precision_recall(ref['features'], out['pool3'], k)
    return scalars


def eval_requests(config, workdir, num_samples):
  """`num_samples` fresh requests conditioned like the reference images: the captions or labels of the first
  examples of eval.reference_split (cycled if it is shorter), seeds 0..N-1, one guidance scale."""
  cond = config.ldm.conditioning
  if generate.conditions_are_stored(cond.kind, cond.concat, config.ldm.controlnet.kind):
    store, _ = latent_store.load(latent_store.split_dir(workdir, config.sampling.condition_split))
    conditions = list(range(len(next(iter(store.values())))))
  elif cond.kind in conditioning.TEXT_KINDS + ('class',):
    source = sources.create_source(config.data, config.eval.reference_split)  # every host reads the same
    key = 'caption' if cond.kind in conditioning.TEXT_KINDS else 'label'
    usable = lambda example: example['skip'] == 0 if 'skip' in example else tf.constant(True)  # data.files' skips
    examples = source.ordered().enumerate().map(lambda _, record: source.decode(record)).filter(usable)
    records = examples.take(num_samples).map(lambda example: example[key])
    conditions = [c.decode() if isinstance(c, bytes) else int(c) for c in records.as_numpy_iterator()]
  else:
    conditions = ['']
  conditions = [conditions[i % len(conditions)] for i in range(num_samples)]
  return generate.Requests(conditions=conditions, seeds=np.arange(num_samples, dtype=np.int32),
                           guidance_scales=np.full(num_samples, guidance_scale(config), np.float32))


def sample_features(config, evaluator, generator, params, ae_params, requests, scalars_fn, chunk):
  """Features of freshly drawn images, `chunk` images at a time (memory stays bounded at paper scale), and the
  image-weighted mean of `scalars_fn(requests, images)` (prompt agreement on the built-in dataset)."""
  outs, agreement = [], []
  for start in range(0, len(requests.seeds), chunk):
    rows = slice(start, start + chunk)
    part = generate.Requests(requests.conditions[rows], requests.seeds[rows], requests.guidance_scales[rows])
    images = generator(params, ae_params, part)
    outs.append(evaluator.extract(features_lib.array_batches(images, config.eval.batch_size)))
    scalars = scalars_fn(part, images)
    if scalars:
      agreement.append((len(images), scalars))
  out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  total = sum(n for n, _ in agreement)
  mean = {k: sum(n * s[k] for n, s in agreement) / total for k in agreement[0][1]} if agreement else {}
  return out, mean
