"""Every config that names a reference model builds that model: the UNet and the conditioning encoder have the
parameter counts of the reference code built from its own yaml (CompVis/latent-diffusion at a506df5)."""

import math

import jax
import pytest

from latent_diffusion import programs
from latent_diffusion.training import ldm as ldm_stage
from tests import shipped_configs

# config: (reference model, its UNet, its conditioning encoder), counted from the reference modules.
REFERENCE = {
    'txt2img': ('txt2img-1p4B-eval', 872_300_484, 581_994_042),
    'class_cond': ('cin256-v2', 400_920_579, 512_512),
    'class_cond:f8': ('cin-ldm-vq-f8', 394_984_196, 512_000),
    'uncond': ('celebahq-ldm-vq-4', 274_056_163, 0),
    'lsun_churches': ('lsun_churches-ldm-kl-8', 294_966_916, 0),
    'super_res': ('bsr_sr', 113_622_563, 0),
    'inpainting': ('inpainting_big', 387_245_827, 0),
    'semantic': ('semantic_synthesis256', 215_229_315, 0),
    'layout2img': ('layout2img-openimages256', 246_277_379, 58_858_496),
}


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def parameter_counts(config):
  """(UNet, conditioning encoder, the segmentation map inside our UNet) of a config's default model, by shape."""
  _, _, init = ldm_stage.create(config, programs.latent_metadata(config))
  state = jax.eval_shape(init, jax.random.key(0))
  params = {**state.params, **(state.frozen or {})}
  unet = dict(params['unet'])
  segmentation_map = unet.pop('segmentation_map', {})
  return count(unet), count(params.get('cond', {})), count(segmentation_map)


def test_every_reference_model_config_is_listed():
  assert set(REFERENCE) == set(shipped_configs.NAMES)


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_parameter_counts_are_the_reference_models(name):
  config = shipped_configs.load(name)
  _, reference_unet, reference_cond = REFERENCE[name]
  unet, cond, segmentation_map = parameter_counts(config)
  assert unet == reference_unet
  c = config.ldm.conditioning
  if c.kind in ('text', 'layout'):
    # The reference counts x-transformers' logits layer (width x vocab + vocab), which BERTEmbedder never calls
    # (return_embeddings=True); ours has none.
    assert cond + c.width * c.vocab_size + c.vocab_size == reference_cond
  else:
    assert cond == reference_cond
  # The reference SpatialRescaler's bias-free 1x1 map of the segmentation classes, kept as the UNet's first layer.
  assert segmentation_map == c.segmentation_classes * c.segmentation_map_channels
