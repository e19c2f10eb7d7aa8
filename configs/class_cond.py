r"""Class-conditional LDM-4 (paper Sec. 4.1, the reference cin256-v2): VQ-f4 latents 64x64x3, a UNet with
cross-attention to a one-token class embedding whose last entry is the null class for guidance.

Paper scale (ImageNet from TFDS; prepare `imagenet2012` in data.data_dir first):
  python -m latent_diffusion.main --config=configs/class_cond.py --workdir=gs://BUCKET/cin256
The reference cin-ldm-vq-f8 (VQ-f8 latents 32x32x4, 1000 classes without a null class, so no guidance):
  python -m latent_diffusion.main --config=configs/class_cond.py:f8 --workdir=gs://BUCKET/cin-f8
On a CPU in minutes, on captioned_shapes (18 classes: shape x colour of the first object):
  python -m latent_diffusion.main --config=configs/class_cond.py:smoke --workdir=/tmp/cin
Arguments after the colon: `smoke`, `f8`, `ae=NAME` (default vq-f4, vq-f8 with `f8`).
"""

import ml_collections

from latent_diffusion import config_lib
from latent_diffusion.data import captioned_shapes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, f8=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('imagenet2012', 256, random_flip=True)
  c.autoencoder = config_lib.autoencoder(arg.ae or ('vq-f8' if arg.f8 else 'vq-f4'), smoke=arg.smoke)
  c.latents = config_lib.latents(scale_factor=config_lib.reference_scale(c.autoencoder.name))
  if arg.f8:  # cin-ldm-vq-f8: its base rate 1e-6 x batch 64; the steps are ours
    c.ldm = config_lib.ldm(
        unet=dict(model_channels=256, channel_mult=(1, 2, 4), attention_resolutions=(4, 2, 1),
                  num_head_channels=32),
        conditioning=dict(kind='class', num_classes=1000, width=512), learning_rate=1e-6 * 64, batch_size=64,
        total_steps=400_000)
    c.ldm.p_uncond = 0.0  # no null class to drop to
    guidance = (1.0,)
  else:  # cin256-v2 (one head of full width, no EMA); the batch and steps are our pod settings
    c.ldm = config_lib.ldm(
        unet=dict(model_channels=192, channel_mult=(1, 2, 3, 5), attention_resolutions=(8, 4, 2), num_heads=1),
        conditioning=dict(kind='class', num_classes=1001, width=512),  # id 1000: the null class
        learning_rate=1e-4, batch_size=1024, total_steps=178_000)
    c.ldm.ema_decay = 0.0
    guidance = (1.5,)
  c.sampling = config_lib.sampling(num_steps=250, guidance_scales=guidance, class_ids=(88, 207, 360, 387, 974))
  c.eval = config_lib.evaluation(50_000, reference_split='train', num_reference=50_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
    c.ldm.conditioning.num_classes = captioned_shapes.NUM_CLASSES + 1  # + the null class
    c.ldm.p_uncond = 0.1
    c.sampling.update(guidance_scales=(3.0,), class_ids=tuple(range(0, captioned_shapes.NUM_CLASSES, 3)))
  return c
