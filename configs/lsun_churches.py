r"""Unconditional LDM-8 on LSUN-Churches (paper Sec. 4.1, the reference lsun_churches-ldm-kl-8): KL-f8 latents
32x32x4 scaled by 1/std(z), a UNet with AttentionBlocks at 32, 16, 8 and 4, scale-shift norm and resblock
up/down, L1 loss, 10k warm-up steps and a constant rate of 5e-5 (the reference does not scale this one).

Paper scale (LSUN from TFDS; prepare `lsun/church_outdoor` in data.data_dir first):
  python -m latent_diffusion.main --config=configs/lsun_churches.py --workdir=gs://BUCKET/churches
On a CPU in minutes, on captioned_shapes (with KL-f4: 8x8 latents):
  python -m latent_diffusion.main --config=configs/lsun_churches.py:smoke --workdir=/tmp/churches
Arguments after the colon: `smoke`, `ae=NAME` (default kl-f8).
"""

import ml_collections

from latent_diffusion import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('lsun/church_outdoor', 256, random_flip=True)
  c.autoencoder = config_lib.autoencoder(arg.ae or ('kl-f4' if arg.smoke else 'kl-f8'), smoke=arg.smoke)
  c.latents = config_lib.latents(scale_factor=config_lib.reference_scale(c.autoencoder.name))
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=192, channel_mult=(1, 2, 2, 4, 4), attention_resolutions=(1, 2, 4, 8),
                num_heads=8, use_scale_shift_norm=True, resblock_updown=True, use_spatial_transformer=False),
      conditioning=dict(kind='none'), schedule='low', learning_rate=5e-5, batch_size=96, total_steps=500_000,
      warmup_steps=10_000, warmup_from=1e-6)  # the steps: ours
  c.ldm.loss = 'l1'
  c.sampling = config_lib.sampling(num_steps=200, seeds=tuple(range(16)))
  c.eval = config_lib.evaluation(50_000, reference_split='train', num_reference=50_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
  return c
