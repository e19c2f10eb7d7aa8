"""The planner: Cloud TPU slice names, the collectives it reads from a compiled program, the batch search, its
clear errors, and a whole plan for this machine's devices."""

import subprocess
import sys

import pytest

from configs import txt2img
from latent_diffusion import flops
from latent_diffusion import parallel
from latent_diffusion import plan
from latent_diffusion import programs


@pytest.mark.parametrize('name, generation, shape', [
    ('v4-8', 'v4', (2, 2, 1)), ('v4-32', 'v4', (2, 2, 4)), ('v5p-128', 'v5p', (4, 4, 4)),
    ('v5p-1024', 'v5p', (8, 8, 8)), ('v5e-64', 'v5e', (8, 8)), ('v5litepod-16', 'v5e', (4, 4)),
    ('v6e-64', 'v6e', (8, 8)), ('v6e-8', 'v6e', (2, 4)), ('v5e:2x2', 'v5e', (2, 2)), ('v4:2x2x1', 'v4', (2, 2, 1))])
def test_slice_names_map_to_topologies(name, generation, shape):
  topology = plan.parse_topology(name)
  assert (topology.generation, topology.shape) == (generation, shape)
  assert topology.chips == {'v4-32': 16, 'v5p-128': 64, 'v5e-64': 64, 'v6e-64': 64}.get(name, topology.chips)


@pytest.mark.parametrize('name, message', [('v9-8', "Unknown --topology 'v9-8'; known: v4-N"),
                                           ('v4-6', 'v4-N takes N = 2 x a power of two'),
                                           ('v5e:2x2x2', 'v5e slices are 2-dimensional')])
def test_unknown_topologies_are_refused_with_the_known_ones(name, message):
  with pytest.raises(ValueError, match=message):
    plan.parse_topology(name)


def test_compile_only_devices_have_the_slice_s_chip_count():
  assert len(plan.devices(plan.parse_topology('v4-8'))) == 4  # megacore: one device per chip
  assert len(plan.devices(plan.parse_topology('v5p-128'))) == 64
  assert len(plan.devices(plan.parse_topology('v5e:2x2', num_slices=2))) == 8
  mesh = parallel.create_mesh(dict(data=4, fsdp=2, tensor=1), plan.devices(plan.parse_topology('v5e:2x2', 2)))
  slices = [[d.slice_index for d in row.ravel()] for row in mesh.devices]  # data spans the two slices
  assert slices[0] == [0, 0] and slices[-1] == [1, 1]


def test_a_missing_tpu_compiler_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(plan.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ValueError, match=r"pip install -e '\.\[tpu\]'"):
    plan.devices(plan.parse_topology('v5e:2x2'))


HLO = """
  %all-reduce.1 = f32[320,640]{1,0} all-reduce(f32[320,640]{1,0} %x), replica_groups={{0,1}}
  %ag = (bf16[12,16,16,64]{3,2,1,0}, bf16[24,16,16,64]{3,2,1,0}) all-gather-start(bf16[12,16,16,64] %y)
  %rs = f32[8]{0} reduce-scatter(f32[16]{0} %z), dimensions={0}
  %fusion = f32[8]{0} fusion(f32[8]{0} %rs), kind=kLoop
}

%all-reduce-scatter.7 (input_0: f32[3,3,128,128], input_1: f32[512,128]) -> (f32[3,3,128,32], f32[128,128]) {
  %input_0 = f32[3,3,128,128]{2,3,1,0} parameter(0)
  %all-reduce.9 = (f32[3,3,128,128]{2,3,1,0}, f32[512,128]{1,0}) all-reduce(%input_0, %input_1), channel_id=1
  ROOT %tuple = (f32[3,3,128,32]{2,3,1,0}, f32[128,128]{1,0}) tuple(%dynamic-slice.1, %dynamic-slice.2)
}

ENTRY %main (p: f32[2]) -> f32[2] {
  %all-reduce.2 = f32[2]{0} all-reduce(f32[2]{0} %p), replica_groups={{0,1}}
"""


