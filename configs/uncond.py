r"""Unconditional LDM-4 (paper Sec. 4.1, the reference celebahq-ldm-vq-4): VQ-f4 latents 64x64x3, no context
(the UNet's transformers attend to the image alone).

Paper scale (any TFDS image dataset, e.g. CelebA-HQ prepared in data.data_dir):
  python -m latent_diffusion.main --config=configs/uncond.py --workdir=gs://BUCKET/celebahq
On a CPU in minutes, on captioned_shapes:
  python -m latent_diffusion.main --config=configs/uncond.py:smoke --workdir=/tmp/uncond
Arguments after the colon: `smoke`, `ae=NAME` (default vq-f4).
"""

import ml_collections

from latent_diffusion import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('celeb_a_hq/256', 256, random_flip=True)
  c.autoencoder = config_lib.autoencoder(arg.ae or 'vq-f4', smoke=arg.smoke)
  c.latents = config_lib.latents(scale_factor=config_lib.reference_scale(c.autoencoder.name))
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=224, channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2),
                num_head_channels=32, use_spatial_transformer=False),
      conditioning=dict(kind='none'), learning_rate=2e-6 * 48, batch_size=48, total_steps=410_000)
  c.sampling = config_lib.sampling(num_steps=200, seeds=tuple(range(16)))
  c.eval = config_lib.evaluation(50_000, reference_split='train', num_reference=50_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
  return c
