"""The `sample` stage: draws the configured prompts (or class ids) with the trained LDM's EMA params.

Writes WORKDIR/samples/: `grid_cfg<scale>.png` per guidance scale (a row per condition, a column per seed),
`samples.npz` (`images` uint8 [N, H, W, 3]; per image its `prompts`, `labels` or `condition_indices`, `seeds`,
`guidance_scales` and any `negative_prompts` (and img2img's `init_images`, `strength` and `mask_images`), the
images of one condition consecutive in the config's order; `ldm_step`), TensorBoard
grids, and on `captioned_shapes` `prompt_agreement.json`.
"""

import json
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from latent_diffusion import files
from latent_diffusion import parallel
from latent_diffusion.data import latent_store
from latent_diffusion.diffusion import generate
from latent_diffusion.models import autoencoder
from latent_diffusion.models import conditioning
from latent_diffusion.training import checkpoint
from latent_diffusion.training import ldm
from latent_diffusion.training import summaries


def output_dir(workdir):
  return os.path.join(workdir, 'samples')


def _saved_request(config, workdir):
  """What `samples.npz` must hold for the current config and newest ldm checkpoint."""
  cond = config.ldm.conditioning
  requests = generate.requests_from_config(config.sampling, cond.kind, cond.concat,
                                           control=config.ldm.controlnet.kind)
  step = checkpoint.latest_saved_step(ldm.checkpoint_dir(workdir))
  saved = {'seeds': requests.seeds, 'guidance_scales': requests.guidance_scales, 'ldm_step': np.array(step)}
  if requests.negative_prompts is not None:
    saved['negative_prompts'] = np.array(requests.negative_prompts)
  if config.sampling.init_images:  # img2img
    saved.update(init_images=np.array(config.sampling.init_images), strength=np.array(config.sampling.strength),
                 mask_images=np.array(config.sampling.mask_images))
  if generate.conditions_are_stored(cond.kind, cond.concat, config.ldm.controlnet.kind):
    key = 'condition_indices'
  else:
    key = 'prompts' if cond.kind in conditioning.TEXT_KINDS else {'class': 'labels'}.get(cond.kind)
  return {key: np.array(requests.conditions), **saved} if key else saved


def is_done(config, workdir):
  """samples.npz exists for the configured conditions, seeds and scales, drawn from the newest ldm checkpoint."""
  path = os.path.join(output_dir(workdir), 'samples.npz')
  if not tf.io.gfile.exists(path):
    return False
  saved = files.read_npz(path)
  return all(k in saved and np.array_equal(saved[k], v) for k, v in _saved_request(config, workdir).items())


def run(config, workdir):
  """Samples every configured (scale, condition, seed) with the newest ldm checkpoint and writes the outputs."""
  mesh = parallel.create_mesh(config.mesh)
  store = latent_store.split_dir(workdir, config.latents.splits[0])
  metadata = latent_store.read_metadata(store)
  if metadata is None:
    raise ValueError(f'No latent store metadata in {store}; run the `latents` and `ldm` stages first.')
  unet, conditioner, params, step = ldm.load_trained(config, workdir, mesh, metadata)
  generator, ae_params = ldm.make_generator(config, workdir, mesh, unet, conditioner, metadata)
  image_size = ldm.sample_latent_shape(config, metadata)[0] * autoencoder.downsampling_factor(
      config.autoencoder.model.ch_mult)
  requests = generate.requests_from_config(config.sampling, conditioner.kind, config.ldm.conditioning.concat,
                                           generate.read_init_images(config.sampling, image_size),
                                           generate.read_masks(config.sampling, image_size),
                                           control=config.ldm.controlnet.kind)
  start = time.time()
  images = generator(params, ae_params, requests)
  seconds = time.time() - start
  logging.info('Sampled %d images (%s, %d steps) from the ldm checkpoint at step %d in %.1f s: %.3g FLOPs per '
               'image, %.3g TFLOP/s.', len(images), config.sampling.sampler, config.sampling.num_steps, step, seconds,
               generator.flops_per_image, generator.flops_per_image * len(images) / seconds / 1e12)
  scalars = ldm.sample_scalars(config, requests, images, generator.condition_source)
  if scalars:
    logging.info('Prompt agreement of the samples: %s', scalars)
  if parallel.is_main_process():
    _write(config, workdir, requests, images, scalars)
  parallel.sync('sample.write')
  return images


def _write(config, workdir, requests, images, scalars):
  directory = output_dir(workdir)
  tf.io.gfile.makedirs(directory)
  columns = len(config.sampling.seeds)
  writer = summaries.create_writer(directory)
  request = _saved_request(config, workdir)
  for scale in dict.fromkeys(requests.guidance_scales.tolist()):
    grid = summaries.image_grid(images[requests.guidance_scales == scale] / 127.5 - 1.0, columns=columns)
    files.write_atomically(os.path.join(directory, f'grid_cfg{scale:g}.png'), tf.io.encode_png(grid).numpy())
    writer.write_images(int(request['ldm_step']), {f'samples/cfg{scale:g}': grid[None]})
  if scalars:
    writer.write_scalars(int(request['ldm_step']), scalars)
    files.write_atomically(os.path.join(directory, 'prompt_agreement.json'), json.dumps(scalars, indent=2))
  writer.flush()
  files.write_npz(os.path.join(directory, 'samples.npz'), {'images': images, **request})
  logging.info('Wrote %s/samples.npz and %d grid(s).', directory, len(set(requests.guidance_scales.tolist())))
