"""The five pipeline stages in order, and running them: `all` runs every stage that is not done yet."""

import importlib

from absl import logging

STAGES = ('autoencoder', 'latents', 'ldm', 'sample', 'eval')
# Stages whose implementation has not landed yet, with the issue that builds each.
NOT_BUILT = {'eval': 6}
# Built stages: name -> module with `is_done(config, workdir)` and `run(config, workdir)`, imported when used.
_BUILT = {'autoencoder': 'latent_diffusion.training.autoencoder', 'latents': 'latent_diffusion.training.latents',
          'ldm': 'latent_diffusion.training.ldm', 'sample': 'latent_diffusion.training.sample'}


class StageNotBuiltError(RuntimeError):
  pass


def run(stage, config, workdir):
  """Runs one stage, or with `all` each stage in order that is not done; returns {stage: what happened}."""
  if stage != 'all' and stage not in STAGES:
    raise ValueError(f"Unknown stage '{stage}'; choose 'all' or one of {STAGES}.")
  report = {}
  for name in STAGES if stage == 'all' else (stage,):
    if name in NOT_BUILT:
      message = f"The '{name}' stage is not built yet (issue #{NOT_BUILT[name]}); nothing was run for it."
      if stage != 'all':
        raise StageNotBuiltError(message)
      later = STAGES[STAGES.index(name) + 1:]
      logging.warning('%s Stopping here: %s depend on it.', message, ', '.join(later) or 'no stages')
      report[name] = 'not built yet'
      report.update({n: f'skipped (needs {name})' for n in later})
      break
    module = importlib.import_module(_BUILT[name])
    if stage == 'all' and module.is_done(config, workdir):
      report[name] = 'already done'
      continue
    module.run(config, workdir)
    report[name] = 'ran'
  return report
