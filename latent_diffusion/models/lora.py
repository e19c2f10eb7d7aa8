"""LoRA (Hu et al. 2022) on the UNet: a kernel W becomes W + scale * down @ up with a rank-r `down` and `up`.

The adapters are a tree of their own, {module path: {'down', 'up'}} mirroring the UNet's params, so the base
stays frozen and the optimizer and EMA hold adapters only. A dense kernel [in, out] gets down [in, r] and up
[r, out]; a conv kernel [kh, kw, in, out] (LoCon) down [kh, kw, in, r] and up [r, out] (a 1x1 conv). As PEFT
initialises them: down uniform in +-1/sqrt(fan_in), up zero, so training starts at the base model.
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = ('to_q', 'to_k', 'to_v', 'to_out')  # ldm.lora.targets' default: the transformers' projections
CONVS = ('in_conv', 'out_conv')  # ldm.lora.conv: the ResBlocks' 3x3 convs as well


def scale_of(lora_config):
  """alpha / rank (alpha 0: the rank, scale 1, as diffusers assumes for files without alphas)."""
  return (lora_config.alpha or lora_config.rank) / lora_config.rank


def module_names(lora_config):
  return tuple(lora_config.targets) + (CONVS if lora_config.conv else ())


def target_paths(unet_params, names):
  """The module paths (tuples) under `unet_params` whose module name is in `names` and that hold a kernel."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
  return sorted(path[:-1] for path in flat if path[-1] == 'kernel' and path[-2] in names)


def init(rng, unet_params, lora_config):
  """Adapters for the targeted modules of (boxed) `unet_params`, boxed with the kernels' logical axes: down
  takes the kernel's input axes, up its output axis; the rank axis is replicated."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
  paths = target_paths(unet_params, module_names(lora_config))
  if not paths:
    raise ValueError(f'ldm.lora.targets={tuple(lora_config.targets)} names no layer of the UNet; use layer names '
                     f'such as {ATTENTION} (or set ldm.lora.conv for the ResBlocks\' convs).')
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = flat[path + ('kernel',)]
    names = kernel.names if isinstance(kernel, nn.Partitioned) else (None,) * kernel.ndim
    shape = nn.meta.unbox(kernel).shape
    bound = 1 / math.prod(shape[:-1])**0.5  # 1 / sqrt(fan_in)
    down = jax.random.uniform(key, shape[:-1] + (lora_config.rank,), jnp.float32, -bound, bound)
    adapters[path + ('down',)] = nn.LogicallyPartitioned(down, names[:-1] + (None,))
    adapters[path + ('up',)] = nn.LogicallyPartitioned(jnp.zeros((lora_config.rank, shape[-1])), (None, names[-1]))
  return flax.traverse_util.unflatten_dict(adapters)


def delta(down, up):
  """The kernel update of one adapter, unscaled: down @ up over the rank axis."""
  return jnp.einsum('...r,ro->...o', down, up)


def _is_adapter(_, node):
  return isinstance(node, dict) and set(node) == {'down', 'up'}


def adapter_paths(adapters):
  """{module path: {'down', 'up'}} of an adapters tree."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(adapters), is_leaf=_is_adapter)


def merge(unet_params, adapters, scale):
  """The UNet params with every adapted kernel W replaced by W + scale * delta (a new tree)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unet_params))
  for path, adapter in adapter_paths(adapters).items():
    kernel = flat[path + ('kernel',)]
    flat[path + ('kernel',)] = kernel + (scale * delta(adapter['down'], adapter['up'])).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat)
