"""TPU programs compiled on this CPU host (libtpu's compile-only devices, no TPU): the smoke configs' stages on
small slices, with our Pallas kernel exactly where the sequence lengths suit it, batch-sharded activations, and
the planner's FLOPs equal to flops.py's count of the same function."""

import jax
import pytest

from configs import txt2img
from latent_diffusion import flops
from latent_diffusion import parallel
from latent_diffusion import plan
from latent_diffusion import programs
from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.weights import autoencoder as weights_autoencoder

pytestmark = pytest.mark.slow


def _compile(config, stage, topology, mesh):
  topo = plan.parse_topology(topology)
  return plan.compile_plan(stage, config, topo, mesh, plan.devices(topo))


def _activation_gathers(report, global_batch):
  """Collectives whose result holds a whole global batch of activations (rank >= 3, leading dim = the batch)."""
  return [(kind, shape) for kind, shapes in report.collective_shapes for shape in shapes
          if kind != 'all-reduce' and len(shape) >= 3 and shape[0] == global_batch]


def test_txt2img_ldm_step_on_v5e_uses_flash_where_lengths_suit():
  # 64 px -> 16x16 latents: 256-token self-attention at ds 1 (flash), 64 tokens in the middle block at ds 2 and
  # 24-token contexts (XLA).
  config = txt2img.get_config('smoke')
  config.data.resolution = 64
  config.ldm.unet.attention_resolutions = (1,)  # the first level's instead of the smoke UNet's 8x8 level
  config.ldm.batch_size = 24
  mesh = dict(data=2, fsdp=1, tensor=2)
  report = _compile(config, 'ldm', 'v5e:2x2', mesh)
  # Forward: 3 transformers at ds 1 (down_0_0, up_0_0, up_0_1), one flash call each; backward: dkv and dq calls.
  assert report.pallas_calls == 3 * 3
  assert report.fits and 0 < report.total < 16 * plan.GiB
  assert not _activation_gathers(report, 24)
  assert report.collectives['all-reduce'][0] >= 1  # gradients over the data axis
  # The table's FLOPs are flops.py's count of the very function compiled, and near XLA's own count.
  mesh_obj = parallel.create_mesh(dict(config.mesh.to_dict(), **mesh), plan.devices(plan.parse_topology('v5e:2x2')))
  program = programs.build('ldm', config, mesh_obj)
  assert report.flops == flops.count(program.fn, *program.args)
  assert 0.7 < report.xla_flops / report.flops < 1.5
  assert report.roofline_seconds > 0 and report.images_per_second_per_chip > 0


def test_an_fsdp_step_gathers_weights_not_activations():
  """Full fsdp: each chip holds a quarter of the weights and a quarter of the batch. XLA gathered the global batch
  of context projections (bf16[64,24,128]) and resharded activations with all-to-alls until every layer's output
  was pinned to the batch (`layers.Conv` / `layers.Dense`)."""
  config = txt2img.get_config('smoke')
  report = _compile(config, 'ldm', 'v5e:2x2', dict(data=1, fsdp=4, tensor=1))
  assert report.fits and report.collectives['all-gather'][0] > 0  # the weights, gathered for each use
  assert not _activation_gathers(report, config.ldm.batch_size)
  assert 'all-to-all' not in report.collectives, report.collectives
  # Each chip receives the summed gradient of its quarter of the weights only (the TPU compiler's all-reduce fused
  # with the slice kept); all-reduced in full are the vectors too small to shard.
  scattered, reduced = report.collectives['reduce-scatter'][1], report.collectives['all-reduce'][1]
  assert scattered > 2 * reduced, report.collectives


def test_autoencoder_step_and_guided_sampler_compile_for_v4():
  config = txt2img.get_config('smoke')
  mesh = dict(data=2, fsdp=1, tensor=2)
  autoencoder = _compile(config, 'autoencoder', 'v4:2x2x1', mesh)
  assert autoencoder.fits and autoencoder.pallas_calls == 0  # 8x8 latents: no attention long enough for flash
  assert not _activation_gathers(autoencoder, config.autoencoder.batch_size)
  # DDIM x 50 + guidance + decode, one program. Data-parallel, it moves no activations between chips at all:
  # guidance interleaves each image's two rows, so the doubled batch stays in its shards (concatenating the
  # halves cost 9 collective-permutes and 5 all-to-alls of latents and contexts).
  sample = _compile(config, 'sample', 'v4:2x2x1', dict(data=4, fsdp=1, tensor=1))
  assert sample.fits and sample.flops > 50 * 2 * sample.batch_size
  moved = sum(size for kind, (_, size) in sample.collectives.items() if kind != 'all-reduce')
  assert moved < 1024, sample.collectives


def test_a_program_over_the_chips_hbm_is_reported_as_not_fitting():
  # The TPU compiler refuses such a program (RESOURCE_EXHAUSTED) instead of compiling it: the planner reports what
  # the compiler said it needs, and the run ends with the levers instead of a traceback.
  config = txt2img.get_config('smoke')
  plans, problems = plan.run(config, 'v5e:2x2', ['latents'], batch_per_chip=200_000, log=lambda _: None)
  (refused,) = plans
  assert not refused.compiled and not refused.fits and refused.total > 16 * plan.GiB
  first_stage = autoencoder_lib.create_autoencoder(config.autoencoder.model)
  param_bytes = sum(p.size * 4 for p in jax.tree.leaves(weights_autoencoder.abstract_params(first_stage)))
  # One chip's float32 images and (unused) masks, and the replicated first stage.
  assert refused.arguments == 200_000 * (32 * 32 * 3 + 1) * 4 + param_bytes
  assert refused.roofline_seconds is None
  (problem,) = problems
  assert problem.startswith('latents does not fit on v5e:2x2') and 'a smaller batch' in problem
  assert '>=' in plan.table(plans, plan.parse_topology('v5e:2x2'))


@pytest.mark.parametrize('width', [576, 960])
def test_the_flash_kernel_takes_heads_wider_than_128_that_are_not_multiples_of_it(width):
  # class_cond (cin256-v2, one head per level) has 576- and 960-wide heads; the kernel refuses such widths, so
  # they are zero-padded to the next multiple of 128. Forward and backward, on the kernel's shards.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from latent_diffusion.models import attention  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh(dict(data=4, fsdp=1, tensor=1), plan.devices(plan.parse_topology('v5e:2x2')))
  x = jax.ShapeDtypeStruct((8, 256, 1, width), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))
  loss = lambda q, k, v: attention.attention(q, k, v).astype(jnp.float32).sum()
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  assert plan.pallas_calls(compiled.as_text()) == 3  # forward, dkv, dq
