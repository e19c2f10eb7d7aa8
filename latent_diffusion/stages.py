"""The five pipeline stages in order, and running them: `all` runs every stage that is not done yet."""

import importlib

import jax

from latent_diffusion import parallel

STAGES = ('autoencoder', 'latents', 'ldm', 'sample', 'eval')
# name -> module with `is_done(config, workdir)` and `run(config, workdir)`, imported when used.
_MODULES = {'autoencoder': 'latent_diffusion.training.autoencoder',
            'latents': 'latent_diffusion.training.latents', 'ldm': 'latent_diffusion.training.ldm',
            'sample': 'latent_diffusion.training.sample', 'eval': 'latent_diffusion.training.evaluate'}


def run(stage, config, workdir):
  """Runs one stage, or with `all` each stage in order that is not done; returns {stage: what happened}."""
  if stage != 'all' and stage not in STAGES:
    raise ValueError(f"Unknown stage '{stage}'; choose 'all' or one of {STAGES}.")
  report = {}
  with jax.set_mesh(parallel.create_mesh(config.mesh)):  # kernel choices read the mesh's devices
    for name in STAGES if stage == 'all' else (stage,):
      module = importlib.import_module(_MODULES[name])
      if stage == 'all' and module.is_done(config, workdir):
        report[name] = 'already done'
        continue
      module.run(config, workdir)
      report[name] = 'ran'
  return report
