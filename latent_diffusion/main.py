"""Entry point: `python -m latent_diffusion.main --config=configs/txt2img.py[:variant] --workdir=DIR [--stage=NAME]`.

Kept short on purpose: flags, platform set-up, and one call into `stages`.
"""

import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

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
flags.DEFINE_enum('stage', 'all', ('all',) + stages.STAGES, 'Stage to run; `all` runs every stage not done.')
flags.DEFINE_bool('distributed', False, 'Initialise jax.distributed from the environment (TPU pod, SLURM).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for jax.distributed elsewhere.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process, with --coordinator_address.')
flags.mark_flags_as_required(['config', 'workdir'])


def _flag_value(argv, name):
  """The text after `--name=` in argv (or the next argument after `--name`), for messages."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def flag_error(error, argv):
  """A mistake in the flags or the config file as one line: the flag, and what is wrong with it."""
  message = error
  while isinstance(message, (KeyError, AttributeError)) and message.args:  # ConfigDict wraps KeyError messages
    message = message.args[0]
  lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
  if isinstance(error, (KeyError, AttributeError)):  # a --config.a.b override naming no field
    field = lines[0].strip('\'"')
    hint = next((re.sub(r' instead of .*', '', line) for line in lines if line.startswith('Did you mean')), '')
    override = next((a.split('=')[0] for a in argv if a.startswith('--config.') and field in a), '--config.*')
    return f"{override}: the config has no field '{field}'" + (f'; {hint[0].lower()}{hint[1:]}' if hint else '.')
  if isinstance(error, OSError):
    return (f'--config={_flag_value(argv, "config")}: the config file cannot be read (no such file?); give a '
            'path such as configs/txt2img.py[:variant].')
  flag = re.match(r'flag (--\S+?): ', lines[0])
  where = flag.group(1) if flag else ''
  if any(line.startswith('Traceback') for line in lines):  # the config file's get_config raised: the last line
    return f'{where}: {re.sub(r"^[A-Za-z]*(Error|Exception): ", "", lines[-1])}'
  return lines[0].removeprefix('flag ')


def parse_flags(argv):
  """absl's flag parsing, loading the config file at once, with a user's mistake as one `Error:` line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # the config file is loaded lazily: load it now, with the --config.* overrides
    return rest
  except (flags.Error, KeyError, AttributeError, OSError) as e:
    sys.stderr.write(f'Error: {flag_error(e, argv)}\n')
    sys.exit(1)


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
  app.run(main, flags_parser=parse_flags)
