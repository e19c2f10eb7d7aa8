"""The input pipeline: content, seed-fixed order, exact restart, sharding over 8 devices, bad input."""

import hashlib

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from latent_diffusion import config_lib
from latent_diffusion import parallel
from latent_diffusion.data import captioned_shapes
from latent_diffusion.data import input_pipeline


def data_config(tfds_dir, **overrides):
  return config_lib.data('captioned_shapes/32', 32, data_dir=tfds_dir, shuffle_block=32, **overrides)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def image_hashes(batches):
  """One hash per image, of its uint8 pixels (so float rounding cannot matter)."""
  return [hashlib.sha1(np.round((x + 1) * 127.5).astype(np.uint8).tobytes()).hexdigest()
          for b in batches for x in b['image']]


def test_batches_hold_the_dataset_images_in_minus_one_to_one(tfds_dir):
  config = data_config(tfds_dir, train_split='validation[:64]')
  batch = next(input_pipeline.train_iterator(config, 16, seed=0))
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  stored = {ex['caption']: ex for ex in tfds.as_numpy(
      tfds.load('captioned_shapes/32', split='validation[:64]', data_dir=tfds_dir))}
  for image, caption, label in zip(batch['image'], batch['caption'], batch['label']):
    np.testing.assert_allclose(image, stored[caption]['image'] / 127.5 - 1, atol=1e-6)
    assert label == stored[caption]['label']


def test_each_epoch_is_a_permutation_and_epochs_differ(tfds_dir):
  config = data_config(tfds_dir, train_split='validation[:96]')
  batches = take(input_pipeline.train_iterator(config, 16, seed=3), 12)
  first, second = image_hashes(batches[:6]), image_hashes(batches[6:])
  stored = image_hashes([{'image': np.stack([ex['image'] / 127.5 - 1 for ex in tfds.as_numpy(
      tfds.load('captioned_shapes/32', split='validation[:96]', data_dir=tfds_dir))])}])
  assert sorted(first) == sorted(stored) == sorted(second)
  assert first != second


def test_order_is_fixed_by_the_seed(tfds_dir):
  config = data_config(tfds_dir)
  a = take(input_pipeline.train_iterator(config, 8, seed=1), 4)
  b = take(input_pipeline.train_iterator(config, 8, seed=1), 4)
  c = take(input_pipeline.train_iterator(config, 8, seed=2), 4)
  assert image_hashes(a) == image_hashes(b)
  assert image_hashes(a) != image_hashes(c)


@pytest.mark.parametrize('flip', [False, True])
def test_restart_at_step_k_gives_the_uninterrupted_batches(tfds_dir, flip):
  # 100 examples in batches of 16: step 7 starts inside the second epoch.
  config = data_config(tfds_dir, train_split='validation[:100]', random_flip=flip)
  full = take(input_pipeline.train_iterator(config, 16, seed=5), 12)
  for k in (3, 7):
    resumed = take(input_pipeline.train_iterator(config, 16, seed=5, start_step=k), 12 - k)
    for x, y in zip(full[k:], resumed):
      np.testing.assert_array_equal(x['image'], y['image'])
      np.testing.assert_array_equal(x['caption'], y['caption'])


def test_random_flip_mirrors_some_images(tfds_dir):
  plain = next(input_pipeline.train_iterator(data_config(tfds_dir), 32, seed=0))
  flipped = next(input_pipeline.train_iterator(data_config(tfds_dir, random_flip=True), 32, seed=0))
  mirrored = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
              for f, p in zip(flipped['image'], plain['image'])]
  same = [np.array_equal(f, p) for f, p in zip(flipped['image'], plain['image'])]
  assert all(m or s for m, s in zip(mirrored, same))
  assert 4 <= sum(mirrored) <= 28


