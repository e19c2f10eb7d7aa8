r"""Layout-to-image LDM-4 (paper Sec. 4.3.2, trained there on OpenImages and COCO): VQ-f4 latents 64x64x3 and a
UNet with cross-attention to a transformer over the layout's tokens: per object its class and the two corners
of its box on a grid, the reference's tokens (see `conditioning.ReferenceLayoutTokenizer`).

Paper scale (COCO from TFDS, 80 classes; prepare `coco/2017` in data.data_dir first):
  python -m latent_diffusion.main --config=configs/layout2img.py --workdir=gs://BUCKET/layout2img
On a CPU in minutes, on captioned_shapes (objects of 18 classes, shape x colour; samples are scored against
their layouts, colour and position read from the pixels):
  python -m latent_diffusion.main --config=configs/layout2img.py:smoke --workdir=/tmp/layout2img
Arguments after the colon: `smoke`, `ae=NAME` (default vq-f4).
"""

import ml_collections

from latent_diffusion import config_lib
from latent_diffusion.data import captioned_shapes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('coco/2017', 256, objects_key='objects', max_objects=30)
  c.autoencoder = config_lib.autoencoder(arg.ae or 'vq-f4', smoke=arg.smoke)
  # Layouts to sample come from the stored validation examples.
  c.latents = config_lib.latents(splits=('train', 'validation'),
                                 scale_factor=config_lib.reference_scale(c.autoencoder.name))
  # The reference layout2img-openimages256: its UNet, and its BERTEmbedder (16 layers, 512 wide, 8 heads of 64,
  # q/k/v without bias, 8192 embedding rows, 92 positions) over 30 objects as 90 tokens.
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=128, channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2),
                num_head_channels=32, transformer_depth=3),
      conditioning=dict(kind='layout', num_classes=80, layout_tokens='reference', max_length=92, width=512,
                        depth=16, head_dim=64, qkv_bias=False, vocab_size=8192),
      schedule='inpainting', learning_rate=2e-6 * 24, batch_size=24, total_steps=200_000)  # the steps: ours
  c.ldm.loss = 'l1'
  c.sampling = config_lib.sampling(num_steps=100, guidance_scales=(1.5,), condition_indices=tuple(range(8)))
  c.eval = config_lib.evaluation(10_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
    c.data.update(objects_key='objects', max_objects=2)
    c.ldm.conditioning.update(num_classes=captioned_shapes.NUM_CLASSES, layout_tokens='grid', layout_grid=16,
                              max_length=6, depth=2)
    c.sampling.update(guidance_scales=(3.0,))
  return c
