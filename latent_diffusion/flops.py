"""Analytic FLOPs of a JAX function, counted from its jaxpr (2 x multiply-adds of every matmul and convolution),
and the peak FLOP/s and memory bandwidth of known accelerators, for throughput, MFU (model FLOPs utilisation) and
roofline reports.

Counting the program's own matmuls keeps the number exact for any config: a train step is counted as the
forward and backward pass that `jax.value_and_grad` traces, with dead code removed as XLA removes it (the parts
of a pullback whose results are dropped, as in the autoencoder's adaptive weight) and no other optimisation.
Rematerialised blocks count their recomputed forward pass too (what the hardware executes), so MFU with remat
reads a little high.
"""

import math
import time

import jax
import jax.extend
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr has no public home

from latent_diffusion.models import attention

# Dense bf16 peak FLOP/s per device (vendor figures), matched against `jax.Device.device_kind`.
PEAK_FLOPS = (('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12),
              ('TPU v5', 459e12), ('TPU v6 lite', 918e12), ('TPU v6e', 918e12), ('A100', 312e12),
              ('H100', 989e12), ('H200', 989e12))


# Memory (HBM) bandwidth per device in bytes/s (vendor figures: Cloud TPU system architecture pages; NVIDIA's A100
# 80GB SXM, H100 SXM and H200 data sheets), for roofline bounds.
MEMORY_BANDWIDTH = (('TPU v4', 1.2e12), ('TPU v5 lite', 8.19e11), ('TPU v5e', 8.19e11), ('TPU v5p', 2.765e12),
                    ('TPU v5', 2.765e12), ('TPU v6 lite', 1.64e12), ('TPU v6e', 1.64e12), ('A100', 2.039e12),
                    ('H100', 3.35e12), ('H200', 4.8e12))


def _lookup(table, device):
  kind = (device or jax.devices()[0]).device_kind
  return next((value for name, value in table if name.lower() in kind.lower()), None)


def peak_flops(device=None):
  """Peak FLOP/s of one device, or None for an unknown kind (a CPU)."""
  return _lookup(PEAK_FLOPS, device)


def memory_bandwidth(device=None):
  """HBM bytes/s of one device, or None for an unknown kind (a CPU)."""
  return _lookup(MEMORY_BANDWIDTH, device)


def _equation_flops(eqn):
  if eqn.primitive.name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
  if eqn.primitive.name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, spatial...)
    kernel = math.prod(rhs[d] for d in spec[2:]) * rhs[spec[1]]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * kernel
  return 0


def _jaxpr_flops(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    total += _equation_flops(eqn)
    repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += repeat * _jaxpr_flops(sub)
  return total


def count(fn, *args, **kwargs):
  """FLOPs of one call of `fn(*args, **kwargs)` (arrays or ShapeDtypeStructs): matmuls and convolutions, with
  attention counted as its matmuls whichever kernel runs it (a Pallas kernel's jaxpr is one block's)."""
  if hasattr(fn, 'lower') and hasattr(fn, '__wrapped__'):  # jitted: its trace cache would not see analytic()
    fn = fn.__wrapped__
  with attention.analytic():
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
  return _jaxpr_flops(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0])


class Throughput:
  """images/s, model TFLOP/s per device and MFU (when the device's peak is known) over a logging window."""

  def __init__(self, step_flops, batch_size):
    self.step_flops, self.batch_size, self.peak = step_flops, batch_size, peak_flops()
    self.restart(0)

  def restart(self, step):
    """Starts a window at `step` (after evaluation or checkpointing, which the rates leave out)."""
    self._time, self._step = time.perf_counter(), step

  def scalars(self, step):
    steps_per_sec = (step - self._step) / max(time.perf_counter() - self._time, 1e-9)
    per_device = self.step_flops * steps_per_sec / jax.device_count()
    out = {'images_per_sec': steps_per_sec * self.batch_size, 'tflops_per_sec_per_device': per_device / 1e12}
    if self.peak:
      out['mfu'] = per_device / self.peak
    return out
