"""benchmarks/accelerator_check.sh, the script for the day a GPU or TPU is at hand, runs here at its tiny size and
prints its tables with measured numbers."""

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_check_runs_on_the_cpu_at_its_tiny_size():
  result = subprocess.run(['bash', 'benchmarks/accelerator_check.sh', '--tiny', '--steps=1', '--repeats=1',
                           '--num_steps=5'], cwd=REPO, capture_output=True, text=True, timeout=480,
                          env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-3000:]
  train = re.findall(r'^\| tiny \| float32 \| ours (\w+) \| ([\d.]+) \| ([\d.]+)x \|.*\| ([\d,]+) \|$',
                     result.stdout, re.M)
  assert [row[0] for row in train] == ['reference', 'xla']  # what applies on a CPU
  assert all(float(rate) > 0 for _, rate, _, _ in train) and train[0][2] == '1.00'
  assert len({params for *_, params in train}) == 1  # the same UNet under each attention
  sampling = re.findall(r'^\| tiny \| ours \| 2 \| ([\d.]+) \| ([\d.]+) \|$', result.stdout, re.M)
  assert len(sampling) == 1 and float(sampling[0][0]) > 0
