r"""LoRA (Hu et al. 2022) fine-tuning of a text-to-image LDM: rank-r adapters on the frozen UNet's attention
projections (and, with `text`, on the CLIP text encoder's q/k/v/out projections) are all that trains; the stage
writes them as diffusers and kohya .safetensors files to WORKDIR/ldm/lora/.

On a CPU, on captioned_shapes, on the txt2img smoke model of the README's main command (its workdir /tmp/ldm is
the frozen base: its autoencoder and its EMA UNet and text encoder):
  python -m latent_diffusion.main --config=configs/lora.py:smoke,base=/tmp/ldm --workdir=/tmp/lora
On a pod, on a Stable Diffusion folder (diffusers format) and images with same-name .txt captions:
  python -m latent_diffusion.main --config=configs/lora.py:folder=/models/sd15,text \
      --config.data.folder=gs://BUCKET/images --workdir=gs://BUCKET/lora
Arguments after the colon: `smoke`, `base=WORKDIR` (a workdir of ours with trained autoencoder and ldm stages),
`folder=PATH` (a Stable Diffusion base instead), `rank=N` (4), `text` (a CLIP text encoder's q/k/v/out_proj
too, as diffusers' DreamBooth LoRA script adapts them), `ae=NAME` (with `base`: its first stage's). The defaults
follow diffusers' train_text_to_image_lora.py: rank 4, alpha = rank, a constant 1e-4, clipping at 1, no EMA.
"""

from latent_diffusion import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ae='', base='', folder='', rank=4, text=False)
  c = config_lib.frozen_base(arg)
  c.ldm.lora.update(rank=arg.rank, alpha=float(arg.rank))  # diffusers' script: alpha = rank, scale 1
  if arg.text:
    c.ldm.lora.text_targets = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
  c.ldm.optimizer.update(learning_rate=1e-4, warmup_steps=0, decay='constant', grad_clip=1.0)
  c.ldm.ema_decay = 0.0  # the script keeps no EMA of the adapters

  if arg.smoke:
    # A short run on a CPU: a higher rate, decayed, and EMA.
    c.ldm.optimizer.update(learning_rate=1e-3, warmup_steps=50, decay='cosine')
    c.ldm.ema_decay = 0.99
    c.ldm.total_steps = 1200
  return c
