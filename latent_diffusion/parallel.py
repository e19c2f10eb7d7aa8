"""Everything about devices in one place: the mesh, logical-axis rules, sharded state creation, multi-host helpers.

Parameters carry logical axis names (`nn.with_logical_partitioning`); `LOGICAL_AXIS_RULES` maps them to the
mesh axes ('data', 'fsdp', 'tensor'). Mesh axes that do not divide a dimension are dropped for it, last first (with
none left the dimension is replicated), so one table serves every model size and device count.
"""

import math

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# In priority order: a mesh axis goes to the first dimension whose rule claims it. The tensor-parallel dimensions
# come first and take fsdp as well, so a kernel never has tensor and fsdp on different dimensions: XLA's SPMD
# partitioner (jax 0.10) miscomputes x @ w for w sharded (tensor, fsdp) on (contracted, kept) dimensions when
# data, fsdp and tensor are all > 1 (tests/test_parallel.py keeps the repro); that is the forward pass of an
# output projection and the backward pass of every other layer.
LOGICAL_AXIS_RULES = (
    ('batch', BATCH_AXES),
    ('mlp', ('tensor', 'fsdp')),  # hidden width of feed-forward layers
    ('heads', ('tensor', 'fsdp')),  # attention heads x head width
    ('vocab', ('tensor', 'fsdp')),
    ('conv_out', ('tensor', 'fsdp')),  # output channels of convolution kernels
    ('embed', 'fsdp'),  # model width of dense layers and embeddings
    ('conv_in', 'fsdp'),  # input channels of convolution kernels
    ('norm', None),  # scales and biases
)


def create_mesh(mesh_config, devices=None):
  """A ('data', 'fsdp', 'tensor') mesh from `config.mesh`; one size may be -1 to use the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at most one -1.')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} devices.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but '
                     f'{len(devices)} are present; set one mesh size to -1 to fill the devices.')
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if num_slices > 1:  # multi-slice: the data axis spans the slices (data-center network), the rest stays inside
    if sizes[0] % num_slices:
      raise ValueError(f'config.mesh.data={sizes[0]} must be a multiple of the {num_slices} slices.')
    grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // num_slices,) + tuple(sizes[1:]),
                                                (num_slices, 1, 1), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_sharding(logical_axes, shape, mesh, rules=LOGICAL_AXIS_RULES):
  """NamedSharding of an array with `shape` whose dimensions have the given logical names (None = replicated).
  Where a parameter's tensor and fsdp would still land on different dimensions (a tensor dimension that fsdp does
  not divide further), fsdp is dropped: see LOGICAL_AXIS_RULES."""
  names = tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes))
  spec = [()] * len(shape)
  used = set()
  for rule_name, rule_axes in rules:
    for i, (name, dim) in enumerate(zip(names, shape)):
      if name != rule_name:
        continue
      axes = (rule_axes,) if isinstance(rule_axes, str) else tuple(rule_axes or ())
      axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
      while dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
      used.update(axes)
      spec[i] = axes
  if 'batch' not in names and {'tensor', 'fsdp'} <= used and not any({'tensor', 'fsdp'} <= set(a) for a in spec):
    spec = [tuple(a for a in axes if a != 'fsdp') for axes in spec]
  return NamedSharding(mesh, P(*(axes[0] if len(axes) == 1 else (axes or None) for axes in spec)))


def tree_shardings(abstract_tree, mesh, rules=LOGICAL_AXIS_RULES):
  """Shardings for a (possibly boxed) pytree of arrays, matching the tree after `nn.meta.unbox`."""
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda spec, x: logical_sharding(spec, x.shape, mesh, rules), specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def abstract_sharded(init_fn, mesh, *args):
  """Shapes of `init_fn(*args)` as ShapeDtypeStructs in their shardings, and the shardings: a state to lower a
  step with, without computing it (`plan.py`). Traced for the mesh's devices, as the step will be."""
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init_fn, *args)
  return abstract_structs(abstract, mesh)


def abstract_structs(abstract_tree, mesh):
  """A (possibly boxed) tree of shapes -> (unboxed ShapeDtypeStructs in their shardings, the shardings)."""
  shardings = tree_shardings(abstract_tree, mesh)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         nn.meta.unbox(abstract_tree), shardings)
  return structs, shardings


def create_sharded(init_fn, mesh, *args):
  """Runs `init_fn(*args)` under jit so that every leaf is created directly in its sharding.

  Returns the unboxed result and its shardings (for `jax.jit(in_shardings=..., out_shardings=...)`).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh)
  arg_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), args)
  init = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), in_shardings=arg_shardings, out_shardings=shardings)
  return init(*args), shardings


def batch_axes(mesh, size):
  """The mesh's batch axes (of size > 1) whose product divides `size`, dropped last first."""
  axes = [a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1]
  while size % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def shard_batch(x):
  """`x` with its leading (batch) dimension split over the batch axes of the mesh in context, its other dimensions
  left to XLA. Every `layers.Conv` and `layers.Dense` output is pinned so: on an fsdp mesh XLA's propagation
  otherwise lets the weights' fsdp sharding spread into the activations and reshards them by the gigabyte. No
  mesh: `x` unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else batch_axes(mesh, x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *(P.UNCONSTRAINED,) * (x.ndim - 1)))


def batch_sharding(mesh):
  """Leading (batch) dimension split over the mesh's batch axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size, mesh, what='batch size'):
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch_size % shards:
    raise ValueError(f'The global {what} {global_batch_size} is not divisible by the {shards} batch shards of '
                     f'the mesh {dict(mesh.shape)}; change the batch size or config.mesh.')


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts JAX's multi-controller runtime: from explicit values, or detected from the environment (TPU, SLURM)."""
  if jax.config.jax_platforms == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU processes talk over TCP
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process():
  return jax.process_index() == 0


def sync(name):
  """Barrier across hosts (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def every_process(flag):
  """True only if `flag` holds on every host (so that hosts take the same branch, in lockstep)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(to_host(np.array([flag]))))


def any_process(flag):
  """True if `flag` holds on some host."""
  return not every_process(not flag)


def to_host_local(tree, mesh):
  """This host's rows of batch-sharded global arrays, as numpy (the inverse of make_array_from_process_local_data)."""
  local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(BATCH_AXES))
  return jax.tree.map(np.asarray, local)


def to_host(tree):
  """Gathers a pytree of (possibly sharded, multi-host) arrays into full numpy arrays on every host."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def put(tree, shardings):
  """Host arrays that every process holds whole (e.g. converted weights) -> global jax.Arrays in `shardings`. Each
  device gets its own copy: the CPU client may alias host memory, and aliased buffers cannot be donated."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda index: np.array(x[index], copy=True)), tree, shardings)
