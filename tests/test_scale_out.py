"""Scale-out and reliability through the entry point: 2 processes x 4 devices equal 1 x 8, SIGKILL and SIGTERM
mid-run resume exactly, a truncated newest checkpoint falls back to the previous one, a deleted latent shard is
rebuilt alone, and the launch scripts pass bash -n and shellcheck."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from latent_diffusion import parallel
from latent_diffusion import workdir as workdir_lib
from latent_diffusion.data import latent_store
from latent_diffusion.training import checkpoint
from latent_diffusion.training import ldm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ('--config.autoencoder.total_steps=2', '--config.autoencoder.batch_size=8',
        '--config.autoencoder.eval.num_images=8', "--config.latents.splits=('validation',)",
        '--config.latents.examples_per_shard=800', '--config.latents.batch_size=200',
        '--config.ldm.unet.model_channels=64', '--config.ldm.unet.channel_mult=(1,)',
        '--config.ldm.unet.attention_resolutions=(1,)',
        '--config.ldm.conditioning.depth=1', '--config.ldm.conditioning.width=32', '--config.ldm.batch_size=8',
        '--config.ldm.train_schedule.log_every=1', '--config.ldm.train_schedule.eval_every=0',
        '--config.ldm.train_schedule.checkpoint_every=3', '--config.ldm.train_schedule.keep_checkpoints=10',
        '--config.ldm.optimizer.warmup_steps=2')
STEPS = 12
# model_channels=64, not 32: with 32 channels and GroupNorm's 32 groups, a group holds one channel and removes any
# per-channel bias before it, so those biases get pure rounding-noise gradients that Adam scales up to
# learning-rate-sized steps, different for every reduction order (2 x 4 vs 1 x 8 devices).


def command(workdir, tfds_dir, *overrides):
  return ['--config=configs/txt2img.py:smoke', f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
          *TINY, *overrides]


def env(devices=8):
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def main(workdir, tfds_dir, *overrides):
  return subprocess.run([sys.executable, '-m', 'latent_diffusion.main', *command(workdir, tfds_dir, *overrides)],
                        cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)


def losses(log):
  """{step: loss} of the train/loss lines of a log (several processes may print the same step)."""
  return {int(s): float(v) for s, v in re.findall(r'\[(\d+)\] [^\n]*?train/loss=([0-9.e+-]+)', log)}


def final_state(workdir):
  config = workdir_lib.load_config(workdir)
  _, metadata = latent_store.load(latent_store.split_dir(workdir, 'validation'))
  _, _, init = ldm.create(config, metadata)
  mesh = parallel.create_mesh(config.mesh)
  state, step = checkpoint.restore_newest(ldm.checkpoint_dir(workdir), init, mesh, 'ldm')
  return jax.tree.map(np.asarray, (state.params, state.ema_params, state.opt_state)), step


def assert_same_state(a, b, tolerance):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=tolerance)


@pytest.fixture(scope='module')
def stage_1(shared_dir, tfds_dir):
  """A workdir with the autoencoder trained and the latent store written, and the uninterrupted ldm run (built
  once per test run, whichever worker asks first)."""

  def build(path):
    base = path / 'base'
    result = main(base, tfds_dir, '--stage=autoencoder')
    assert result.returncode == 0, result.stderr[-3000:]
    result = main(base, tfds_dir, '--stage=latents')
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(base, path / 'reference')
    result = main(path / 'reference', tfds_dir, '--stage=ldm', f'--config.ldm.total_steps={STEPS}')
    assert result.returncode == 0, result.stderr[-3000:]
    (path / 'losses.json').write_text(json.dumps(losses(result.stderr)))

  path = shared_dir('stage_1', build)
  expected = {int(step): loss for step, loss in json.loads((path / 'losses.json').read_text()).items()}
  return path / 'base', path / 'reference', expected


def copy(base, tmp_path, name):
  shutil.copytree(base, tmp_path / name)
  return tmp_path / name


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_of_eight(stage_1, tmp_path, tfds_dir):
  base, reference, expected = stage_1
  workdir = copy(base, tmp_path, 'two_hosts')
  result = subprocess.run(['bash', 'launch/local.sh', *command(workdir, tfds_dir, '--stage=ldm',
                                                               f'--config.ldm.total_steps={STEPS}')],
                          cwd=REPO, env=dict(env(), NUM_PROCESSES='2', DEVICES='4', PORT='12391',
                                             PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'process 1 of 2, 4 local / 8 global devices' in result.stderr
  got = losses(result.stderr)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)
  (state, step), (reference_state, _) = final_state(workdir), final_state(reference)
  assert step == STEPS
  assert_same_state(state, reference_state, 1e-5)


def start(workdir, tfds_dir, total_steps):
  return subprocess.Popen([sys.executable, '-m', 'latent_diffusion.main',
                           *command(workdir, tfds_dir, '--stage=ldm', f'--config.ldm.total_steps={total_steps}')],
                          cwd=REPO, env=env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def wait_for_step(process, step):
  """Reads the process's log until it reports `step` (or ends); returns what it read."""
  seen = []
  for line in process.stderr:
    seen.append(line)
    if step in losses(line):
      break
  return ''.join(seen)


