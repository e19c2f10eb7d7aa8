r"""The check to run the day a GPU or TPU is at hand: one table of what this stack does on it, against the
diffusers-Flax UNet in the same process and against the roofline prediction the planner makes from the same
compiled program.

  bash benchmarks/accelerator_check.sh            # smoke and SD-2-sized UNets, bf16 (under 8 minutes on an H200)
  bash benchmarks/accelerator_check.sh --tiny     # a tiny UNet, float32: proves the script on a CPU (tests)
Rows: the UNet train step (AdamW) per attention implementation that applies on this platform, in images/s and
MFU, with the roofline bound (max of XLA's FLOPs over the device's peak, bytes over its bandwidth: plan.py's
rule) beside the measurement; diffusers' FlaxUNet2DConditionModel of the same architecture where diffusers 0.39
(the last with Flax) is installed; and 50-step DDIM + guidance latency per batch.
"""

import argparse
import functools
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sampling_latency  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import unet_train_step as unets  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import flops  # pylint: disable=g-import-not-at-top,wrong-import-position

# The attention implementations that run on each platform ('auto' is one of them, reported as what it picks).
APPLICABLE = {'cpu': ('reference', 'xla'), 'gpu': ('xla', 'cudnn'), 'tpu': ('xla', 'pallas_tpu', 'splash_tpu')}


def _has_diffusers_flax():
  try:
    from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def _roofline(cost, batch):
  """plan.py's bound for one step on this device: (seconds, images/s), or (None, None) on an unknown device."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak, bandwidth = flops.peak_flops(), flops.memory_bandwidth()
  if not (peak and bandwidth and cost):
    return None, None
  seconds = max(cost.get('flops', 0.0) / peak, cost.get('bytes accessed', 0.0) / bandwidth)
  return seconds, batch / seconds if seconds else None


def train_rows(name, cfg, dtype, steps, repeats):
  peak = flops.peak_flops()
  platform = jax.default_backend()
  candidates = [(f'ours {impl}', functools.partial(unets.ours, attention=impl)) for impl in APPLICABLE[platform]]
  if _has_diffusers_flax():
    candidates.append(('diffusers-flax', unets.diffusers_flax))
  rows, reference = [], None
  for label, implementation in candidates:
    try:
      rate, per_image, params, cost = unets.time_jax(cfg, dtype, implementation, steps, repeats, with_cost=True)
    except Exception as e:  # pylint: disable=broad-except
      rows.append((name, dtype, label, 'failed: ' + str(e).splitlines()[0][:80], '', '', '', '', ''))
      continue
    reference = reference or rate
    bound, bound_rate = _roofline(cost, cfg['batch'])
    mfu = f'{rate * per_image / peak:.1%}' if peak else '-'
    rows.append((name, dtype, label, f'{rate:.2f}', f'{rate / reference:.2f}x', mfu,
                 f'{bound_rate:.1f}' if bound_rate else '-', f'{rate / bound_rate:.0%}' if bound_rate else '-',
                 f'{params:,}'))
  return rows


def sampling_rows(name, cfg, num_steps, repeats):
  cfg = {**cfg, 'sample_batch': cfg['batch']}
  rows = []
  implementations = [('ours', sampling_latency.ours)]
  if _has_diffusers_flax():
    implementations.append(('diffusers-flax', sampling_latency.diffusers_flax))
  for label, implementation in implementations:
    seconds = sampling_latency.time_sampler(cfg, implementation, num_steps, repeats)
    per_image = 1e3 * seconds / cfg['sample_batch']
    rows.append((name, label, str(cfg['sample_batch']), f'{seconds:.3f}', f'{per_image:.1f}'))
  return rows


def _print_table(header, rows):
  print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
  for row in rows:
    print('| ' + ' | '.join(row) + ' |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true', help='A tiny UNet in float32: a check of the script itself.')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num_steps', type=int, default=50, help='DDIM steps.')
  args = parser.parse_args()
  names, dtype = (('tiny',), 'float32') if args.tiny else (('smoke', 'sd2'), 'bfloat16')
  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({jax.default_backend()}) x {jax.device_count()}, jax {jax.__version__}; '
        f'peak {flops.peak_flops() or "?"} FLOP/s, {flops.memory_bandwidth() or "?"} B/s; diffusers-flax '
        f'{"present" if _has_diffusers_flax() else "absent (pip install diffusers==0.39.0 to compare)"}')
  rows = []
  for name in names:
    rows += train_rows(name, unets.CONFIGS[name], dtype, args.steps, args.repeats)
  _print_table(('unet', 'dtype', 'train step', 'img/s', 'vs first', 'MFU', 'roofline img/s', 'of roofline',
                'params'), rows)
  rows = []
  for name in names:
    rows += sampling_rows(name, unets.CONFIGS[name], args.num_steps, args.repeats)
  _print_table(('unet', 'sampler', 'images', 'DDIM + guidance s', 'ms/image'), rows)


if __name__ == '__main__':
  main()
