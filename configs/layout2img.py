r"""Layout-to-image LDM-4 (paper Sec. 4.3.2, trained there on OpenImages and COCO): VQ-f4 latents 64x64x3 and a
UNet with cross-attention to a transformer over the layout's tokens: per object its class and the two corners
of its box on a grid, as the reference reads boxes (see `conditioning.LayoutTokenizer`).

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
  c.latents = config_lib.latents(splits=('train', 'validation'))
  # Channels, steps and the 16-layer, 512-wide layout transformer over 30 objects (90 tokens): our settings (the
  # paper gives the first stage and the conditioning).
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=128, channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2),
                num_head_channels=32, transformer_depth=3),
      conditioning=dict(kind='layout', num_classes=80, layout_grid=64, max_length=90, width=512, depth=16),
      learning_rate=1e-4, batch_size=256, total_steps=200_000)
  c.sampling = config_lib.sampling(num_steps=100, guidance_scales=(1.5,), condition_indices=tuple(range(8)))
  c.eval = config_lib.evaluation(10_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
    c.data.update(objects_key='objects', max_objects=2)
    c.ldm.conditioning.update(num_classes=captioned_shapes.NUM_CLASSES, layout_grid=16, max_length=6, depth=2)
    c.sampling.update(guidance_scales=(3.0,))
  return c
