r"""Inpainting LDM-4 (paper Sec. 4.5): the latent of the masked image and the mask, downsampled to the latent
size, are concatenated to the UNet input (3 + 3 + 1 = 7 channels with f4). The reference trains on LaMa's
large masks; we mask one random box per example (1/4 to 3/4 of each side), fixed by the example.

Paper scale (Places from TFDS; prepare `places365_small` in data.data_dir first):
  python -m latent_diffusion.main --config=configs/inpainting.py --workdir=gs://BUCKET/inpainting
On a CPU in minutes, on captioned_shapes:
  python -m latent_diffusion.main --config=configs/inpainting.py:smoke --workdir=/tmp/inpainting
Arguments after the colon: `smoke`, `ae=NAME` (default vq-f4, the paper's first stage for inpainting).
"""

import ml_collections

from latent_diffusion import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('places365_small', 256, random_flip=True)
  c.autoencoder = config_lib.autoencoder(arg.ae or 'vq-f4', smoke=arg.smoke)
  c.latents = config_lib.latents(splits=('train', 'validation'))
  c.ldm = config_lib.ldm(  # channels and steps: ours (the paper gives the first stage and the conditioning)
      unet=dict(model_channels=256, channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_heads=8),
      conditioning=dict(kind='none', concat='inpainting'), schedule='inpainting', learning_rate=1e-4,
      batch_size=256, total_steps=200_000)
  c.sampling = config_lib.sampling(num_steps=100, condition_indices=tuple(range(8)))
  c.eval = config_lib.evaluation(50_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
  return c
