r"""ControlNet (Zhang et al. 2023) on a text-to-image LDM: a trainable copy of the UNet's input and middle blocks,
joined to the frozen UNet by zero convolutions, steers it with a control image drawn from each example's
segmentation map ('segmentation': classes in colour; 'edges': their outlines), while the caption gives the rest.

On a CPU, on captioned_shapes, on the txt2img smoke model of the README's main command (its workdir /tmp/ldm is
the frozen base: its autoencoder and its EMA UNet and text encoder):
  python -m latent_diffusion.main --config=configs/controlnet.py:smoke,base=/tmp/ldm --workdir=/tmp/controlnet
On a pod, on a Stable Diffusion folder (diffusers format) and images with same-name .txt captions and control maps:
  python -m latent_diffusion.main --config=configs/controlnet.py:folder=/models/sd15 --workdir=gs://BUCKET/cn
Arguments after the colon: `smoke`, `base=WORKDIR` (a workdir of ours with trained autoencoder and ldm stages),
`folder=PATH` (a Stable Diffusion base instead), `kind=segmentation|edges`, `ae=NAME` (with `base`: its first
stage's). The stored validation examples, with their captions and maps, are what `sample` and `eval` draw.
"""

from latent_diffusion import config_lib
from latent_diffusion.models import autoencoder


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='', base='', folder='', kind='segmentation')
  c = config_lib.frozen_base(arg)
  c.data.segmentation_key = 'segmentation'
  factor = autoencoder.downsampling_factor(c.autoencoder.model.ch_mult)
  c.ldm.controlnet.update(kind=arg.kind, embedding_channels=(16, 32, 96, 256)[:factor.bit_length()])
  c.ldm.optimizer.update(learning_rate=1e-5, warmup_steps=0, decay='constant', grad_clip=0.0)  # the paper's rate
  c.ldm.ema_decay = 0.0  # the ControlNet release keeps no EMA
  c.latents.splits = ('train', 'validation')  # the maps and captions to sample come from the validation store
  c.sampling.update(condition_split='validation', condition_indices=tuple(range(8)))

  if arg.smoke:
    # A short run from the zero convs: a higher rate, decayed, and EMA.
    c.ldm.optimizer.update(learning_rate=2e-4, warmup_steps=50, decay='cosine', grad_clip=1.0)
    c.ldm.ema_decay = 0.99
    c.ldm.total_steps = 600
    c.sampling.guidance_scales = (3.0,)
  return c
