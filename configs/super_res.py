r"""Super-resolution LDM-4 (paper Sec. 4.4): the low-resolution image, at the latent size, is concatenated to
the UNet input (4x: 64x64 -> 256x256 with f4 latents of 64x64x3). The reference degrades with bicubic
downsampling; we average 4x4 blocks of the target image.

Paper scale (ImageNet from TFDS; prepare `imagenet2012` in data.data_dir first):
  python -m latent_diffusion.main --config=configs/super_res.py --workdir=gs://BUCKET/sr
On a CPU in minutes, on captioned_shapes (8x8 -> 32x32):
  python -m latent_diffusion.main --config=configs/super_res.py:smoke --workdir=/tmp/sr
Arguments after the colon: `smoke`, `ae=NAME` (default vq-f4; the factor is the first stage's).
"""

import ml_collections

from latent_diffusion import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('imagenet2012', 256, random_flip=True)
  c.autoencoder = config_lib.autoencoder(arg.ae or 'vq-f4', smoke=arg.smoke)
  # Conditions for sampling come from the stored validation examples.
  c.latents = config_lib.latents(splits=('train', 'validation'),
                                 scale_factor=config_lib.reference_scale(c.autoencoder.name))
  c.ldm = config_lib.ldm(  # the reference bsr_sr (its base rate 1e-6 x batch 64); the steps are ours
      unet=dict(model_channels=160, channel_mult=(1, 2, 2, 4), attention_resolutions=(16, 8),
                num_head_channels=32, use_spatial_transformer=False),
      conditioning=dict(kind='none', concat='low_res'), schedule='low', learning_rate=1e-6 * 64, batch_size=64,
      total_steps=200_000)
  c.sampling = config_lib.sampling(num_steps=100, condition_indices=tuple(range(8)))
  c.eval = config_lib.evaluation(50_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
  return c
