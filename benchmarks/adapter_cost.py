r"""What LoRA and ControlNet cost against full fine-tuning of the same UNet: the `ldm` train step of one config
built three ways (all params trained; rank-R LoRA on the attention projections; a ControlNet), side by side in
this process: trained and frozen parameter counts, the bytes XLA plans for the compiled step (arguments, i.e.
params, Adam moments, EMA and the batch; temporaries), and the median step time on this device.
  python benchmarks/adapter_cost.py [--config=configs/txt2img.py:smoke] [--rank=4] [--repeats=10]
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from latent_diffusion import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.data import input_pipeline  # pylint: disable=wrong-import-position
from latent_diffusion.diffusion import schedules  # pylint: disable=wrong-import-position
from latent_diffusion.models import autoencoder  # pylint: disable=wrong-import-position
from latent_diffusion.training import ldm  # pylint: disable=wrong-import-position
from latent_diffusion.training import loop  # pylint: disable=wrong-import-position


def measure(config, repeats):
  """{name: value} for the ldm step of `config` on this host's devices."""
  factor = autoencoder.downsampling_factor(config.autoencoder.model.ch_mult)
  side, channels = config.data.resolution // factor, config.autoencoder.model.embed_dim
  metadata = {'shape': [side, side, 2 * channels], 'kind': 'kl', 'scale_factor': 1.0}
  unet, conditioner, init = ldm.create(config, metadata)
  mesh = parallel.create_mesh(config.mesh)
  state, shardings = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
  step = ldm.make_train_step(config, unet, conditioner, schedules.Schedule.from_config(config.ldm.schedule), 1.0,
                             'kl')
  _, jitted = loop.jit_train_step(step, shardings, mesh)
  b = config.ldm.batch_size
  rng = np.random.default_rng(0)
  batch = {'latent': rng.normal(size=(b, side, side, 2 * channels)).astype(np.float32),
           'segmentation': rng.integers(0, 4, (b, config.data.resolution, config.data.resolution), np.uint8),
           **conditioner.inputs({'caption': ['a large red circle in the center'] * b})}
  batch = input_pipeline.to_global(batch, mesh)
  key = jax.random.PRNGKey(1)
  compiled = jitted.lower(state, batch, key).compile()
  memory = compiled.memory_analysis()
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  seconds = []
  state, _ = compiled(state, batch, key)  # warm-up
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  return {'trained params': count(state.params), 'frozen params': count(state.frozen or {}),
          'optimizer + EMA numbers': count(state.opt_state) + count(state.ema_params or {}),
          'argument MiB': memory.argument_size_in_bytes / 2**20, 'temporary MiB': memory.temp_size_in_bytes / 2**20,
          'step s': statistics.median(seconds)}


_CONFIG = config_flags.DEFINE_config_file('config', 'configs/txt2img.py:smoke', 'The config to build three ways.')
_RANK = flags.DEFINE_integer('rank', 4, 'The LoRA rank.')
_BATCH = flags.DEFINE_integer('batch', 0, "ldm.batch_size (0: the config's).")
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed steps per variant.')


def main(argv):
  del argv
  base = _CONFIG.value
  if _BATCH.value:
    base.ldm.batch_size = _BATCH.value
  factor = autoencoder.downsampling_factor(base.autoencoder.model.ch_mult)
  variants = {'full': {}, f'LoRA r{_RANK.value}': {'ldm.lora.rank': _RANK.value},
              'ControlNet': {'ldm.controlnet.kind': 'segmentation',
                             'ldm.controlnet.embedding_channels': (16, 32, 96, 256)[:factor.bit_length()]}}
  results = {}
  for name, overrides in variants.items():
    config = base.copy_and_resolve_references()
    config.update_from_flattened_dict(overrides)
    results[name] = measure(config, _REPEATS.value)
  print(f'batch {base.ldm.batch_size}, {jax.device_count()} x {jax.devices()[0].platform}')
  print(f'{"":26}' + ''.join(f'{name:>24}' for name in results))
  for field in results['full']:
    full = results['full'][field]
    cells = [f'{r[field]:.4g} ({r[field] / full:.2f}x)' if full else f'{r[field]:.4g}' for r in results.values()]
    print(f'{field:26}' + ''.join(f'{c:>24}' for c in cells))


if __name__ == '__main__':
  app.run(main)
