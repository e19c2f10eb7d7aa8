"""The five pipeline stages in order, and running them: `all` runs every stage that is not done yet."""

import importlib

import jax

from latent_diffusion import parallel

STAGES = ('autoencoder', 'latents', 'ldm', 'sample', 'eval')
# name -> module with `is_done(config, workdir)` and `run(config, workdir)`, imported when used.
_MODULES = {'autoencoder': 'latent_diffusion.training.autoencoder',
            'latents': 'latent_diffusion.training.latents', 'ldm': 'latent_diffusion.training.ldm',
            'sample': 'latent_diffusion.training.sample', 'eval': 'latent_diffusion.training.evaluate'}


def selected(stage):
  """The stages `stage` names: `all`, one stage, or a comma-separated list of them (run in pipeline order)."""
  if stage == 'all':
    return STAGES
  names = [name.strip() for name in stage.split(',')]
  unknown = [name for name in names if name not in STAGES]
  if unknown:
    raise ValueError(f"Unknown stage '{','.join(unknown)}' in --stage={stage}; choose 'all', or one or more of "
                     f"{STAGES} separated by commas.")
  return tuple(name for name in STAGES if name in names)


def run(stage, config, workdir):
  """Runs the stages `stage` names (see `selected`), each even if done; with `all`, each in order that is not
  done yet. Returns {stage: what happened}."""
  report = {}
  names = selected(stage)
  with jax.set_mesh(parallel.create_mesh(config.mesh)):  # kernel choices read the mesh's devices
    for name in names:
      module = importlib.import_module(_MODULES[name])
      if stage == 'all' and module.is_done(config, workdir):
        report[name] = 'already done'
        continue
      module.run(config, workdir)
      report[name] = 'ran'
  return report
