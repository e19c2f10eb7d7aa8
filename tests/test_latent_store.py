"""The latent store: complete shards only, restart skips finished shards, refusal of another stage-1 checkpoint,
seed-fixed restartable batches; and the latents -> ldm stages through the entry point."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from latent_diffusion.data import latent_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_encoder(calls):
  def encode_batches(start, count):
    calls.append((start, count))
    for first in range(start, start + count, 3):  # batches of 3, the last padded past `count`
      index = np.arange(first, first + 3)
      yield {'latent': np.stack([np.full((2, 2, 4), i / 7, np.float32) for i in index]),
             'caption': np.array([f'caption {i}'.encode() for i in index])}
  return encode_batches


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_shards_round_trip_and_restart_skips_complete_ones(tmp_path, dtype):
  calls = []
  directory = str(tmp_path / 'train')
  names = latent_store.write_shards(directory, num_examples=10, examples_per_shard=4,
                                    encode_batches=fake_encoder(calls), dtype=dtype)
  assert names == ['shard-p000-00000.npz', 'shard-p000-00001.npz', 'shard-p000-00002.npz']
  assert calls == [(0, 4), (4, 4), (8, 2)]
  assert not latent_store.is_complete(directory)  # no metadata yet
  latent_store.write_metadata(directory, {'shards': names, 'dtype': dtype, 'autoencoder_step': 7})
  arrays, metadata = latent_store.load(directory)
  np.testing.assert_allclose(arrays['latent'][:, 0, 0, 0], np.arange(10) / 7, rtol=1e-2)
  assert [c.decode() for c in arrays['caption']] == [f'caption {i}' for i in range(10)]
  assert metadata['autoencoder_step'] == 7

  os.remove(os.path.join(directory, names[1]))
  with open(os.path.join(directory, names[2]), 'r+b') as f:
    f.truncate(40)  # a shard cut short by a crash
  calls.clear()
  latent_store.write_shards(directory, num_examples=10, examples_per_shard=4, encode_batches=fake_encoder(calls),
                            dtype=dtype)
  assert calls == [(4, 4), (8, 2)]
  assert latent_store.load(directory)[0]['caption'][9] == b'caption 9'


def test_partial_shards_are_never_read_and_missing_ones_make_the_store_incomplete(tmp_path):
  directory = str(tmp_path)
  names = latent_store.write_shards(directory, num_examples=4, examples_per_shard=4,
                                    encode_batches=fake_encoder([]), dtype='float16')
  latent_store.write_metadata(directory, {'shards': names, 'dtype': 'float16', 'autoencoder_step': 1})
  with open(os.path.join(directory, 'shard-p000-00001.npz.tmp'), 'wb') as f:
    f.write(b'partial')  # an interrupted write of another shard
  assert len(latent_store.load(directory)[0]['latent']) == 4
  os.remove(os.path.join(directory, names[0]))
  with pytest.raises(ValueError, match='missing or incomplete; run the `latents` stage'):
    latent_store.load(directory)


def test_a_store_from_another_stage_1_checkpoint_is_refused():
  with pytest.raises(ValueError, match='made by the stage-1 checkpoint at step 100.*at step 200'):
    latent_store.check_source({'autoencoder_step': 100}, 200, '/w/latents/train')
  latent_store.check_source({'autoencoder_step': 100}, 100, '/w/latents/train')


def test_latent_batches_are_seed_fixed_permutations_that_restart_exactly():
  arrays = {'latent': np.arange(10, dtype=np.float32)[:, None], 'label': np.arange(10)}
  full = [next_batch['label'] for next_batch, _ in zip(latent_store.LatentBatches(arrays, 4, seed=3), range(6))]
  assert sorted(np.concatenate(full[:2]).tolist() + full[2][:2].tolist()) == list(range(10))  # epoch 0
  resumed = [b['label'] for b, _ in zip(latent_store.LatentBatches(arrays, 4, seed=3, start_step=3), range(3))]
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a, b)
  other = next(iter(latent_store.LatentBatches(arrays, 4, seed=4)))['label']
  assert not np.array_equal(other, full[0])


def main(workdir, tfds_dir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  args = ['--config=configs/txt2img.py:smoke', f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
          '--config.autoencoder.batch_size=8',
          '--config.autoencoder.eval.num_images=8', "--config.latents.splits=('validation',)",
          '--config.latents.examples_per_shard=800', '--config.latents.batch_size=200',
          '--config.ldm.unet.model_channels=32', '--config.ldm.unet.channel_mult=(1,)',
          '--config.ldm.conditioning.depth=1', '--config.ldm.conditioning.width=32', '--config.ldm.batch_size=8',
          '--config.ldm.train_schedule.log_every=2', *overrides]
  return subprocess.run([sys.executable, '-m', 'latent_diffusion.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_autoencoder_latents_ldm_pipeline_and_refusal(tmp_path, tfds_dir):
  result = main(tmp_path, tfds_dir, '--config.autoencoder.total_steps=2', '--config.ldm.total_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  for stage, outcome in (('autoencoder', 'ran'), ('latents', 'ran'), ('ldm', 'ran'), ('sample', 'not built yet')):
    assert f'stage {stage:<12} {outcome}' in result.stdout
  store = tmp_path / 'latents' / 'validation'
  metadata = json.loads((store / 'metadata.json').read_text())
  assert metadata['count'] == 2000 and metadata['shape'] == [8, 8, 6] and metadata['autoencoder_step'] == 2
  assert len(metadata['shards']) == 3 and metadata['scale_factor'] > 0
  assert (tmp_path / 'ldm' / 'checkpoints' / '4').is_dir()
  assert 'train/loss' in result.stderr

  # Retraining stage 1 makes the stored latents stale: the latents stage refuses them.
  stale = main(tmp_path, tfds_dir, '--config.autoencoder.total_steps=4', '--config.ldm.total_steps=4')
  assert stale.returncode != 0
  assert 'made by the stage-1 checkpoint at step 2' in stale.stderr