def test_eval_iterator_is_ordered_and_masks_padding(tfds_dir):
  config = data_config(tfds_dir)
  batches = list(input_pipeline.eval_iterator(config, 16, num_examples=40))
  assert len(batches) == 3
  assert [int(b['mask'].sum()) for b in batches] == [16, 16, 8]
  stored = [ex['caption'] for ex in tfds.as_numpy(
      tfds.load('captioned_shapes/32', split='validation[:40]', data_dir=tfds_dir))]
  assert list(np.concatenate([b['caption'][b['mask']] for b in batches])) == stored


def test_global_batch_is_sharded_over_the_batch_axes_and_equals_one_device(tfds_dir):
  assert jax.device_count() == 8
  batch = next(input_pipeline.train_iterator(data_config(tfds_dir), 16, seed=0))
  mesh8 = parallel.create_mesh(config_lib.mesh())
  mesh1 = parallel.create_mesh(config_lib.mesh(), devices=jax.devices()[:1])
  sharded = input_pipeline.to_global(batch, mesh8)
  single = input_pipeline.to_global(batch, mesh1)
  image = sharded['image']
  assert image.shape == (16, 32, 32, 3)
  assert image.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  assert sorted(s.data.shape[0] for s in image.addressable_shards) == [2] * 8
  assert len({s.device for s in image.addressable_shards}) == 8
  np.testing.assert_array_equal(np.asarray(image), np.asarray(single['image']))
  np.testing.assert_array_equal(np.asarray(sharded['label']), batch['label'])
  assert sharded['caption'] is batch['caption']  # strings stay on the host

  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  labels = input_pipeline.to_global(batch, mesh)['label']
  assert sorted(s.data.shape[0] for s in labels.addressable_shards) == [4] * 8  # replicated over tensor
  np.testing.assert_array_equal(np.asarray(labels), batch['label'])


def test_folder_source_reads_images_and_captions(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(6):
    pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    pixels[:, :8] = 0  # cropped away by the centre crop (56 -> 40 wide)
    pixels[:, -8:] = 255
    Image.fromarray(pixels).save(tmp_path / f'img{i}.png')
    (tmp_path / f'img{i}.txt').write_text(f'caption {i}\n')
  config = config_lib.data('', 40, folder=str(tmp_path))
  batches = list(input_pipeline.eval_iterator(config, 2))
  assert [c.decode() for b in batches for c in b['caption']] == [f'caption {i}' for i in range(6)]
  first = np.asarray(Image.open(tmp_path / 'img0.png'))[:, 8:48] / 127.5 - 1
  np.testing.assert_allclose(batches[0]['image'][0], first, atol=1e-6)
  config.resolution = 20  # area resize of the 40x40 crop = mean of 2x2 blocks
  small = next(input_pipeline.eval_iterator(config, 2))['image'][0]
  expected = (np.asarray(Image.open(tmp_path / 'img0.png'))[:, 8:48].reshape(20, 2, 20, 2, 3).mean((1, 3))
              / 127.5 - 1)
  np.testing.assert_allclose(small, expected, atol=1e-4)
  train = take(input_pipeline.train_iterator(config, 2, seed=0), 3)
  assert sorted(c.decode() for b in train for c in b['caption']) == [f'caption {i}' for i in range(6)]


def test_unknown_dataset_is_a_clear_error(tfds_dir):
  config = config_lib.data('no_such_dataset_xyz', 32, data_dir=tfds_dir)
  with pytest.raises(ValueError, match="Unknown dataset data.name='no_such_dataset_xyz'.*data.folder"):
    input_pipeline.train_iterator(config, 8, seed=0)


def test_missing_split_and_feature_are_clear_errors(tfds_dir):
  with pytest.raises(ValueError, match="no split 'training'"):
    input_pipeline.train_iterator(data_config(tfds_dir, train_split='training'), 8, seed=0)
  with pytest.raises(ValueError, match="no feature data.image_key='img'"):
    input_pipeline.train_iterator(data_config(tfds_dir, image_key='img'), 8, seed=0)


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='is not a directory'):
    input_pipeline.train_iterator(config_lib.data('', 32, folder=str(tmp_path / 'missing')), 8, seed=0)
  (tmp_path / 'notes.txt').write_text('no images here')
  with pytest.raises(ValueError, match='holds no images'):
    input_pipeline.train_iterator(config_lib.data('', 32, folder=str(tmp_path)), 8, seed=0)
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'tiny.png')
  with pytest.raises(Exception, match='smaller than data.resolution=32'):
    next(input_pipeline.eval_iterator(config_lib.data('', 32, folder=str(tmp_path)), 1))


