r"""Text-to-image LDM-KL-8-G (paper Sec. 4.3.1): KL-f8 latents 32x32x4, UNet with cross-attention to a text transformer.

Paper scale (a TPU pod; point data.name or data.folder at your caption data, e.g. a folder of images with
same-name .txt captions):
  python -m latent_diffusion.main --config=configs/txt2img.py --workdir=gs://BUCKET/txt2img
On a CPU in minutes, on the built-in captioned_shapes dataset:
  python -m latent_diffusion.main --config=configs/txt2img.py:smoke --workdir=/tmp/ldm
Arguments after the colon: `smoke`, `ae=NAME` (any of config_lib.AUTOENCODERS, e.g. `:smoke,ae=vq-f4`;
the default is kl-f8, or kl-f4 with `smoke`).
"""

import ml_collections

from latent_diffusion import config_lib


# Every colour, shape, size and position of captioned_shapes at least once; 4 seeds each make a 8x4 grid.
SMOKE_PROMPTS = (
    'a large red circle in the center',
    'a small blue square in the top left',
    'a large green triangle in the bottom right',
    'a small yellow circle in the top right',
    'a large purple square in the bottom left',
    'a small orange triangle in the center',
    'a small red square in the top left and a large blue circle in the bottom right',
    'a large yellow triangle in the top right and a small green circle in the bottom left',
)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('captioned_shapes/256', 256)
  # The smoke run uses KL-f4: 32 px images give 8x8 latents, enough for shapes and positions.
  c.autoencoder = config_lib.autoencoder(arg.ae or ('kl-f4' if arg.smoke else 'kl-f8'), smoke=arg.smoke)
  # The latent store: posterior moments of every training image, encoded once by the frozen stage 1.
  c.latents = config_lib.latents(scale_factor=0.18215)  # the paper's scale for KL-f8; 0 measures 1/std(z)
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=8),
      conditioning=config_lib.BERT_EMBEDDER,
      schedule='txt2img', learning_rate=1e-4, batch_size=680, total_steps=390_000)  # the paper's batch, rate, steps
  c.ldm.ema_decay = 0.0  # the reference's use_ema: False
  c.sampling = config_lib.sampling(
      num_steps=250, guidance_scales=(1.5,),
      prompts=('a large red circle in the center',
               'a small blue square in the top left and a large yellow triangle in the bottom right'))
  c.eval = config_lib.evaluation(30_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
    config_lib.smoke_text_encoder(c)
    c.sampling.update(guidance_scales=(3.0,), prompts=SMOKE_PROMPTS)
  return c
