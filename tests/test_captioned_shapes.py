"""The built-in dataset: captions agree with pixels, generation is offline and deterministic."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from latent_diffusion.data import captioned_shapes as cs

_OBJECT = re.compile(r'a (small|large) (\w+) (circle|square|triangle) (in the (?:top left|top right|bottom left|'
                     r'bottom right|center))')


def parse_caption(caption):
  """'a large red circle in the top left and ...' -> [(size, colour, shape, position), ...]."""
  parts = caption.split(' and ')
  objects = [_OBJECT.fullmatch(p) for p in parts]
  assert all(objects), f'caption outside the vocabulary: {caption!r}'
  return [m.groups() for m in objects]


def check_example(example):
  """Checks an example against its caption using pixels only; returns the parsed objects."""
  image, segmentation = example['image'], example['segmentation'][..., 0]
  caption = example['caption'].decode() if isinstance(example['caption'], bytes) else example['caption']
  objects = parse_caption(caption)
  assert 1 <= len(objects) <= 2
  measured = cs.measure_objects(image)
  assert sorted(measured) == sorted((c, shape, size, pos) for size, c, shape, pos in objects), caption
  drawn = np.zeros(image.shape[:2], bool)
  for _, colour, shape, _ in objects:
    mask = np.all(image == np.array(cs.COLOURS[colour], np.uint8), axis=-1)
    assert np.all(segmentation[mask] == 1 + cs.SHAPES.index(shape)), 'segmentation disagrees with pixels'
    drawn |= mask
  assert np.all(segmentation[~drawn] == 0)
  assert np.all(image[~drawn] >= 205), 'background is not a light tint'
  assert example['label'] == cs.label_of(objects[0][2], objects[0][1])
  return objects


@pytest.mark.parametrize('resolution', [32, 64, 256])
def test_captions_match_pixels_of_generated_examples(resolution):
  builder = cs.CaptionedShapes(config=str(resolution), data_dir='/nonexistent')
  counts = {'objects': [], 'positions': set(), 'shapes': set(), 'colours': set()}
  for index in range(200 if resolution < 256 else 40):
    objects = check_example(builder.example('train', index))
    counts['objects'].append(len(objects))
    counts['positions'] |= {o[3] for o in objects}
    counts['shapes'] |= {o[2] for o in objects}
    counts['colours'] |= {o[1] for o in objects}
  assert set(counts['objects']) == {1, 2}
  assert counts['positions'] == set(cs.POSITIONS)
  assert counts['shapes'] == set(cs.SHAPES) and counts['colours'] == set(cs.COLOURS)


def test_tfds_load_works_offline_and_stored_examples_match_pixels(tfds_dir):
  ds = tfds.load('captioned_shapes/64', split='validation', data_dir=tfds_dir)
  examples = list(tfds.as_numpy(ds.take(200)))
  assert len(examples) == 200
  for example in examples:
    check_example(example)
    boxes = example['objects']['bbox']
    assert boxes.shape == (len(parse_caption(example['caption'].decode())), 4)
    assert np.all((boxes >= 0) & (boxes <= 1))


def test_splits_sizes_and_labels(tfds_dir):
  info = tfds.builder('captioned_shapes/32', data_dir=tfds_dir).info
  assert {s: info.splits[s].num_examples for s in ('train', 'validation', 'test')} == {
      'train': 20_000, 'validation': 2_000, 'test': 2_000}
  assert info.features['label'].num_classes == 19
  assert info.features['label'].names[cs.NULL_CLASS] == 'null'
  assert info.features['image'].shape == (32, 32, 3)


@pytest.mark.slow  # 70-120 s in the full run: CI and the README command run it
def test_building_twice_gives_identical_examples(tfds_dir, tmp_path):
  tfds.builder('captioned_shapes/32', data_dir=str(tmp_path)).download_and_prepare()
  for split in ('validation', 'test'):
    first = tfds.as_numpy(tfds.load('captioned_shapes/32', split=split, data_dir=tfds_dir))
    second = tfds.as_numpy(tfds.load('captioned_shapes/32', split=split, data_dir=str(tmp_path)))
    n = 0
    for a, b in zip(first, second):
      n += 1
      assert a['caption'] == b['caption']
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['segmentation'], b['segmentation'])
      np.testing.assert_array_equal(a['objects']['bbox'], b['objects']['bbox'])
    assert n == 2_000


def test_same_scene_at_every_resolution():
  captions = {r: cs.CaptionedShapes(config=str(r), data_dir='/nonexistent').example('test', 7)['caption']
              for r in cs.RESOLUTIONS}
  assert len(set(captions.values())) == 1
  assert cs.sample_scene('test', 7) != cs.sample_scene('test', 8)


def test_shipped_vocabulary_tokenizes_every_caption_word_by_word():
  from latent_diffusion.models import conditioning  # pylint: disable=g-import-not-at-top
  with open(cs.VOCAB_FILE) as f:
    assert f.read().splitlines() == cs.vocabulary()
  tokenizer = conditioning.WordPieceTokenizer(cs.VOCAB_FILE)
  captions = [cs.caption_of(cs.sample_scene('train', i)[1]) for i in range(500)]
  ids = tokenizer(captions, 24)
  for caption, row in zip(captions, ids):
    words = caption.split()
    assert list(row[:len(words) + 2]) == [tokenizer.cls, *(tokenizer.vocab[w] for w in words), tokenizer.sep]
    assert not np.any(row[len(words) + 2:])
  assert max(len(c.split()) for c in captions) + 2 == 19  # fits the smoke max_length of 24
