r"""Fine-tune or sample Stable Diffusion 1.x / 2.x in this stack, from a local diffusers-format folder
(unet/, vae/, text_encoder/, tokenizer/, scheduler/, as `save_pretrained` writes it; nothing is downloaded).

The folder, `pretrained_folder` (config argument `folder=`), is read when the config is built: the UNet and VAE
architectures come from unet/config.json and vae/config.json, the noise schedule and prediction type (eps or v)
from scheduler/scheduler_config.json, and the VAE's scaling factor. The `autoencoder` stage then has nothing to
train (the imported VAE is the first stage), `latents` encodes `data` with it, `ldm` fine-tunes the imported
UNet with the frozen CLIP text encoder, and `sample` / `eval` draw from it:
  python -m latent_diffusion.main --config=configs/sd_finetune.py:folder=/models/stable-diffusion-v1-5 \
      --config.data.folder=/data/my_images --workdir=/tmp/sd_finetune
(`data.folder`: images with same-name .txt captions.) Arguments after the colon, comma-separated:
  folder=PATH  the Stable Diffusion folder (required)
  sample       no fine-tuning: the `ldm` stage keeps the imported UNet as its step-0 checkpoint (the `latents`
               stage still encodes the small `data.eval_split`, whose metadata the later stages read)
  smoke        a CPU-sized run on captioned_shapes/32 (for a tiny random folder, as the tests build)
"""

import json
import os

import ml_collections

from latent_diffusion import config_lib
from latent_diffusion.weights import autoencoder as weights_autoencoder
from latent_diffusion.weights import unet as weights_unet


def _read(folder, name):
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: configs/sd_finetune.py:folder=PATH needs a Stable Diffusion folder '
                            'in diffusers format (unet/, vae/, text_encoder/, tokenizer/, scheduler/).')
  with open(path) as f:
    return json.load(f)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, folder='', sample=False, smoke=False)
  if not arg.folder:
    raise ValueError('configs/sd_finetune.py needs the Stable Diffusion folder: --config=configs/sd_finetune.py:'
                     'folder=/path/to/stable-diffusion (diffusers format, as save_pretrained writes it).')
  unet = weights_unet.from_diffusers_config(_read(arg.folder, 'unet/config.json'))
  vae = weights_autoencoder.from_diffusers_config(_read(arg.folder, 'vae/config.json'))
  scheduler = _read(arg.folder, 'scheduler/scheduler_config.json')
  if scheduler.get('beta_schedule', 'scaled_linear') != 'scaled_linear':
    raise ValueError(f"scheduler_config.json: beta_schedule={scheduler['beta_schedule']!r}; Stable Diffusion "
                     "uses 'scaled_linear', the only one read here.")

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained_folder = arg.folder
  c.data = config_lib.data('captioned_shapes/256', 512)
  c.autoencoder = config_lib.autoencoder('kl-f8')
  c.autoencoder.name = 'pretrained'
  c.autoencoder.model.update(vae['model'])
  c.autoencoder.pretrained = arg.folder
  c.latents = config_lib.latents(scale_factor=vae['scale_factor'])
  c.ldm = config_lib.ldm(
      unet=unet['unet'], conditioning=dict(kind='clip', pretrained=arg.folder, max_length=77),
      schedule='txt2img', learning_rate=1e-5, batch_size=32, total_steps=0 if arg.sample else 10_000,
      warmup_steps=500)
  c.ldm.init_from = arg.folder
  c.ldm.schedule.update(num_timesteps=scheduler.get('num_train_timesteps', 1000),
                        beta_start=scheduler.get('beta_start', 0.00085), beta_end=scheduler.get('beta_end', 0.012))
  c.ldm.parameterization = {'epsilon': 'eps', 'v_prediction': 'v'}[scheduler.get('prediction_type', 'epsilon')]
  c.ldm.train_schedule.update(checkpoint_every=1000, eval_every=2000)
  c.sampling = config_lib.sampling(num_steps=50, guidance_scales=(7.5,), seeds=(0, 1),
                                   prompts=('a photograph of an astronaut riding a horse',))
  c.eval = config_lib.evaluation(10_000)
  c.mesh = config_lib.mesh()
  if arg.sample:
    c.latents.splits = (c.data.eval_split,)

  if arg.smoke:
    c.data = config_lib.data('captioned_shapes/32', 32)
    c.latents.update(examples_per_shard=5_000, splits=('validation',))
    c.ldm.update(batch_size=8, total_steps=0 if arg.sample else 4)
    c.ldm.optimizer.warmup_steps = 1
    c.ldm.train_schedule.update(log_every=2, checkpoint_every=2, eval_every=0)
    c.sampling.update(num_steps=5, batch_size=8, guidance_scales=(3.0,),
                      prompts=('a large red circle in the center', 'a small blue square in the top left'))
    c.eval.update(num_samples=64, num_reference=64, batch_size=32)
  return c
