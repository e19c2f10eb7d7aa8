r"""UNet train step (forward + backward + AdamW) throughput: ours vs diffusers' FlaxUNet2DConditionModel and the
PyTorch UNet2DConditionModel of the same architecture, side by side in one process on the same device.

diffusers dropped its Flax models after 0.39, so this runs in its own environment (not a test requirement):
  python3 -m venv /tmp/bench && /tmp/bench/bin/pip install diffusers==0.39.0 jax==0.10.2 flax==0.12.8 \
      optax==0.2.8 ml-collections==1.1.0 torch==2.13.0
  /tmp/bench/bin/python benchmarks/unet_train_step.py --configs=smoke,sd_like --dtypes=float32
Prints a table: images/s per implementation (median over repetitions of timed steps after compilation/warm-up),
the ratio ours / diffusers-Flax and ours / PyTorch, analytic GFLOPs per image and the parameter counts (equal
counts are the check that the architectures agree).
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from latent_diffusion import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.models import unet as unet_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# Architectures: (block_out_channels, attention at these levels, layers_per_block, heads, context (tokens, dim),
# latent (size, channels), batch). `smoke` is configs/txt2img.py:smoke's UNet with attention on both levels (the
# config now keeps the 4x4 one only; docs/performance.md's numbers are of this one); `sd_like` has Stable Diffusion's
# layout (4 levels, attention on the first 3, 8 heads, 77 x 768 context) at a width that fits a CPU.
CONFIGS = {
    'smoke': dict(channels=(64, 128), attention=(0, 1), layers=1, heads=4, context=(24, 128), latent=(8, 3),
                  batch=64),
    'sd_like': dict(channels=(64, 128, 256, 256), attention=(0, 1, 2), layers=2, heads=8, context=(77, 768),
                    latent=(32, 4), batch=8),
    # Stable Diffusion 2's UNet at 512 px (MLPerf Training's Stable Diffusion benchmark): heads of 64 channels.
    'sd2': dict(channels=(320, 640, 1280, 1280), attention=(0, 1, 2), layers=2, head_channels=64,
                context=(77, 1024), latent=(64, 4), batch=8),
    'tiny': dict(channels=(32, 64), attention=(0, 1), layers=1, heads=2, context=(8, 32), latent=(8, 4), batch=2),
}


def ours(cfg, dtype, attention='auto'):
  """Our UNet: (init(rng) -> params, apply(params, x NHWC, t, context) -> eps)."""
  c0 = cfg['channels'][0]
  model = unet_lib.UNet(model_channels=c0, out_channels=cfg['latent'][1],
                        channel_mult=tuple(c // c0 for c in cfg['channels']), num_res_blocks=cfg['layers'],
                        attention_resolutions=tuple(2**l for l in cfg['attention']), num_heads=cfg.get('heads', 8),
                        num_head_channels=cfg.get('head_channels', -1), attention=attention, dtype=jnp.dtype(dtype))
  size, channels = cfg['latent']
  x = jnp.zeros((1, size, size, channels))
  init = lambda rng: model.init(rng, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,) + cfg['context']))['params']
  apply = lambda params, x, t, context: model.apply({'params': params}, x, t, context)
  return init, apply, 'nhwc'


def diffusers_flax(cfg, dtype):
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  levels = len(cfg['channels'])
  down = tuple('CrossAttnDownBlock2D' if l in cfg['attention'] else 'DownBlock2D' for l in range(levels))
  up = tuple('CrossAttnUpBlock2D' if l in cfg['attention'] else 'UpBlock2D' for l in reversed(range(levels)))
  size, channels = cfg['latent']
  model = FlaxUNet2DConditionModel(
      sample_size=size, in_channels=channels, out_channels=channels, down_block_types=down, up_block_types=up,
      block_out_channels=cfg['channels'], layers_per_block=cfg['layers'],
      attention_head_dim=_diffusers_heads(cfg),
      cross_attention_dim=cfg['context'][1], dtype=jnp.dtype(dtype))
  init = lambda rng: model.init_weights(rng)
  apply = lambda params, x, t, context: model.apply({'params': params}, x, t, context).sample
  return init, apply, 'nchw'


def _diffusers_heads(cfg):
  """diffusers' `attention_head_dim`, read by its UNets as the number of heads (per level when a tuple)."""
  if 'head_channels' in cfg:
    return tuple(c // cfg['head_channels'] for c in cfg['channels'])
  return cfg['heads']


def train_step_fn(apply):
  tx = optax.adamw(1e-4)

  def step(params, opt_state, batch):
    def loss_fn(p):
      return jnp.mean((apply(p, batch['x'], batch['t'], batch['context']).astype(jnp.float32) - batch['eps']) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, step


def batch_for(cfg, layout, seed=0):
  rng = np.random.default_rng(seed)
  size, channels = cfg['latent']
  shape = (cfg['batch'], size, size, channels) if layout == 'nhwc' else (cfg['batch'], channels, size, size)
  return {'x': jnp.asarray(rng.normal(size=shape), jnp.float32),
          'eps': jnp.asarray(rng.normal(size=shape), jnp.float32),
          't': jnp.asarray(rng.integers(0, 1000, cfg['batch'])),
          'context': jnp.asarray(rng.normal(size=(cfg['batch'],) + cfg['context']), jnp.float32)}


def time_jax(cfg, dtype, implementation, steps, repeats, with_cost=False):
  """(images/s, analytic FLOPs per image, parameter count[, XLA's cost analysis of the step])."""
  init, apply, layout = implementation(cfg, dtype)
  params = init(jax.random.PRNGKey(0))
  tx, step = train_step_fn(apply)
  opt_state = tx.init(params)
  batch = batch_for(cfg, layout)
  step_flops = flops.count(step, params, opt_state, batch)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  cost = compiled.cost_analysis()
  params, opt_state, loss = compiled(params, opt_state, batch)  # warm-up
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      params, opt_state, loss = compiled(params, opt_state, batch)
    loss.block_until_ready()
    rates.append(steps * cfg['batch'] / (time.perf_counter() - start))
  count = sum(x.size for x in jax.tree.leaves(params))
  if with_cost:
    return statistics.median(rates), step_flops / cfg['batch'], count, cost
  return statistics.median(rates), step_flops / cfg['batch'], count


def time_torch(cfg, dtype, steps, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  levels = len(cfg['channels'])
  size, channels = cfg['latent']
  model = UNet2DConditionModel(
      sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=cfg['channels'],
      down_block_types=tuple('CrossAttnDownBlock2D' if l in cfg['attention'] else 'DownBlock2D'
                             for l in range(levels)),
      up_block_types=tuple('CrossAttnUpBlock2D' if l in cfg['attention'] else 'UpBlock2D'
                           for l in reversed(range(levels))),
      layers_per_block=cfg['layers'], attention_head_dim=_diffusers_heads(cfg),
      cross_attention_dim=cfg['context'][1])
  model = model.to(getattr(torch, dtype)).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch_for(cfg, 'nchw').items()}
  cast = lambda v: v.to(getattr(torch, dtype))

  def step():
    optimizer.zero_grad(set_to_none=True)
    out = model(cast(batch['x']), batch['t'], cast(batch['context'])).sample
    loss = torch.mean((out.float() - batch['eps']) ** 2)
    loss.backward()
    optimizer.step()
    return loss

  step()
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    rates.append(steps * cfg['batch'] / (time.perf_counter() - start))
  return statistics.median(rates), sum(p.numel() for p in model.parameters())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='smoke,sd_like')
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}; '
        f'{args.repeats} repetitions x {args.steps} steps, medians')
  header = ('config', 'dtype', 'batch', 'ours img/s', 'diffusers-flax img/s', 'ours/flax', 'torch img/s',
            'ours/torch', 'GFLOP/img', 'params ours/flax/torch')
  print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
  for name in args.configs.split(','):
    cfg = CONFIGS[name]
    for dtype in args.dtypes.split(','):
      ours_rate, per_image, ours_params = time_jax(cfg, dtype, ours, args.steps, args.repeats)
      flax_rate, _, flax_params = time_jax(cfg, dtype, diffusers_flax, args.steps, args.repeats)
      torch_rate, torch_params = (time_torch(cfg, dtype, args.steps, args.repeats) if args.torch
                                  else (float('nan'), 0))
      row = (name, dtype, cfg['batch'], f'{ours_rate:.2f}', f'{flax_rate:.2f}', f'{ours_rate / flax_rate:.2f}x',
             f'{torch_rate:.2f}', f'{ours_rate / torch_rate:.2f}x', f'{per_image / 1e9:.2f}',
             f'{ours_params}/{flax_params}/{torch_params}')
      print('| ' + ' | '.join(str(v) for v in row) + ' |', flush=True)


if __name__ == '__main__':
  main()
