r"""The paper's efficiency claim (Sec. 4.1, Fig. 6): the training cost per image of a pixel-space diffusion model
(LDM-1) against latent ones (LDM-4, LDM-8) with the same UNet, at 64, 128 and 256 px.

For each (resolution, f) the UNet trains on [res/f, res/f, c] inputs (c = 3 for f = 1 and KL-f4, 4 for KL-f8):
analytic FLOPs per image of a train step (forward + backward, `latent_diffusion.flops`), the peak memory XLA
plans for the compiled step (arguments + temporaries), and, where the step is small enough for this device,
the measured images/s. Latents come from the latent store, so the first stage is paid once per image, not per
step; its encode cost is listed separately (one forward of the KL encoder per image).
  python benchmarks/ldm_cost.py [--measure_below_gflops=200]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from latent_diffusion import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.models import autoencoder as autoencoder_lib  # pylint: disable=wrong-import-position
from latent_diffusion.models import unet as unet_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# One UNet for every f (as the paper's comparison): 4 levels, attention at the two coarsest, 77 x 512 context.
UNET = dict(model_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention_resolutions=(4, 8),
            num_heads=8)
CONTEXT = (77, 512)
BATCH = 4
FIRST_STAGES = {1: None, 4: 'kl-f4', 8: 'kl-f8'}


def train_step(model):
  tx = optax.adamw(1e-4)

  def step(params, opt_state, x, t, context):
    loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x, t, context) ** 2)
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return tx, step


def measure(resolution, f, measure_below):
  channels = 3 if f in (1, 4) else 4
  size = resolution // f
  model = unet_lib.UNet(out_channels=channels, **UNET)
  x = jnp.zeros((BATCH, size, size, channels))
  t, context = jnp.zeros((BATCH,), jnp.int32), jnp.zeros((BATCH,) + CONTEXT)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], t[:1], context[:1])['params'])
  tx, step = train_step(model)
  opt_state = jax.eval_shape(tx.init, params)
  per_image = flops.count(step, params, opt_state, x, t, context) / BATCH
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, t, context).compile()
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20 if memory else float('nan')
  rate = float('nan')
  if per_image * BATCH / 1e9 < measure_below:
    real = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (params, opt_state))
    real = compiled(*real, x, t, context)
    jax.block_until_ready(real)
    start = time.perf_counter()
    for _ in range(3):
      real = compiled(*real, x, t, context)
    jax.block_until_ready(real)
    rate = 3 * BATCH / (time.perf_counter() - start)
  return size, channels, per_image, peak, rate


def encoder_flops(name, resolution):
  if name is None:
    return 0.0
  model_config = config_lib.autoencoder(name).model
  model = autoencoder_lib.create_autoencoder(model_config)
  x = jnp.zeros((1, resolution, resolution, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jax.random.PRNGKey(0))['params'])
  return flops.count(lambda p: model.apply({'params': p}, x, method='encode'), params)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolutions', default='64,128,256')
  parser.add_argument('--measure_below_gflops', type=float, default=200.0)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind}; UNet {UNET}, batch {BATCH}, context {CONTEXT}')
  print('| res | model | UNet input | train GFLOP/img | LDM-1 / this | first-stage encode GFLOP/img (once) | '
        'peak MiB (batch 4) | measured img/s |\n|---|---|---|---|---|---|---|---|')
  for resolution in map(int, args.resolutions.split(',')):
    pixel = None
    for f, first_stage in FIRST_STAGES.items():
      size, channels, per_image, peak, rate = measure(resolution, f, args.measure_below_gflops)
      pixel = pixel or per_image
      print(f'| {resolution} | LDM-{f} | {size}x{size}x{channels} | {per_image / 1e9:.1f} | {pixel / per_image:.1f}x | '
            f'{encoder_flops(first_stage, resolution) / 1e9:.1f} | {peak:.0f} | {rate:.2f} |', flush=True)


if __name__ == '__main__':
  main()
