r"""Plans a run before it costs anything: compiles each stage's real program for a TPU slice on this host.

  python -m latent_diffusion.plan --config=configs/txt2img.py --topology=v5p-128 [--stage=ldm|...|all]
      [--batch_per_chip=N | --find_batch] [--mesh=config|auto] [--num_slices=N] [--config.FIELD=VALUE ...]

libtpu's compile-only devices stand in for the slice (`--topology=local`: this machine's devices), the mesh is
built over them, and the stage's jitted function (programs.py) is lowered with abstract inputs in their shardings
and compiled. One table row per stage and mesh: per-chip HBM (arguments, temporaries, outputs) against the
chip's capacity, FLOPs (flops.py's analytic count and XLA's), HBM bytes accessed, the collectives of the compiled
program, a roofline lower bound of the step time (max of FLOPs over the bf16 peak and bytes over the HBM
bandwidth) with the images/s per chip and MFU ceiling it implies, and the compile time.
"""

import collections
import dataclasses
import importlib.util
import itertools
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from latent_diffusion import cli
from latent_diffusion import flops
from latent_diffusion import parallel
from latent_diffusion import programs
from latent_diffusion import validate

GiB = 2 ** 30
MAX_BATCH_PER_CHIP = 4096


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's HBM per chip (Cloud TPU's system architecture pages: cloud.google.com/tpu/docs/v4, /v5e,
  /v5p, /v6e; peak FLOP/s and bandwidth are flops.py's). `cores_per_name`: how many units a slice name counts
  per chip (v4-32 and v5p-128 count TensorCores, two per chip; v5e-64 and v6e-64 count chips)."""
  name: str
  hbm_bytes: float
  cores_per_name: int
  three_d: bool


CHIPS = {'v4': Chip('TPU v4', 32 * GiB, 2, True), 'v5e': Chip('TPU v5e', 16 * GiB, 1, False),
         'v5p': Chip('TPU v5p', 95 * GiB, 2, True), 'v6e': Chip('TPU v6e', 32 * GiB, 1, False)}
# Aliases as Cloud TPU writes accelerator types.
GENERATIONS = {'v4': 'v4', 'v5litepod': 'v5e', 'v5e': 'v5e', 'v5p': 'v5p', 'v6e': 'v6e'}


def standard_shape(chips, three_d):
  """The slice shape Cloud TPU uses for `chips` chips: v4/v5p from 2x2x1 (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...), v5e/v6e
  from 1x1 (2x2, 2x4, 4x4, ..., 16x16), each doubling growing the smallest axis, the last one on ties."""
  shape = [2, 2, 1] if three_d else [1, 1]
  if three_d and chips < 4:
    raise ValueError(f'{chips} chips: the smallest v4/v5p slice has 4 (2x2x1).')
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice (or several, joined over the data-center network) of one TPU generation, or this machine."""
  generation: str  # a CHIPS key, or 'local'
  shape: tuple
  num_slices: int = 1

  @property
  def chips(self):
    return math.prod(self.shape) * self.num_slices

  @property
  def chip(self):
    return CHIPS.get(self.generation)

  def __str__(self):
    if self.generation == 'local':
      return f'local ({self.chips} {jax.devices()[0].platform} devices)'
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    return f'{self.generation}:{"x".join(map(str, self.shape))}{slices} ({self.chips} chips)'


def parse_topology(name, num_slices=1):
  """'v5p-128' (a Cloud TPU accelerator type), 'v5e:2x2' (generation:shape) or 'local' -> Topology."""
  if name == 'local':
    return Topology('local', (len(jax.devices()),))
  known = ', '.join(f'{g}-N' for g in GENERATIONS) + ", 'GEN:AxB[xC]' (e.g. v5e:2x2, v4:2x2x1) or 'local'"
  match = re.fullmatch(r'(v4|v5litepod|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))', name)
  if not match:
    raise ValueError(f"Unknown --topology '{name}'; known: {known}.")
  generation = GENERATIONS[match.group(1)]
  chip = CHIPS[generation]
  if match.group(3):
    shape = tuple(int(s) for s in match.group(3).split('x'))
    if len(shape) != (3 if chip.three_d else 2):
      raise ValueError(f"--topology '{name}': {generation} slices are {'3' if chip.three_d else '2'}-dimensional.")
  else:
    units = int(match.group(2))
    chips = units // chip.cores_per_name
    if units % chip.cores_per_name or chips < 1 or chips & (chips - 1):
      raise ValueError(f"--topology '{name}': {generation}-N takes N = {chip.cores_per_name} x a power of two.")
    shape = standard_shape(chips, chip.three_d)
  return Topology(generation, shape, num_slices)


