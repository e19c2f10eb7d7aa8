"""Sharded web datasets (data.files): file lists, the same examples in the same order from every format, exact
restart without reading skipped files, disjoint host shares, corrupt examples skipped and counted, gs:// through
TensorFlow's ram:// filesystem, clear errors."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from latent_diffusion import config_lib
from latent_diffusion.data import export_shards
from latent_diffusion.data import input_pipeline
from latent_diffusion.data import latent_store
from latent_diffusion.data import shards
from latent_diffusion.data import sources

NUM_SHARDS, NUM_EXAMPLES = 24, 576
FORMATS = {'tar': 'tar', 'tfrecord': 'tfrecord', 'parquet': 'parquet', 'array_record': 'array_record'}
# Damaged examples: undecodable image bytes, no image, an empty caption.
BROKEN = {5: ('image', b'\xff\xd8 not a jpeg'), 77: ('image', b'GIF89a truncated'), 200: ('image', b''),
          130: ('caption', '')}
SKIPS = {'undecodable': 2, 'no image': 1, 'no caption': 1}


def _samples(tfds_dir):
  samples = export_shards.samples('captioned_shapes/32', f'train[:{NUM_EXAMPLES}]', data_dir=tfds_dir)
  for index, (key, value) in BROKEN.items():
    samples[index][key] = value
  return samples


@pytest.fixture(scope='module')
def web(shared_dir, tfds_dir):
  """The built-in data's first 576 train examples, 4 of them damaged, as 24 shards of each format."""
  def build(path):
    samples = _samples(tfds_dir)
    for fmt in FORMATS:
      export_shards.write(str(path / fmt), samples, fmt=fmt, num_shards=NUM_SHARDS)
  return shared_dir('web_shards', build)


def spec(web, fmt):
  return f'{web}/{fmt}/{{00000..{NUM_SHARDS - 1:05d}}}.{FORMATS[fmt]}'


def data_config(files, resolution=32, **overrides):
  return config_lib.data('captioned_shapes/32', resolution, files=files, shuffle_block=32, **overrides)


def pixels_hash(image):
  return hashlib.sha1(np.asarray(image, np.uint8).tobytes()).hexdigest()


def batch_hashes(batch):
  return [pixels_hash(np.round((x + 1) * 127.5)) for x in batch['image']]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_brace_ranges_alternatives_and_globs_list_files(tmp_path):
  for name in ('00000.tar', '00001.tar', '00002.tar', '00010.tar', 'other.parquet'):
    (tmp_path / name).write_bytes(b'')
  assert shards.expand_braces('a/{08..11}.tar') == ['a/08.tar', 'a/09.tar', 'a/10.tar', 'a/11.tar']
  assert shards.expand_braces('{x,y}/{1..2}') == ['x/1', 'x/2', 'y/1', 'y/2']
  names = lambda pattern: [os.path.basename(p) for p in shards.list_files(pattern)]
  assert names(f'{tmp_path}/{{00000..00002}}.tar') == ['00000.tar', '00001.tar', '00002.tar']
  assert names(f'{tmp_path}/*.tar') == ['00000.tar', '00001.tar', '00002.tar', '00010.tar']
  assert names(f'{tmp_path}/0000[01].tar {tmp_path}/other.parquet') == ['00000.tar', '00001.tar', 'other.parquet']
  with pytest.raises(ValueError, match=r"data.files='.*/nothing/\*.tar' matches no files"):
    shards.list_files(f'{tmp_path}/nothing/*.tar')
  with pytest.raises(ValueError, match='mixes or has unknown extensions'):
    shards.file_format(shards.list_files(f'{tmp_path}/*'))