@pytest.mark.slow
def test_sigkill_then_sigterm_then_a_truncated_checkpoint_each_resume_the_uninterrupted_run(stage_1, tmp_path,
                                                                                            tfds_dir):
  """One run through three interruptions (one test, so the ldm step compiles three times rather than five)."""
  base, reference, expected = stage_1
  workdir = copy(base, tmp_path, 'interrupted')
  # SIGKILL at a random step: the run resumes from the newest complete checkpoint (orbax saves in the background,
  # so one being written is absent, and with none complete the run starts over; it may have stepped past kill_at).
  kill_at = int(np.random.default_rng(int(time.time())).integers(4, 7))
  process = start(workdir, tfds_dir, STEPS)
  before = wait_for_step(process, kill_at)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL and kill_at in losses(before), before[-3000:]
  resumed_from = checkpoint.latest_saved_step(ldm.checkpoint_dir(workdir)) or 0
  assert resumed_from < STEPS

  # SIGTERM after two more steps: the restart saves the current step and exits with 143.
  process = start(workdir, tfds_dir, STEPS)
  term_after = max(resumed_from + 2, 4)
  log = wait_for_step(process, term_after)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)
  log += err
  assert process.returncode == 143, log[-3000:]
  assert f'from step {resumed_from} to {STEPS}' in log
  stopped = int(re.search(r'Stopped at step (\d+) after saving its checkpoint', out).group(1))
  steps = checkpoint.saved_steps(ldm.checkpoint_dir(workdir))
  assert STEPS > stopped >= term_after and steps[-1] == stopped and 3 in steps  # checkpoint_every=3; plus stopped
  got = losses(log)
  assert sorted(got) == list(range(resumed_from + 1, stopped + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6)

  # Truncate every file of the newest checkpoint: the restart warns, sets it aside and resumes from the one before.
  newest = os.path.join(ldm.checkpoint_dir(workdir), str(stopped))
  for path in glob.glob(os.path.join(newest, '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'r+b') as f:
        f.truncate(0)
  previous = steps[-2]
  result = main(workdir, tfds_dir, '--stage=ldm', f'--config.ldm.total_steps={STEPS}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Checkpoint {ldm.checkpoint_dir(workdir)}/{stopped} cannot be read' in result.stderr
  assert f'from step {previous} to {STEPS}' in result.stderr
  assert os.path.isdir(newest + '.corrupt')  # set aside, not deleted
  got = losses(result.stderr)
  assert sorted(got) == list(range(previous + 1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6)
  assert_same_state(final_state(workdir)[0], final_state(reference)[0], 1e-6)


@pytest.mark.slow
def test_a_deleted_latent_shard_is_rebuilt_alone(stage_1, tmp_path, tfds_dir):
  base, _, _ = stage_1
  workdir = copy(base, tmp_path, 'shard')
  store = latent_store.split_dir(workdir, 'validation')
  names = latent_store.read_metadata(store)['shards']
  before = {name: latent_store.read_shard(store, name, 'bfloat16') for name in names}
  os.remove(os.path.join(store, 'shard-p000-00001.npz'))
  result = main(workdir, tfds_dir, '--stage=latents')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.findall(r'Wrote latent shard \S+/(shard-\S+) ', result.stderr) == ['shard-p000-00001.npz']
  assert len(re.findall(r'is complete; skipped', result.stderr)) == len(names) - 1
  rebuilt = latent_store.read_shard(store, 'shard-p000-00001.npz', 'bfloat16')
  for key, value in before['shard-p000-00001.npz'].items():
    np.testing.assert_array_equal(rebuilt[key], value)  # the same examples, encoded the same way


def test_launch_scripts_pass_bash_n_and_shellcheck():
  shellcheck = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  for script in sorted(glob.glob(os.path.join(REPO, 'launch', '*'))):
    subprocess.run(['bash', '-n', script], check=True)
    result = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('accelerator, runtime', [('v4-32', 'tpu-ubuntu2204-base'),
                                                  ('v5litepod-64', 'v2-alpha-tpuv5-lite'),
                                                  ('v5p-128', 'v2-alpha-tpuv5'), ('v6e-64', 'v2-alpha-tpuv6e')])
def test_tpu_pod_dry_run_prints_what_it_would_run(accelerator, runtime):
  env = dict(os.environ, DRY_RUN='1', TPU_NAME='ldm', ZONE='us-east5-a', WORKDIR='gs://bucket/ldm',
             REPO='https://example.com/ldm.git', ACCELERATOR=accelerator, PATH='/usr/bin:/bin')  # no gcloud
  result = subprocess.run(['bash', 'launch/tpu_pod.sh', '--config.ldm.batch_size=512', "--config.seed=it's"],
                          cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  commands = [line for line in result.stdout.splitlines() if line.startswith('+ ')]
  create, install, run = commands
  assert create.startswith('+ gcloud compute tpus tpu-vm create ldm --zone=us-east5-a')
  assert f'--accelerator-type={accelerator}' in create and f'--version={runtime}' in create
  # The images' python3 is 3.10: the install brings python3.11 before the virtualenv, then the TPU extra.
  assert 'ppa:deadsnakes/ppa' in install and 'python3.11 -m venv .venv' in install
  assert ".[tpu]" in install and install.index('deadsnakes') < install.index('venv')
  assert '--worker=all' in run and 'latent_diffusion.main\ --distributed' in run
  assert '--config.ldm.batch_size=512' in run and 'gs://bucket/ldm' in run


def test_gpu_slurm_dry_run_prints_the_task_command():
  env = dict(os.environ, DRY_RUN='1', WORKDIR='/shared/ldm', CONFIG='configs/class_cond.py', SLURM_SUBMIT_DIR='/x')
  result = subprocess.run(['bash', 'launch/gpu_slurm.sbatch', '--config.ldm.batch_size=64'], cwd=REPO, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      '+ . /x/.venv/bin/activate', '+ cd /x',
      '+ srun --kill-on-bad-exit=1 python -m latent_diffusion.main --distributed '
      '--config=configs/class_cond.py --workdir=/shared/ldm --config.ldm.batch_size=64']


@pytest.mark.parametrize('name, value', [('NUM_PROCESSES', '0'), ('DEVICES', 'x')])
def test_local_launch_validates_its_variables(name, value):
  result = subprocess.run(['bash', 'launch/local.sh', '--config=configs/txt2img.py:smoke', '--workdir=/tmp/x'],
                          cwd=REPO, env=dict(os.environ, **{name: value}), capture_output=True, text=True)
  assert result.returncode == 2 and f'{name} must be a positive integer' in result.stderr
