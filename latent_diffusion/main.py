"""Entry point: `python -m latent_diffusion.main --config=configs/txt2img.py[:variant] --workdir=DIR [--stage=NAME]`.

Kept short on purpose: flags, platform set-up, and one call into `stages`.
"""

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from latent_diffusion import cli
from latent_diffusion import parallel
from latent_diffusion import stages
from latent_diffusion import validate
from latent_diffusion import workdir as workdir_lib
from latent_diffusion.training import loop

# Exit status after a clean stop on SIGTERM or a preemption notice (128 + SIGTERM): restart loops rerun on it.
PREEMPTED_EXIT_STATUS = 143

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/txt2img.py:smoke.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, latents, samples and logs.')
flags.DEFINE_string('stage', 'all', f'`all` (every stage not done yet), or one or more of {stages.STAGES} '
                    'separated by commas (each run even if done).')
flags.DEFINE_bool('distributed', False, 'Initialise jax.distributed from the environment (TPU pod, SLURM).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for jax.distributed elsewhere.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process, with --coordinator_address.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # tf.data only; accelerators belong to JAX.
  if FLAGS.distributed or FLAGS.coordinator_address:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    validate.check(FLAGS.config, stage=FLAGS.stage)  # the whole config, before anything is written or computed
    workdir_lib.prepare(FLAGS.config, FLAGS.workdir)
    report = stages.run(FLAGS.stage, FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, PermissionError, FloatingPointError) as e:
    raise SystemExit(f'Error: {e}') from e
  except loop.Preempted as e:
    print(f'Preempted: {e}', flush=True)
    raise SystemExit(PREEMPTED_EXIT_STATUS) from e
  for name, outcome in report.items():
    print(f'stage {name:<12} {outcome}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
