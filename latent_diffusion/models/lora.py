"""LoRA (Hu et al. 2022) on the UNet and the text encoder: a kernel W becomes W + scale * down @ up with a
rank-r `down` and `up`.

The adapters are a tree of their own, {module path: {'down', 'up'}} mirroring the model's params, so the base
stays frozen and the optimizer and EMA hold adapters only. A dense kernel [in, out] gets down [in, r] and up
[r, out]; a conv kernel [kh, kw, in, out] (LoCon) down [kh, kw, in, r] and up [r, out] (a 1x1 conv); the text
encoder's fused q/k/v kernel [in, 3 inner] one adapter per projection, as CLIP's separate q_proj, k_proj and
v_proj have: down [3, in, r], up [3, r, inner]. As PEFT initialises them: down uniform in +-1/sqrt(fan_in), up
zero, so training starts at the base model.
"""

import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = ('to_q', 'to_k', 'to_v', 'to_out')  # ldm.lora.targets' default: the transformers' projections
CONVS = ('in_conv', 'out_conv')  # ldm.lora.conv: the ResBlocks' 3x3 convs as well
# ldm.lora.text_targets, in CLIP's module names (what LoRA files and trainers call them) -> our TextTransformer's
# layer part (q, k and v fused, in that order).
TEXT = {'q_proj': 'qkv', 'k_proj': 'qkv', 'v_proj': 'qkv', 'out_proj': 'out', 'fc1': 'ff1', 'fc2': 'ff2'}
FUSED = {'qkv': 3}  # our fused kernels and their number of projections


def scale_of(lora_config):
  """alpha / rank (alpha 0: the rank, scale 1, as diffusers assumes for files without alphas)."""
  return (lora_config.alpha or lora_config.rank) / lora_config.rank


def module_names(lora_config):
  return tuple(lora_config.targets) + (CONVS if lora_config.conv else ())


def target_paths(params, names):
  """The module paths (tuples) under `params` whose module name is in `names` and that hold a kernel."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return sorted(path[:-1] for path in flat if path[-1] == 'kernel' and path[-2] in names)


def text_part(module):
  """A TextTransformer module name's part: 'layer_3_qkv' -> 'qkv' (None for the embeddings and final norm)."""
  match = re.fullmatch(r'layer_\d+_(\w+)', module)
  return match and match.group(1)


def _init(rng, params, paths, rank):
  """Adapters of rank `rank` for the modules at `paths` of (boxed) `params`, boxed with the kernels' logical
  axes: down takes the kernel's input axes, up its output axis; the rank (and projection) axes are replicated."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = flat[path + ('kernel',)]
    names = kernel.names if isinstance(kernel, nn.Partitioned) else (None,) * kernel.ndim
    shape = nn.meta.unbox(kernel).shape
    parts = FUSED.get(text_part(path[-1]), 0)
    split = (parts,) if parts else ()
    bound = 1 / math.prod(shape[:-1])**0.5  # 1 / sqrt(fan_in)
    down = jax.random.uniform(key, split + shape[:-1] + (rank,), jnp.float32, -bound, bound)
    up = jnp.zeros(split + (rank, shape[-1] // (parts or 1)))
    adapters[path + ('down',)] = nn.LogicallyPartitioned(down, (None,) * len(split) + names[:-1] + (None,))
    adapters[path + ('up',)] = nn.LogicallyPartitioned(up, (None,) * (len(split) + 1) + names[-1:])
  return flax.traverse_util.unflatten_dict(adapters)


def init(rng, unet_params, lora_config):
  """The UNet's adapters for the targeted modules of (boxed) `unet_params`."""
  paths = target_paths(unet_params, module_names(lora_config))
  if not paths:
    raise ValueError(f'ldm.lora.targets={tuple(lora_config.targets)} names no layer of the UNet; use layer names '
                     f'such as {ATTENTION} (or set ldm.lora.conv for the ResBlocks\' convs).')
  return _init(rng, unet_params, paths, lora_config.rank)


def init_text(rng, text_params, lora_config):
  """The text encoder's adapters (a TextTransformer's, for ldm.lora.text_targets in CLIP's names)."""
  parts = {TEXT[name] for name in lora_config.text_targets}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(text_params))
  paths = sorted(p[:-1] for p in flat if p[-1] == 'kernel' and text_part(p[-2]) in parts)
  return _init(rng, text_params, paths, lora_config.rank)


def delta(down, up):
  """The kernel update of one adapter, unscaled: down @ up over the rank axis; a fused kernel's projections
  side by side along its output axis."""
  if up.ndim == 3:  # [p, in, r] @ [p, r, o] -> [in, p o]
    return jnp.einsum('pir,pro->ipo', down, up).reshape(down.shape[1], -1)
  return jnp.einsum('...r,ro->...o', down, up)


def _is_adapter(_, node):
  return isinstance(node, dict) and set(node) == {'down', 'up'}


def adapter_paths(adapters):
  """{module path: {'down', 'up'}} of an adapters tree."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(adapters), is_leaf=_is_adapter)


def merge(params, adapters, scale):
  """The params with every adapted kernel W replaced by W + scale * delta (a new tree)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path, adapter in adapter_paths(adapters).items():
    kernel = flat[path + ('kernel',)]
    flat[path + ('kernel',)] = kernel + (scale * delta(adapter['down'], adapter['up'])).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat)
