"""What the command-line tools share: absl flag parsing that loads the `--config` file at once and turns a
user's mistake in a flag or in the config file (a misspelt field, an unknown argument, a missing file) into one
`Error:` line instead of a traceback."""

import re
import sys

from absl import flags

FLAGS = flags.FLAGS


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