def test_collectives_are_counted_with_their_bytes_and_shapes():
  summary, shapes = plan.collectives(HLO)
  assert summary == {'all-reduce': (2, 320 * 640 * 4 + 2 * 4), 'all-gather': (1, 24 * 16 * 16 * 64 * 2),
                     'reduce-scatter': (2, 8 * 4 + (3 * 3 * 128 * 32 + 128 * 128) * 4)}
  assert ('all-gather', [(12, 16, 16, 64), (24, 16, 16, 64)]) in shapes
  assert ('reduce-scatter', [(3, 3, 128, 32), (128, 128)]) in shapes


# Memory per chip in GiB at a per-chip batch n: (arguments, temporaries). Without temporaries the second compile
# doubles (or halves) the batch; with them it aims at the capacity as if they were proportional to the batch.
@pytest.mark.parametrize('first, memory_gib, largest, compiles', [
    (16, lambda n: (0.5 * n, 0), 32, 3),  # linear: 16 and 32 fit, the secant guess 33 does not
    (16, lambda n: (3 + 0.3 * n, 0), 43, 4),  # an offset (parameters and optimizer state)
    (16, lambda n: (0.5 * n + (6 if n > 16 else 0), 0), 20, 5),  # a jump past the config's batch (another fusion)
    (16, lambda n: (20 + n, 0), None, 3),  # nothing fits, down to 1 per chip
    (16, lambda n: (12 + 0.01 * n ** 2, 0), 20, 5),  # curving up
    (16, lambda n: (3, 0.3 * n), 43, 3),  # state + proportional temporaries: aimed at 43, confirmed by 44
    (16, lambda n: (3, 1 + 0.29 * n), 41, 4),  # a constant temporary too: aimed below (36), then the secant
    (16, lambda n: (10, 0.375 * n), 16, 2),  # the config's batch is the largest: one compile above confirms it
    (16, lambda n: (10, 0.5 * n), 12, 3),  # the config's batch does not fit: aimed at 12 from above
    # class_cond on v5e-64 from 32 per chip: the compiler rematerializes up to 72 (9.96 -> 10.62 GiB of
    # temporaries), then gives up (15.95 at 73): aimed at 36, a line to 115; lines past the bracket bisect it (the
    # line through the nearest compiles crawled down from 115 one batch at a time)
    (32, lambda n: (4.66, 9.96 + (n - 32) * 0.0165 if n <= 72 else 15.95 + (n - 73) * 0.17), 72, 9),
    # txt2img's KL-f8 on v6e-64 from 48 per chip (at half scale): 48, 45 and 41 do not fit, 35 to 40 do, flat there;
    # lines short of the bracket bisect it too (the line through 45 and 48 crawled up from 35 one batch at a time)
    (48, lambda n: (0.51, 14.105 + (n - 35) * 0.005 if n <= 40 else 16.105 + (n - 45) * 0.065), 40, 7),
    # the SD-2-sized UNet on v5e-64 (fsdp) from 24 per chip: flat to 35, rising to 45, then over; the line through
    # 24 and 25 aims past 1000, so the guess doubles the largest fit (before: 13 compiles, 6 refusals from 1093 down)
    (24, lambda n: (0.2, 14.73 + (n - 24) * 0.001 if n <= 35 else 14.741 + (n - 35) * 0.066 if n <= 45
                    else 15.9 + (n - 46) * 0.25), 45, 8),
])
def test_find_batch_returns_the_largest_batch_that_fits(monkeypatch, first, memory_gib, largest, compiles):
  config = txt2img.get_config('smoke')
  topology = plan.parse_topology('v5e:2x2')
  config.ldm.batch_size = first * topology.chips
  tried = []

  def fake_compile(stage, config, topology, mesh_sizes, devices):
    batch = config.ldm.batch_size // topology.chips
    tried.append(batch)
    arguments, temporaries = (int(gib * plan.GiB) for gib in memory_gib(batch))
    return plan.Plan(stage, '', {}, config.ldm.batch_size, 4, arguments, temporaries, 0, 0,
                     16 * plan.GiB, 1.0, 1.0, 1.0, 0.0, {}, [], 0, 0.0, 1e12, 1e12)

  monkeypatch.setattr(plan, 'compile_plan', fake_compile)
  found, best, initial = plan.find_batch('ldm', config, topology, None, [], log=lambda _: None)
  assert found == largest and (best is None if largest is None else best.batch_size == largest * 4)
  assert initial.batch_size == first * 4
  assert tried[0] == first and len(tried) == len(set(tried)) == compiles, tried


