"""Runs `python -m latent_diffusion.main ARGV` for many ARGVs in one process (one import of JAX, not one per case).

stdin: a JSON list of argv lists; stdout's last line: a JSON list of [exit status, what went to stderr].
"""

import contextlib
import io
import json
import sys

from absl import flags

from latent_diffusion import cli
from latent_diffusion import main as main_lib


def run(argv):
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:  # the last case's --config.* overrides
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  sys.argv = ['main', *argv]  # config_flags reads the overrides from sys.argv
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      main_lib.main(cli.parse_flags(sys.argv))
  except SystemExit as e:  # SystemExit('Error: ...') would print its message and exit with status 1
    return (1, e.code) if isinstance(e.code, str) else (e.code, err.getvalue().strip())
  return 0, err.getvalue().strip()


if __name__ == '__main__':
  cases = json.load(sys.stdin)
  results = [run(argv) for argv in cases]
  sys.stdout.write('\n' + json.dumps(results) + '\n')
