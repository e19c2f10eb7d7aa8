r"""Semantic synthesis LDM-4 (paper Sec. 4.3.2): a segmentation map, as class fractions at the latent size, is
mapped to 3 channels by a learned 1x1 conv and concatenated to the UNet input; VQ-f4 latents 64x64x3. The UNet is
the reference semantic_synthesis256's (AttentionBlocks in the middle block only: its attention_resolutions
32, 16, 8 name no level of a 3-level UNet on 64x64 latents).

The paper trains on landscape photos with COCO-Stuff-style maps (not public); the default here is ADE20K from
TFDS (`scene_parse150`, 150 classes and 0 = other). Prepare it in data.data_dir first:
  python -m latent_diffusion.main --config=configs/semantic.py --workdir=gs://BUCKET/semantic
On a CPU in minutes, on captioned_shapes (maps of background + 3 shapes):
  python -m latent_diffusion.main --config=configs/semantic.py:smoke --workdir=/tmp/semantic
Arguments after the colon: `smoke`, `ae=NAME` (default vq-f4).
"""

import ml_collections

from latent_diffusion import config_lib
from latent_diffusion.data import captioned_shapes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('scene_parse150', 256, segmentation_key='annotation', eval_split='test')
  c.autoencoder = config_lib.autoencoder(arg.ae or 'vq-f4', smoke=arg.smoke)
  # Maps to sample come from the stored test examples.
  c.latents = config_lib.latents(splits=('train', 'test'), scale_factor=config_lib.reference_scale(c.autoencoder.name))
  # Channels and steps: ours (the paper gives the first stage and the conditioning).
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=128, channel_mult=(1, 4, 8), attention_resolutions=(32, 16, 8), num_heads=8,
                use_spatial_transformer=False),
      conditioning=dict(kind='none', concat='segmentation', segmentation_classes=151,
                        segmentation_map_channels=3), schedule='inpainting',
      learning_rate=1e-6 * 256, batch_size=256, total_steps=200_000)  # base rate x batch; batch, steps: ours
  c.ldm.loss = 'l1'
  c.sampling = config_lib.sampling(num_steps=100, condition_split='test', condition_indices=tuple(range(8)))
  c.eval = config_lib.evaluation(2_000, reference_split='test', num_reference=2_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
    c.data.update(segmentation_key='segmentation')
    c.ldm.conditioning.segmentation_classes = 1 + len(captioned_shapes.SHAPES)
    c.sampling.condition_split = 'validation'
  return c
