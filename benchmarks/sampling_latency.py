r"""50-step DDIM sampling with classifier-free guidance: our `ddim_sample` (one jitted program, the loop in
`lax.scan`) vs the loop of diffusers' FlaxStableDiffusionPipeline (`lax.fori_loop` over FlaxDDIMScheduler.step)
with its FlaxUNet2DConditionModel of the same architecture, side by side in one process.

Runs in the benchmark environment of benchmarks/unet_train_step.py (diffusers 0.39, the last with Flax):
  /tmp/bench/bin/python benchmarks/sampling_latency.py --configs=smoke,sd_like
Prints the median latency of a whole batch (after compilation), per image, and the ratio diffusers / ours.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import unet_train_step as unets  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.diffusion import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.diffusion import schedules  # pylint: disable=g-import-not-at-top,wrong-import-position

GUIDANCE = 7.5


def ours(cfg, num_steps):
  init, apply, _ = unets.ours(cfg, 'float32')
  schedule = schedules.Schedule.create('scaled_linear', 1000, 0.00085, 0.012)

  def sample(params, x_T, context, null):
    eps_fn = sampling.guided(lambda x, t, c: apply(params, x, t, c), GUIDANCE, null)
    return sampling.ddim_sample(eps_fn, schedule, x_T, context, num_steps=num_steps)
  return init, sample, 'nhwc'


def diffusers_flax(cfg, num_steps):
  from diffusers import FlaxDDIMScheduler  # pylint: disable=g-import-not-at-top
  init, apply, _ = unets.diffusers_flax(cfg, 'float32')
  scheduler = FlaxDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1)

  def sample(params, x_T, context, null):  # FlaxStableDiffusionPipeline._generate's loop
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps=num_steps, shape=x_T.shape)
    both = jnp.concatenate([null, context])

    def loop_body(step, args):
      latents, state = args
      t = jnp.array(state.timesteps, dtype=jnp.int32)[step]
      latents_input = scheduler.scale_model_input(state, jnp.concatenate([latents] * 2), t)
      noise_pred = apply(params, latents_input, jnp.broadcast_to(t, latents_input.shape[0]), both)
      uncond, text = jnp.split(noise_pred, 2, axis=0)
      latents, state = scheduler.step(state, uncond + GUIDANCE * (text - uncond), t, latents).to_tuple()
      return latents, state

    return jax.lax.fori_loop(0, num_steps, loop_body, (x_T * state.init_noise_sigma, state))[0]
  return init, sample, 'nchw'


def time_sampler(cfg, implementation, num_steps, repeats):
  init, sample, layout = implementation(cfg, num_steps)
  params = init(jax.random.PRNGKey(0))
  size, channels = cfg['latent']
  batch = cfg['sample_batch']
  rng = np.random.default_rng(0)
  shape = (batch, size, size, channels) if layout == 'nhwc' else (batch, channels, size, size)
  x_T = jnp.asarray(rng.normal(size=shape), jnp.float32)
  context = jnp.asarray(rng.normal(size=(batch,) + cfg['context']), jnp.float32)
  null = jnp.zeros_like(context)
  return timing.median_seconds(sample, (params, x_T, context, null), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='smoke,sd_like')
  parser.add_argument('--num_steps', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.num_steps} DDIM steps, cfg '
        f'{GUIDANCE}, median of {args.repeats}')
  print('| config | images | ours s | diffusers-flax s | ours ms/image | diffusers/ours |\n|---|---|---|---|---|---|')
  for name in args.configs.split(','):
    cfg = {**unets.CONFIGS[name], 'sample_batch': 8}
    ours_s = time_sampler(cfg, ours, args.num_steps, args.repeats)
    flax_s = time_sampler(cfg, diffusers_flax, args.num_steps, args.repeats)
    print(f'| {name} | {cfg["sample_batch"]} | {ours_s:.2f} | {flax_s:.2f} | {1e3 * ours_s / cfg["sample_batch"]:.0f} '
          f'| {flax_s / ours_s:.2f}x |', flush=True)


if __name__ == '__main__':
  main()
