"""The `autoencoder` stage through the real entry point: training, summaries, kill and resume, LPIPS errors."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast variant of the smoke config: 16 px crops of captioned_shapes/32 are not needed; the model shrinks.
TINY = ['--config.autoencoder.model.ch_mult=(1,2)', '--config.autoencoder.batch_size=8',
        '--config.autoencoder.train_schedule.log_every=5', '--config.autoencoder.eval.num_images=16']


def command(workdir, tfds_dir, *overrides, config='configs/txt2img.py:smoke'):
  return [sys.executable, '-m', 'latent_diffusion.main', f'--config={config}', f'--workdir={workdir}',
          '--stage=autoencoder', f'--config.data.data_dir={tfds_dir}', *TINY, *overrides]


def run(*args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(command(*args, **kwargs), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def summaries(logdir):
  values = {}
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        values.setdefault(v.tag, []).append((event.step, tf.make_ndarray(v.tensor)))
  return values


def checkpoints(workdir):
  directory = os.path.join(workdir, 'autoencoder', 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.slow
def test_stage_trains_logs_and_resumes_after_sigkill(tmp_path, tfds_dir):
  workdir = str(tmp_path)
  overrides = ['--config.autoencoder.total_steps=30', '--config.autoencoder.train_schedule.checkpoint_every=5',
               '--config.autoencoder.train_schedule.eval_every=15']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  process = subprocess.Popen(command(workdir, tfds_dir, *overrides), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not [s for s in checkpoints(workdir) if s >= 10] and time.time() < deadline and process.poll() is None:
    time.sleep(0.5)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = checkpoints(workdir)
  assert killed_at and max(killed_at) < 30, killed_at

  resumed = run(workdir, tfds_dir, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'from step {max(killed_at)} to 30' in resumed.stderr
  assert checkpoints(workdir)[-1] == 30
  logs = summaries(os.path.join(workdir, 'autoencoder'))
  psnr = dict(logs['val/psnr'])
  assert set(psnr) >= {30} and 5 < float(psnr[30]) < 60
  assert logs['reconstructions'][-1][1].ndim == 1  # an encoded image grid
  losses = [float(v) for _, v in sorted(logs['train/rec_loss'])]
  assert losses[-1] < losses[0]

  again = run(workdir, tfds_dir, *overrides)  # done: nothing more to train
  assert again.returncode == 0 and 'from step 30 to 30' in again.stderr


def test_lpips_without_weights_fails_early_with_the_fix(tmp_path, tfds_dir):
  result = run(str(tmp_path), tfds_dir, '--config.autoencoder.loss.perceptual_weight=1.0')
  assert result.returncode != 0
  assert 'LPIPS weights file' in result.stderr and 'vgg16-397923af.pth' in result.stderr
  assert 'perceptual_weight=0' in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'autoencoder'))
