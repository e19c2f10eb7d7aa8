r"""Our UNet's train step against diffusers' FlaxUNet2DConditionModel (the model maxdiffusion grew from), both
compiled the same way for a TPU slice on this CPU host: per-chip HBM, HBM bytes accessed, FLOPs, side by side.

Runs in the benchmark environment of benchmarks/unet_train_step.py with the TPU compiler added:
  /tmp/bench/bin/pip install 'jax[tpu]==0.10.2'
  /tmp/bench/bin/python benchmarks/tpu_unet_compare.py --config=sd2 --topology=v5p-128 --batch_per_chip=32
Both steps are forward + backward + AdamW on the same batch, data-parallel over every chip (parameters and
optimizer state replicated), in the given compute dtype.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import unet_train_step as unets  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import plan  # pylint: disable=g-import-not-at-top,wrong-import-position

GiB = 2 ** 30


def compile_step(cfg, dtype, implementation, mesh, batch_size):
  """(compiled train step, analytic FLOPs, seconds to compile) of one UNet for abstract inputs on `mesh`."""
  init, apply, layout = implementation(cfg, dtype)
  key = jax.random.PRNGKey(0)
  with jax.set_mesh(mesh):  # traced for the slice's devices (eager work here would need a real TPU)
    params = jax.eval_shape(init, key)
  params, _ = parallel.abstract_structs(params, mesh)  # data-parallel mesh: every parameter replicated
  tx, step = unets.train_step_fn(apply)
  replicated = parallel.replicated(mesh)
  opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                           jax.eval_shape(tx.init, params))
  size, channels = cfg['latent']
  image = (size, size, channels) if layout == 'nhwc' else (channels, size, size)
  batched = lambda shape, dtype: jax.ShapeDtypeStruct((batch_size,) + shape, dtype,
                                                      sharding=parallel.batch_sharding(mesh))
  batch = {'x': batched(image, jnp.float32), 'eps': batched(image, jnp.float32), 't': batched((), jnp.int32),
           'context': batched(cfg['context'], jnp.float32)}
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  seconds = time.perf_counter() - start
  return compiled, flops.count(step, params, opt_state, batch), seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='sd2', choices=sorted(unets.CONFIGS))
  parser.add_argument('--topology', default='v5p-128')
  parser.add_argument('--batch_per_chip', type=int, default=32)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--unets', default='ours,ours_xla,diffusers',
                      help='Which to compile (each takes minutes at SD-2 size): ours, ours_xla, diffusers.')
  args = parser.parse_args()
  topology = plan.parse_topology(args.topology)
  devices = plan.devices(topology)
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1), devices)
  cfg = unets.CONFIGS[args.config]
  batch_size = args.batch_per_chip * topology.chips
  print(f'{args.config} UNet train step, {args.dtype}, {args.batch_per_chip} per chip on {topology}, data-parallel')
  header = ('UNet', 'args GiB', 'temp GiB', 'total GiB', 'HBM bytes/chip', 'XLA FLOPs/chip', 'FLOPs (ours, step)',
            'pallas', 'compile s')
  print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
  implementations = {'ours': ('ours (attention auto)', unets.ours),
                     'ours_xla': ('ours (attention xla)', functools.partial(unets.ours, attention='xla')),
                     'diffusers': ('diffusers-flax 0.39', unets.diffusers_flax)}
  for name, implementation in (implementations[key] for key in args.unets.split(',')):
    compiled, step_flops, seconds = compile_step(cfg, args.dtype, implementation, mesh, batch_size)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + \
        memory.temp_size_in_bytes
    row = (name, f'{memory.argument_size_in_bytes / GiB:.2f}', f'{memory.temp_size_in_bytes / GiB:.2f}',
           f'{total / GiB:.2f}', f'{cost.get("bytes accessed", 0):.3g}', f'{cost.get("flops", 0):.3g}',
           f'{step_flops:.3g}', str(plan.pallas_calls(compiled.as_text())), f'{seconds:.0f}')
    print('| ' + ' | '.join(row) + ' |', flush=True)


if __name__ == '__main__':
  main()
