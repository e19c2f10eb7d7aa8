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


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('captioned_shapes/256', 256)
  # The smoke run uses KL-f4: 32 px images give 8x8 latents, enough for shapes and positions.
  c.autoencoder = config_lib.autoencoder(arg.ae or ('kl-f4' if arg.smoke else 'kl-f8'), smoke=arg.smoke)

  # The latent store: posterior moments of every training image, encoded once by the frozen stage 1.
  c.latents = ml_collections.ConfigDict(dict(
      splits=('train',), dtype='bfloat16', examples_per_shard=10_000, batch_size=256,
      scale_factor=0.18215))  # The paper's text-to-image scale for KL-f8; 0 measures 1/std(z).

  c.ldm = ml_collections.ConfigDict()
  c.ldm.unet = ml_collections.ConfigDict(dict(
      model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2, 1),
      num_heads=8, transformer_depth=1, dropout=0.0))
  # The paper's BERTEmbedder role: a transformer trained jointly with the UNet; its width is the context dim.
  c.ldm.conditioning = ml_collections.ConfigDict(dict(
      kind='text', tokenizer='bytes', vocab_file='', max_length=77, width=1280, depth=32, num_heads=8))
  c.ldm.schedule = ml_collections.ConfigDict(dict(
      kind='scaled_linear', num_timesteps=1000, beta_start=0.00085, beta_end=0.012))
  c.ldm.parameterization = 'eps'
  c.ldm.loss = 'l2'
  c.ldm.min_snr_gamma = 0.0  # > 0: min-SNR loss weighting (Hang et al. 2023), an addition
  c.ldm.p_uncond = 0.1  # Condition dropout for classifier-free guidance.
  c.ldm.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.0, grad_clip=1.0))
  c.ldm.batch_size = 680
  c.ldm.total_steps = 390_000
  c.ldm.ema_decay = 0.9999
  c.ldm.train_schedule = config_lib.train_schedule(log_every=100, checkpoint_every=5000, eval_every=20_000)

  c.sampling = ml_collections.ConfigDict(dict(
      sampler='ddim', num_steps=250, eta=0.0, guidance_scale=1.5, seeds=(0, 1, 2, 3),
      prompts=('a large red circle in the center',
               'a small blue square in the top left and a large yellow triangle in the bottom right')))
  c.eval = ml_collections.ConfigDict(dict(num_samples=30_000, reference_stats='', batch_size=64))
  c.mesh = config_lib.mesh()

  if arg.smoke:
    c.data = config_lib.data('captioned_shapes/32', 32)
    c.latents.update(examples_per_shard=5_000, batch_size=256, scale_factor=0.0)
    c.ldm.unet.update(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                      num_heads=4)
    c.ldm.conditioning.update(max_length=96, width=128, depth=2, num_heads=4)
    c.ldm.optimizer.update(learning_rate=5e-4, warmup_steps=100)
    c.ldm.batch_size = 64
    c.ldm.total_steps = 2000
    c.ldm.ema_decay = 0.999
    c.ldm.train_schedule = config_lib.train_schedule(log_every=50, checkpoint_every=500, eval_every=1000)
    c.sampling.update(num_steps=50, guidance_scale=3.0)
    c.eval.update(num_samples=1000)
  return c