def devices(topology):
  """The topology's devices: compile-only TPU devices of every host of the slice(s), or this machine's."""
  if topology.generation == 'local':
    return jax.devices()
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError("The TPU compiler (libtpu) is not installed, so TPU programs cannot be compiled here: "
                     "pip install -e '.[tpu]' (or plan for this machine with --topology=local).")
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compile-only: no TPU to lock, several planners at once
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'chip_config_name': 'megacore'} if topology.chip.three_d else {}
  if topology.num_slices > 1:
    kwargs['num_slices'] = topology.num_slices
  return topologies.get_topology_desc(topology_name=f'{topology.generation}:{"x".join(map(str, topology.shape))}',
                                      platform='tpu', **kwargs).devices


def mesh_candidates(chips):
  """Meshes `--mesh=auto` compares: all data, all fsdp, data x fsdp, fsdp x tensor."""
  out = [dict(data=chips, fsdp=1, tensor=1), dict(data=1, fsdp=chips, tensor=1)]
  out += [dict(data=chips // k, fsdp=k, tensor=1) for k in (4, 8, 16) if chips % k == 0 and chips // k > 1]
  out += [dict(data=1, fsdp=chips // t, tensor=t) for t in (2, 4) if chips % t == 0 and chips // t > 1]
  return out


_COLLECTIVE = re.compile(r'=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|'
                         r'collective-permute)(-start)?\(')
_ARRAY = re.compile(r'(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}


def collectives(hlo_text):
  """{kind: (count, bytes)} of the collectives in a compiled program's text, and each one's result shapes.
  Bytes are each op's result (for async starts, the largest array of its tuple: the gathered or permuted one).
  The TPU compiler writes a reduce-scatter as an all-reduce fused with the slice each chip keeps (a computation
  named `all-reduce-scatter`): it counts as a reduce-scatter of that computation's result."""
  summary, shapes = collections.defaultdict(lambda: [0, 0]), []
  scattered = None  # the result of the all-reduce-scatter computation being read
  for line in hlo_text.splitlines():
    if line[:1] not in ('', ' ', '}'):
      scattered = line.split('->')[-1] if line.startswith('%all-reduce-scatter') else None
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    kind, result = match.group(2), match.group(1)
    if kind == 'all-reduce' and scattered:
      kind, result = 'reduce-scatter', scattered
    arrays = [(dtype, tuple(int(d) for d in dims.split(',') if d)) for dtype, dims in _ARRAY.findall(result)]
    sizes = [_BYTES[dtype] * math.prod(dims) for dtype, dims in arrays]
    summary[kind][0] += 1
    summary[kind][1] += (max(sizes) if match.group(3) and kind != 'all-reduce' else sum(sizes)) if sizes else 0
    shapes.append((kind, [dims for _, dims in arrays]))
  return {k: tuple(v) for k, v in summary.items()}, shapes


_OUR_KERNEL = re.compile(r'^\s*%?(flash_attention|splash_mha)[\w.-]*\s*=')


def pallas_calls(hlo_text):
  """How many Mosaic custom calls of the compiled program are our Pallas kernels (metadata naming `pallas_call`,
  or the flash and splash kernels' own names), as opposed to those the TPU compiler emits for plain XLA code
  (e.g. 'online-softmax' fusions)."""
  return sum(1 for line in hlo_text.splitlines() if 'custom_call_target="tpu_custom_call"' in line
             and ('pallas_call' in line or _OUR_KERNEL.match(line)))


@dataclasses.dataclass
class Plan:
  """One compiled program's report."""
  stage: str
  what: str
  mesh: dict
  batch_size: int
  chips: int
  arguments: int
  temporaries: int
  outputs: int
  aliased: int
  capacity: float
  flops: float
  xla_flops: float
  bytes_accessed: float
  optimal_seconds: float  # XLA's cost model; 0 where it has none (a program with Pallas kernels)
  collectives: dict
  collective_shapes: list
  pallas_calls: int
  compile_seconds: float
  peak_flops: float
  bandwidth: float
  loop_scaled: bool = False  # bytes estimated: XLA's count of a loop body x (analytic / XLA FLOPs)
  hlo: str = dataclasses.field(repr=False, default='')
  compiled: bool = True  # False: the TPU compiler refused it for HBM; memory is what it said the program needs

  @property
  def total(self):
    """Per-chip HBM in use at the peak: arguments + outputs not aliased to (donated) arguments + temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def fits(self):
    return self.compiled and (self.capacity is None or self.total <= self.capacity)

  @property
  def roofline_seconds(self):
    """Lower bound of one call: per-chip FLOPs at the bf16 peak, or per-chip HBM traffic at full bandwidth."""
    if not (self.compiled and self.peak_flops and self.bandwidth):
      return None
    return max(self.flops / self.chips / self.peak_flops, self.bytes_accessed / self.bandwidth)

  @property
  def images_per_second_per_chip(self):
    t = self.roofline_seconds
    return self.batch_size / self.chips / t if t else None

  @property
  def mfu_ceiling(self):
    t = self.roofline_seconds
    return self.flops / self.chips / t / self.peak_flops if t else None


def compile_plan(stage, config, topology, mesh_sizes, all_devices):
  """Builds the stage's Program on a mesh of `mesh_sizes` over the topology's devices, compiles it, reports."""
  mesh_config = dict(config.mesh.to_dict(), **mesh_sizes) if mesh_sizes else config.mesh.to_dict()
  mesh = parallel.create_mesh(mesh_config, all_devices)
  program = programs.build(stage, config, mesh)
  with jax.set_mesh(mesh):  # traced for the mesh's devices: kernel choices follow them (models/attention.py)
    start = time.perf_counter()
    try:
      compiled = program.jitted.lower(*program.args).compile()
    except jax.errors.JaxRuntimeError as e:
      needed = hbm_exhausted(str(e))
      if needed is None:
        raise
      compiled = None
    seconds = time.perf_counter() - start
  step_flops = flops.count(program.fn, *program.args)  # analytic, traced without the mesh: attention as matmuls
  chip = topology.chip
  common = dict(stage=stage, what=program.what, mesh=dict(mesh.shape), batch_size=program.batch_size,
                chips=len(all_devices), capacity=chip.hbm_bytes if chip else None, flops=step_flops,
                compile_seconds=seconds, peak_flops=flops.peak_flops(all_devices[0]),
                bandwidth=flops.memory_bandwidth(all_devices[0]))
  if compiled is None:  # the TPU compiler refuses a program over the chip's HBM: what it said it needs
    arguments = argument_bytes(program.args)
    total, temporaries_only = needed
    return Plan(**common, arguments=arguments, temporaries=total if temporaries_only else max(total - arguments, 0),
                outputs=0, aliased=0, xla_flops=0.0, bytes_accessed=0.0, optimal_seconds=0.0, collectives={},
                collective_shapes=[], pallas_calls=0, compiled=False)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  text = compiled.as_text()
  summary, shapes = collectives(text)
  xla_flops = float(cost.get('flops', 0.0)) * len(all_devices)
  bytes_accessed = float(cost.get('bytes accessed', 0.0))
  loops = ' while(' in text and xla_flops > 0 and step_flops > xla_flops
  if loops:  # XLA's cost model counts a loop body once: scale its bytes by the loop's share of the FLOPs
    bytes_accessed *= step_flops / xla_flops
  return Plan(**common, arguments=memory.argument_size_in_bytes, temporaries=memory.temp_size_in_bytes,
              outputs=memory.output_size_in_bytes, aliased=memory.alias_size_in_bytes, xla_flops=xla_flops,
              bytes_accessed=bytes_accessed, loop_scaled=loops,
              optimal_seconds=max(float(cost.get('optimal_seconds', 0.0)), 0.0), collectives=summary,
              collective_shapes=shapes, pallas_calls=pallas_calls(text), hlo=text)


_HBM_USED = re.compile(r'Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm', re.IGNORECASE)
_HBM_TEMPORARIES = re.compile(r'on HBM, the total memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def hbm_exhausted(message):
  """(bytes per chip, whether they count temporaries only) from the TPU compiler's refusal of a program over the
  chip's HBM; None for any other error (a kernel out of VMEM is our bug, not a batch too large)."""
  if 'RESOURCE_EXHAUSTED' not in message:
    return None
  for pattern, temporaries_only in ((_HBM_USED, False), (_HBM_TEMPORARIES, True)):
    match = pattern.search(message)
    if match:
      return float(match.group(1)) * _UNITS[match.group(2).upper()], temporaries_only
  return None


def argument_bytes(args):
  """Per-device bytes of a program's abstract arguments, from their shardings."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(args) if isinstance(a, jax.ShapeDtypeStruct))


def with_batch(config, stage, batch_per_chip, chips):
  """A copy of `config` whose stage batch is `batch_per_chip` x chips."""
  config = config.copy_and_resolve_references()
  section, field = programs.batch_field(stage).split('.')
  config[section][field] = batch_per_chip * chips
  return config


def _config_batch_per_chip(config, stage, topology, log):
  """0 when the config's batch divides over the chips; else the per-chip batch of the nearest smaller multiple of
  the chip count, said in the log (a plan is a what-if: the paper's 680 fits no power-of-two slice)."""
  section, field = programs.batch_field(stage).split('.')
  batch = config[section][field]
  if batch % topology.chips == 0:
    return 0
  per_chip = max(batch // topology.chips, 1)
  log(f'{section}.{field}={batch} does not divide over {topology.chips} chips; planning {per_chip * topology.chips} '
      f'({per_chip} per chip).')
  return per_chip


def find_batch(stage, config, topology, mesh_sizes, all_devices, log=print):
  """(the largest per-chip batch whose program fits, its plan, the plan at the config's batch). Memory grows
  about linearly with the batch: the second compile aims at the capacity as if temporaries were proportional to
  the batch (parameters and optimizer state are not), then secant steps through the two nearest compiles guess
  the largest that fits and compiles at the guess and one above confirm it: three or four compiles of minutes
  each where a doubling search takes a dozen; a config batch near the answer makes it two. Where memory is not
  linear (the TPU compiler rematerializes to fit) a guess beyond the bracket or past twice the largest fit, or
  any after four, bisects it (or doubles the largest fit while nothing above it has failed)."""
  section, field = programs.batch_field(stage).split('.')
  plans = {}

  def compile_at(n):
    plans[n] = compile_plan(stage, with_batch(config, stage, n, topology.chips), topology, mesh_sizes, all_devices)
    log(f'  {stage} batch/chip {n}: {plans[n].total / GiB:.2f} GiB per chip, '
        f'{"fits" if plans[n].fits else "does not fit"}')
    return plans[n]

  first = max(config[section][field] // topology.chips, 1)
  initial = compile_at(first)
  if initial.capacity and initial.temporaries:
    room = initial.capacity - initial.total + initial.temporaries
    second = math.floor(room * first / initial.temporaries)
  else:
    second = first * 2 if initial.fits else first // 2
  second = min(max(second, first + 1), MAX_BATCH_PER_CHIP) if initial.fits else max(min(second, first - 1), 1)
  if second != first:
    compile_at(second)
  for guesses in itertools.count():
    low = max((n for n, p in plans.items() if p.fits), default=0)
    high = min((n for n, p in plans.items() if not p.fits), default=MAX_BATCH_PER_CHIP + 1)
    if high == low + 1:
      return low or None, plans.get(low), plans[first]
    capacity = plans[low or high].capacity
    # The line through the two compiled batches nearest the boundary, solved for the capacity.
    a, b = sorted(sorted(plans, key=lambda n: abs(plans[n].total - (capacity or 0)))[:2])
    slope = (plans[b].total - plans[a].total) / (b - a) if b != a else 0
    guess = a + math.floor((capacity - plans[a].total) / slope) if capacity and slope > 0 and guesses < 4 else high
    # No line, or one that misses the bracket or more than doubles the largest fit (the compiler rematerializes to
    # fit, so memory is flat on one side and a line through it aims far off).
    if guess >= high or (low > 0 and not low <= guess <= 2 * low):
      guess = 2 * low if high > MAX_BATCH_PER_CHIP else (low + high) // 2
    compile_at(min(max(guess, low + 1), high - 1))


def _format_collectives(summary):
  if not summary:
    return '-'
  short = {'all-reduce': 'AR', 'all-gather': 'AG', 'reduce-scatter': 'RS', 'all-to-all': 'A2A',
           'collective-permute': 'CP'}
  return ' '.join(f'{short[k]} {n}x{b / 2**20:.0f}M' for k, (n, b) in sorted(summary.items()))


def table(plans, topology):
  """The report as a Markdown table."""
  header = ('stage', 'mesh d/f/t', 'batch/chip', 'args GiB', 'temp GiB', 'out GiB', 'total/HBM GiB', 'fits',
            'FLOPs (ours)', 'FLOPs (XLA)', 'HBM bytes/chip', 'collectives', 'pallas', 'roofline s', 'img/s/chip',
            'MFU ceiling', 'XLA optimal s', 'compile s')
  rows = []
  for p in plans:
    capacity = f'{p.capacity / GiB:.0f}' if p.capacity else '?'
    t = p.roofline_seconds
    rows.append((
        p.stage, '/'.join(str(p.mesh[a]) for a in parallel.MESH_AXES), f'{p.batch_size / p.chips:g}',
        f'{p.arguments / GiB:.2f}', f'{p.temporaries / GiB:.2f}', f'{p.outputs / GiB:.2f}',
        ('' if p.compiled else '>=') + f'{p.total / GiB:.2f}/{capacity}', 'yes' if p.fits else 'NO',
        f'{p.flops:.3g}', f'{p.xla_flops:.3g}' if p.compiled else '-',
        (('~' if p.loop_scaled else '') + f'{p.bytes_accessed:.3g}') if p.compiled else '-',
        _format_collectives(p.collectives), str(p.pallas_calls) if p.compiled else '-',
        f'{t:.4g}' if t else '-', f'{p.images_per_second_per_chip:.3g}' if t else '-',
        f'{p.mfu_ceiling:.0%}' if t else '-', f'{p.optimal_seconds:.4g}' if p.optimal_seconds else '-',
        f'{p.compile_seconds:.1f}'))
  lines = [f'Topology {topology}', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  if any(p.loop_scaled for p in plans):
    lines.append("~: XLA counts a loop's body once; its bytes are scaled by our FLOPs over XLA's (the sampler).")
  if not all(p.compiled for p in plans):
    lines.append('>=: the TPU compiler refused the program for running out of HBM; the memory it reported needing.')
  return '\n'.join(lines)


def best(plans):
  """The fastest plan that fits, by the roofline bound per image, then XLA's optimal_seconds per image."""
  fitting = [p for p in plans if p.fits]
  return min(fitting, key=lambda p: ((p.roofline_seconds or 0) / p.batch_size, p.optimal_seconds / p.batch_size),
             default=None)


def does_not_fit(plan, topology):
  return (f'{plan.stage} does not fit on {topology}: it needs {plan.total / GiB:.2f} GiB per chip, a '
          f'{topology.chip.name} has {plan.capacity / GiB:.0f} GiB. Levers: ldm.unet.remat=all, '
          "ldm.unet.dtype=bfloat16, an fsdp mesh (--mesh=auto or --config.mesh.fsdp=-1 --config.mesh.data=1), "
          'a smaller batch (--find_batch).')


def run(config, topology_name, stages, *, num_slices=1, batch_per_chip=0, search_batch=False, mesh='config',
        log=print):
  """Plans `stages`; returns (plans, messages about what does not fit)."""
  topology = parse_topology(topology_name, num_slices)
  all_devices = devices(topology)
  if mesh not in ('config', 'auto'):
    raise ValueError(f"--mesh={mesh}: choose 'config' (config.mesh) or 'auto' (compare data, fsdp, tensor).")
  # The config's choices, files and shapes, for the slice's platform (batches are the planner's to set).
  validate.check(config, parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1), all_devices), batches=False)
  candidates = mesh_candidates(topology.chips) if mesh == 'auto' else [None]
  plans, problems = [], []
  for stage in stages:
    per_chip = batch_per_chip or _config_batch_per_chip(config, stage, topology, log)
    stage_config = with_batch(config, stage, per_chip, topology.chips) if per_chip else config
    stage_plans = []
    for sizes in candidates:
      log(f'Compiling {stage} on {topology}, mesh {sizes or dict(config.mesh)} ...')
      if search_batch:
        found, plan, initial = find_batch(stage, stage_config, topology, sizes, all_devices, log)
        log(f'  largest batch per chip that fits: {found}')
        if initial is not plan:
          stage_plans.append(initial)
      else:
        plan = compile_plan(stage, stage_config, topology, sizes, all_devices)
      if plan is not None:
        stage_plans.append(plan)
    chosen = best(stage_plans)
    if chosen is None and stage_plans:
      problems.append(does_not_fit(min(stage_plans, key=lambda p: p.total), topology))
    elif mesh == 'auto':
      log(f'{stage}: fastest mesh that fits (roofline): {chosen.mesh}')
    plans += stage_plans
  log(table(plans, topology))
  return plans, problems


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/txt2img.py.', lock_config=True)
flags.DEFINE_string('topology', 'local', "A Cloud TPU slice (v4-32, v5e-64, v5p-128, v6e-64), 'v5e:2x2', or "
                    "'local' for this machine's devices.")
flags.DEFINE_enum('stage', 'ldm', ('all',) + programs.STAGES, 'Stage to plan; `all` plans every stage.')
flags.DEFINE_integer('num_slices', 1, 'Slices joined over the data-center network (multi-slice).')
flags.DEFINE_integer('batch_per_chip', 0, "Per-chip batch (the stage's global batch / chips); 0 keeps the config's.")
flags.DEFINE_bool('find_batch', False, 'Find the largest per-chip batch that fits.')
flags.DEFINE_string('mesh', 'config', "'config' (config.mesh) or 'auto' (compare data, fsdp and tensor splits).")
flags.DEFINE_string('compilation_cache_dir', '', "JAX's persistent compilation cache, for --topology=local: programs "
                    'compiled before load from it (their compile time then reads as the load time).')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  stages = programs.STAGES if FLAGS.stage == 'all' else (FLAGS.stage,)
  if FLAGS.compilation_cache_dir:
    if FLAGS.topology != 'local':  # jax cannot load a TPU program without a TPU: entries would be written, never read
      raise SystemExit(f'Error: --compilation_cache_dir serves --topology=local only, not {FLAGS.topology}: JAX '
                       'loads a cached TPU program only on a TPU. Leave the flag out.')
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  try:
    _, problems = run(FLAGS.config, FLAGS.topology, stages, num_slices=FLAGS.num_slices,
                      batch_per_chip=FLAGS.batch_per_chip, search_batch=FLAGS.find_batch, mesh=FLAGS.mesh)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'Error: {e}') from e
  for problem in problems:
    print(f'Error: {problem}', file=sys.stderr)
  if problems:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
