r"""Inpainting LDM-4 (paper Sec. 4.5): the latent of the masked image and the mask, downsampled to the latent
size, are concatenated to the UNet input (3 + 3 + 1 = 7 channels with f4). The reference trains on LaMa's
large masks; we mask one random box per example (1/4 to 3/4 of each side), fixed by the example.

Paper scale (Places from TFDS; prepare `places365_small` in data.data_dir first):
  python -m latent_diffusion.main --config=configs/inpainting.py --workdir=gs://BUCKET/inpainting
On a CPU in minutes, on captioned_shapes:
  python -m latent_diffusion.main --config=configs/inpainting.py:smoke --workdir=/tmp/inpainting
Arguments after the colon: `smoke`, `ae=NAME` (default vq-f4-noattn, inpainting_big's first stage: VQ-f4 without
its middle attention), `text`: text-guided inpainting, ours (no zoo model): the reference's `hybrid` conditioning
(the masked image concatenated, the example's caption cross-attended through the paper's BERTEmbedder, as Stable
Diffusion 2's inpainting model does), SpatialTransformers in place of the AttentionBlocks, guidance trained by
dropping the caption 10% of the time; on captioned_shapes the smoke text encoder of txt2img.
"""

import ml_collections

from latent_diffusion import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='', text=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.data('places365_small', 256, random_flip=True)
  c.autoencoder = config_lib.autoencoder(arg.ae or 'vq-f4-noattn', smoke=arg.smoke)
  c.latents = config_lib.latents(splits=('train', 'validation'),
                                 scale_factor=config_lib.reference_scale(c.autoencoder.name))
  # The reference inpainting_big: its UNet, L1 loss and LambdaWarmUpCosineScheduler (from 0.001 to 0.1 of the
  # base rate 1e-6 x batch in 1k steps, a cosine to 1e-4 of it at 50k); the batch and steps are ours.
  c.ldm = config_lib.ldm(
      unet=dict(model_channels=256, channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_heads=8,
                resblock_updown=True, use_spatial_transformer=arg.text),
      conditioning=dict(config_lib.BERT_EMBEDDER if arg.text else dict(kind='none'), concat='inpainting'),
      schedule='inpainting', learning_rate=1e-6 * 256 * 0.1, batch_size=256, total_steps=200_000,
      warmup_steps=1000, warmup_from=0.01, decay='cosine', decay_steps=50_000, decay_to=1e-3)
  c.ldm.loss = 'l1'
  c.sampling = config_lib.sampling(num_steps=100, condition_indices=tuple(range(8)),
                                   guidance_scales=(3.0,) if arg.text else (1.0,))
  c.eval = config_lib.evaluation(50_000)
  c.mesh = config_lib.mesh()

  if arg.smoke:
    config_lib.shrink_for_smoke(c)
    if arg.text:
      config_lib.smoke_text_encoder(c)
  return c