@pytest.mark.slow  # 70-120 s in the full run: CI and the README command run it
def test_a_plan_for_this_machine_compiles_the_stage_and_counts_its_flops():
  config = txt2img.get_config('smoke')
  lines = []
  plans, problems = plan.run(config, 'local', ['latents', 'eval'], mesh='auto', log=lines.append)
  assert not problems and {p.stage for p in plans} == {'latents', 'eval'}
  assert len(plans) == 2 * len(plan.mesh_candidates(8))
  mesh = parallel.create_mesh(config.mesh)
  program = programs.build('latents', config, mesh)
  latents = next(p for p in plans if p.stage == 'latents' and p.mesh['data'] == 8)
  assert latents.flops == flops.count(program.fn, *program.args) > 0
  assert latents.arguments > 0 and latents.temporaries > 0 and latents.compile_seconds > 0
  table = lines[-1]
  assert table.startswith('Topology local (8 cpu devices)') and table.count('\n| latents |') == 5


@pytest.mark.slow  # 70-120 s in the full run: CI and the README command run it
def test_the_cli_prints_one_error_line_for_bad_input(tmp_path):
  def run(*args):
    done = subprocess.run([sys.executable, '-m', 'latent_diffusion.plan', '--config=configs/txt2img.py:smoke',
                           *args], capture_output=True, text=True, cwd=plan.__file__.rsplit('/', 2)[0], check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith('Error:')]
    assert done.returncode == 1 and len(errors) == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
    return errors[0]

  assert 'known: v4-N' in run('--topology=v9-8')
  assert 'needs 3 devices' in run('--topology=local', '--config.mesh.data=3')
  assert "--mesh=fast: choose 'config'" in run('--topology=local', '--mesh=fast')
  # The config is checked for the slice's platform before any compile; flag mistakes are one line too.
  cudnn = run('--topology=v5e:2x2', '--config.ldm.unet.attention=cudnn')
  assert "ldm.unet.attention='cudnn' runs on GPUs only, and this run's devices are TPUs" in cudnn
  assert "the config has no field 'batchsize'" in run('--topology=local', '--config.ldm.batchsize=8')
  assert '--compilation_cache_dir serves --topology=local only' in run('--topology=v5e:2x2',
                                                                       '--compilation_cache_dir=/tmp/x')


def test_a_batch_that_does_not_divide_over_the_chips_is_planned_at_the_nearest_multiple():
  config = txt2img.get_config('smoke')
  config.latents.batch_size = 30
  lines = []
  plans, _ = plan.run(config, 'local', ['latents'], log=lines.append)
  assert plans[0].batch_size == 24 and 'latents.batch_size=30 does not divide over 8 chips; planning 24' in lines[0]


@pytest.mark.parametrize('message, needed', [
    ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.21G) exceeds '
     'available HBM (15.75G).', (16.21 * plan.GiB, True)),
    ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.50G of '
     '15.75G hbm. Exceeded hbm capacity by 4.75G.', (20.5 * plan.GiB, False)),
    # A kernel out of VMEM is a bug of ours, not a batch too large: raised, not reported as not fitting.
    ('RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Ran out of memory in memory space vmem while allocating '
     'on stack for %flash_mha_bwd_dkv. Scoped allocation with size 16.44M and limit 16.00M exceeded.', None),
    ('INVALID_ARGUMENT: something else', None),
])
def test_the_compilers_refusal_for_hbm_is_read(message, needed):
  assert plan.hbm_exhausted(message) == needed
