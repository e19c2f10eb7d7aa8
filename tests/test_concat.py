"""Concat conditioning: the stored conditions (low-res image, box masks) and how the UNet input is built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import inpainting
from configs import semantic
from configs import super_res
from latent_diffusion.diffusion import concat
from latent_diffusion.training import ldm


def test_area_downsample_averages_blocks():
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  small = np.asarray(concat.area_downsample(jnp.asarray(x), 2))
  assert small.shape == (2, 2, 2, 3)
  np.testing.assert_allclose(small[1, 0, 1], x[1, :4, 4:].mean(axis=(0, 1)))


def test_box_masks_are_fixed_by_example_and_cover_a_quarter_to_three_quarters_of_each_side():
  masks = concat.box_masks(0, 0, np.arange(200), 32)
  np.testing.assert_array_equal(masks[50:60], concat.box_masks(0, 0, np.arange(50, 60), 32))
  assert not np.array_equal(masks[:10], concat.box_masks(0, 1, np.arange(10), 32))  # another host's examples
  rows, cols = masks[..., 0].any(axis=2).sum(axis=1), masks[..., 0].any(axis=1).sum(axis=1)
  assert rows.min() >= 8 and cols.min() >= 8 and rows.max() <= 24 and cols.max() <= 24
  np.testing.assert_array_equal(masks[..., 0].sum(axis=(1, 2)), rows * cols)  # one solid box each
  assert 0.15 < masks.mean() < 0.35


def test_condition_scales_the_masked_latent_and_guidance_repeats_it():
  latent = np.stack([np.ones((4, 4, 3)), 2 * np.ones((4, 4, 3))]).astype(np.float32)
  stored = {'masked_latent': latent, 'inpaint_mask': np.zeros((2, 4, 4, 1), np.float32)}
  condition = concat.condition(stored, 'inpainting', 0.5)
  np.testing.assert_array_equal(condition[..., :3], 0.5 * latent)
  seen = []
  fn = concat.with_concat(lambda x, t, c: seen.append(x) or x[..., :3], condition)
  fn(jnp.zeros((4, 4, 4, 3)), None, None)  # a guided batch: each example's unconditional and conditional rows
  assert seen[0].shape == (4, 4, 4, 7)
  for row, example in enumerate((0, 0, 1, 1)):
    np.testing.assert_array_equal(seen[0][row, ..., 3:], condition[example])
  with pytest.raises(ValueError, match="concat='upscale' is not one of"):
    concat.num_channels('upscale', 3)


@pytest.mark.parametrize('config_module, in_channels', [(super_res, 3 + 3), (inpainting, 3 + 3 + 1),
                                                        (semantic, 3 + 3)])
def test_concat_models_take_the_paper_s_input_channels(config_module, in_channels):
  config = config_module.get_config('smoke')
  metadata = {'shape': [8, 8, 3], 'kind': 'vq', 'scale_factor': 1.0}
  _, _, init = ldm.create(config, metadata)
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  kernel = state.params['unet']['conv_in']['kernel']
  assert getattr(kernel, 'value', kernel).shape[2] == in_channels
  if config_module is semantic:  # the 4 class fractions pass SpatialRescaler's bias-free 1x1 map to 3 channels
    mapper = state.params['unet']['segmentation_map']
    assert set(mapper) == {'kernel'} and getattr(mapper['kernel'], 'value', mapper['kernel']).shape == (1, 1, 4, 3)


def test_segmentation_condition_is_the_class_fractions_of_each_latent_block():
  ids = np.zeros((1, 8, 8), np.uint8)
  ids[0, :4, :2] = 2  # half of the top-left 4x4 block
  ids[0, 4:, 4:] = 1  # all of the bottom-right block
  fractions = np.asarray(concat.condition({'segmentation': ids}, 'segmentation', 0.5, size=2,
                                          segmentation_classes=3))
  np.testing.assert_allclose(fractions[0, 0, 0], [0.5, 0.0, 0.5])
  np.testing.assert_allclose(fractions[0, 1, 1], [0.0, 1.0, 0.0])
  np.testing.assert_allclose(fractions[0, 0, 1], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(fractions.sum(-1), 1.0)
  with pytest.raises(ValueError, match='class id 2, but ldm.conditioning.segmentation_classes=2; set it to at least 3'):
    concat.check_segmentation(ids, 2)
  with pytest.raises(ValueError, match='needs ldm.conditioning.segmentation_classes'):
    concat.num_channels('segmentation', 3)