def test_resolution_the_data_cannot_give_is_a_clear_error(tfds_dir):
  config = config_lib.data('captioned_shapes/32', 64, data_dir=tfds_dir)
  with pytest.raises(ValueError, match=r'data.resolution=64 is larger than the dataset images \(32x32\)'):
    input_pipeline.train_iterator(config, 8, seed=0)


def test_batch_size_not_divisible_by_batch_shards_is_a_clear_error():
  mesh = parallel.create_mesh(config_lib.mesh())
  with pytest.raises(ValueError, match='not divisible by the 8 batch shards'):
    parallel.check_batch_size(12, mesh)


def test_objects_and_segmentation_are_cropped_like_their_image():
  """A 100 x 200 image keeps its centre 100 x 100 (columns 50-149): boxes move into its coordinates, a box left
  of it is dropped, the rest padded with label -1; the map is cropped the same way and resized (nearest)."""
  objects = {'bbox': np.array([[0.1, 0.5, 0.3, 0.6], [0.0, 0.0, 1.0, 0.2], [0.5, 0.2, 1.0, 0.4]], np.float32),
             'label': np.array([4, 7, 9])}
  boxes, labels = input_pipeline.preprocess_objects(objects, np.array([100, 200, 3]), 3)
  np.testing.assert_allclose(boxes.numpy(), [[0.1, 0.5, 0.3, 0.7], [0.5, 0.0, 1.0, 0.3], [0, 0, 0, 0]], atol=1e-6)
  np.testing.assert_array_equal(labels.numpy(), [4, 9, -1])
  boxes, labels = input_pipeline.preprocess_objects(objects, np.array([100, 200, 3]), 1)  # the first kept
  np.testing.assert_array_equal(labels.numpy(), [4])
  segmentation = np.zeros((100, 200, 1), np.uint8)
  segmentation[:, 100:150] = 3  # the right half of the crop
  resized = input_pipeline.preprocess_segmentation(segmentation, 10).numpy()
  assert resized.shape == (10, 10) and resized.dtype == np.uint8
  np.testing.assert_array_equal(resized, np.repeat([[0] * 5 + [3] * 5], 10, axis=0))


def test_layout_and_segmentation_features_come_from_the_configured_keys(tfds_dir):
  batch = next(input_pipeline.eval_iterator(data_config(tfds_dir, objects_key='objects', max_objects=3,
                                                        segmentation_key='segmentation'), 8))
  assert batch['boxes'].shape == (8, 3, 4) and batch['segmentation'].shape == (8, 32, 32)
  for i in range(8):  # the boxes and labels describe the scene the caption does
    layout = captioned_shapes.caption_of_layout(batch['boxes'][i], batch['object_labels'][i])
    assert layout == batch['caption'][i].decode()
  assert (batch['object_labels'][:, 2] == -1).all()  # at most two objects per scene
  shapes = batch['segmentation'] > 0  # the map marks the pixels drawn in an object colour
  coloured = np.abs(np.round((batch['image'] + 1) * 127.5)[..., None, :] - np.array(
      list(captioned_shapes.COLOURS.values()))).max(-1).min(-1) == 0
  np.testing.assert_array_equal(shapes, coloured)
  with pytest.raises(ValueError, match="no feature data.objects_key='boxes'"):
    input_pipeline.eval_iterator(data_config(tfds_dir, objects_key='boxes', max_objects=2), 8).__next__()
  assert 'boxes' not in next(input_pipeline.train_iterator(data_config(tfds_dir, objects_key='objects',
                                                                      max_objects=3), 8, seed=0))