def test_every_format_gives_the_same_examples_in_the_same_order_and_skips_damaged_ones(web, tfds_dir):
  kept = [s for i, s in enumerate(_samples(tfds_dir)) if i not in BROKEN]
  expected = {pixels_hash(Image.open(io.BytesIO(s['image'])).convert('RGB')) for s in kept}
  streams = {}
  for fmt in FORMATS:
    input_pipeline.SKIPPED.clear()
    batches = take(input_pipeline.train_iterator(data_config(spec(web, fmt)), 16, seed=3), NUM_EXAMPLES // 16)
    assert input_pipeline.skipped_counts() == SKIPS  # one epoch: each damaged example once
    streams[fmt] = ([h for b in batches for h in batch_hashes(b)], [c for b in batches for c in b['caption']])
    assert set(streams[fmt][0]) == expected  # every kept example, skipped ones' rows refilled by kept ones
  for fmt in FORMATS:
    assert streams[fmt] == streams['tar'], fmt
  assert b'' not in streams['tar'][1]


def test_order_depends_on_the_seed_and_restart_at_step_k_equals_the_uninterrupted_run(web):
  config = data_config(spec(web, 'tar'))
  full = take(input_pipeline.train_iterator(config, 16, seed=0), 40)  # past the end of epoch 0 (36 steps)
  other = take(input_pipeline.train_iterator(config, 16, seed=1), 2)
  assert batch_hashes(full[0]) + batch_hashes(full[1]) != batch_hashes(other[0]) + batch_hashes(other[1])
  for step in (5, 35):
    resumed = take(input_pipeline.train_iterator(config, 16, seed=0, start_step=step), 3)
    for a, b in zip(full[step:step + 3], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['caption'], b['caption'])


def test_a_restart_does_not_open_the_files_before_its_step(web, monkeypatch):
  opened = []
  read = shards._tar_examples  # pylint: disable=protected-access

  def counting(path, *args):
    opened.append(path)
    yield from read(path, *args)
  monkeypatch.setattr(shards, '_tar_examples', counting)
  take(input_pipeline.train_iterator(data_config(spec(web, 'tar'), prefetch=1), 16, seed=0, start_step=20), 1)
  # Step 20 starts at example 320 of 576, in the epoch's 14th file of 24: the 13 before it are never opened.
  assert 1 <= len(set(opened)) <= 6, opened


def test_hosts_read_disjoint_shares_whose_union_is_the_whole_set(web):
  config = data_config(spec(web, 'parquet'))
  captions, files = [], []
  for host in range(2):
    source = sources.ShardSource(config, config.files, process_index=host, process_count=2)
    files.append(set(source.files))
    captions.append([c for _, c in source.ordered().as_numpy_iterator()])
    assert source.num_examples == len(captions[-1]) == NUM_EXAMPLES // 2
  assert not files[0] & files[1] and len(files[0] | files[1]) == NUM_SHARDS
  every = [s for _, s in sources.ShardSource(config, config.files).ordered().as_numpy_iterator()]
  assert sorted(captions[0] + captions[1]) == sorted(every)
  five = [sources.ShardSource(config, config.files, process_index=h, process_count=5).files for h in range(5)]
  assert [len(f) for f in five] == [4] * 5 and len(set().union(*five)) == 20  # equal shares; 4 files left out


def test_empty_and_truncated_files_and_filters_are_skipped_and_counted(tmp_path, tfds_dir):
  samples = export_shards.samples('captioned_shapes/64', 'train[:30]', data_dir=tfds_dir)
  samples[3]['caption'] = 'a caption too long ' * 20  # 380 characters
  paths = export_shards.write(str(tmp_path), samples, fmt='tar', num_shards=3)
  for path in paths:
    os.remove(path[:-len('.tar')] + '_stats.json')  # counted from the tar headers
  with open(paths[1], 'wb'):
    pass  # an empty file
  with open(paths[2], 'r+b') as f:
    f.truncate(os.path.getsize(paths[2]) // 2)  # cut short mid-file
  config = data_config(' '.join(paths), filters=dict(max_caption_length=300, min_caption_length=1, min_size=0,
                                                      max_aspect_ratio=0.0))
  source = sources.ShardSource(config, config.files)
  records = list(source.ordered().as_numpy_iterator())
  assert source.counts[:2] == [10, 0] and 0 < source.counts[2] < 10
  assert len(records) == source.num_examples == 10 + source.counts[2]  # the counts agree with the stream
  input_pipeline.SKIPPED.clear()
  batches = list(input_pipeline.eval_iterator(config, 4, split='train'))
  assert sum(int(b['mask'].sum()) for b in batches) == source.num_examples - 1
  assert input_pipeline.skipped_counts() == {'filtered by caption length': 1}
  with pytest.raises(ValueError, match='smaller than'):
    input_pipeline.SKIPPED.clear()
    take(input_pipeline.train_iterator(data_config(' '.join(paths[:1]), resolution=128), 4, seed=0), 1)


def test_gs_style_paths_read_through_a_remote_filesystem(web):
  local = sorted(tf.io.gfile.glob(f'{web}/tar/*'))
  for path in local:
    tf.io.gfile.copy(path, 'ram://bucket/laion/' + os.path.basename(path), overwrite=True)
  for files in ('ram://bucket/laion/{00000..00023}.tar', 'ram://bucket/laion/*.tar'):
    remote = take(input_pipeline.train_iterator(data_config(files), 16, seed=0), 2)
    ours = take(input_pipeline.train_iterator(data_config(spec(web, 'tar')), 16, seed=0), 2)
    for a, b in zip(remote, ours):
      np.testing.assert_array_equal(a['image'], b['image'])


def test_keys_not_in_the_records_are_clear_errors(web):
  with pytest.raises(ValueError, match=r"have no key data.files_image_key='png'; their keys are "
                                       r"\['jpg', 'json', 'txt'\]"):
    sources.ShardSource(data_config(spec(web, 'tar'), files_image_key='png'), spec(web, 'tar'))
  with pytest.raises(ValueError, match=r"their keys are \['height', 'jpg', 'key', 'txt', 'width'\]"):
    sources.ShardSource(data_config(spec(web, 'tfrecord'), files_image_key='image'), spec(web, 'tfrecord'))
  with pytest.raises(ValueError, match=r"no key data.files_caption_key='caption'; their keys are \['key', 'jpg'"):
    sources.ShardSource(data_config(spec(web, 'parquet'), files_caption_key='caption'), spec(web, 'parquet'))
  with pytest.raises(ValueError, match="data.eval_files"):
    input_pipeline.eval_iterator(data_config(spec(web, 'tar')), 16)


@pytest.mark.slow
def test_every_stage_runs_from_tar_shards(web, tmp_path, tfds_dir):
  """The smoke pipeline from data.files: a store shard per train file with the damaged examples counted,
  the eval split from its own shards, samples and their prompt agreement."""
  from test_latent_store import main  # pylint: disable=g-import-not-at-top
  samples = export_shards.samples('captioned_shapes/32', 'validation[:96]', data_dir=tfds_dir)
  export_shards.write(str(tmp_path / 'validation'), samples, fmt='tar', num_shards=3)
  result = main(tmp_path / 'run', tfds_dir, f'--config.data.files={spec(web, "tar")}',
                f'--config.data.eval_files={tmp_path}/validation/*.tar', "--config.latents.splits=('train',)",
                '--config.autoencoder.total_steps=2', '--config.ldm.total_steps=4', '--config.sampling.num_steps=5',
                '--config.sampling.batch_size=8', '--config.sampling.seeds=(0,)')
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in ('autoencoder', 'latents', 'ldm', 'sample', 'eval'):
    assert f'stage {stage:<12} ran' in result.stdout
  metadata = latent_store.read_metadata(latent_store.split_dir(tmp_path / 'run', 'train'))
  assert len(metadata['shards']) == NUM_SHARDS and metadata['count'] == NUM_EXAMPLES - len(BROKEN)
  assert metadata['skipped'] == SKIPS
  assert 'data/skipped=' in result.stderr
  report = json.loads((tmp_path / 'run' / 'eval' / 'ldm.json').read_text())
  assert report['num_images'] == 16 and report['reference'] == 'validation[:32]' and report['fid'] > 0
  assert 0 <= report['prompt_agreement/colour_position'] <= report['prompt_agreement/colour'] <= 1
