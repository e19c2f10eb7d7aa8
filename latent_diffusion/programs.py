"""Each stage's jitted function with abstract inputs in their shardings: what `plan.py` compiles for any devices.

The functions and shardings are the stages' own (the `ldm` and `autoencoder` train steps as the loop jits them,
the latents encoder, the guided sampling loop with decoding, the FID feature extractor); only the inputs are
`jax.ShapeDtypeStruct`s derived from the config, so nothing is read, initialised or computed.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from latent_diffusion import parallel
from latent_diffusion.diffusion import concat as concat_lib
from latent_diffusion.diffusion import generate
from latent_diffusion.diffusion import schedules
from latent_diffusion.evaluation import features
from latent_diffusion.evaluation import inception
from latent_diffusion.losses import lpips as lpips_lib
from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.models import controlnet as controlnet_lib
from latent_diffusion.models import discriminator as discriminator_lib
from latent_diffusion.models import tiling
from latent_diffusion.training import autoencoder as autoencoder_stage
from latent_diffusion.training import latents as latents_stage
from latent_diffusion.training import ldm as ldm_stage
from latent_diffusion.training import loop
from latent_diffusion.weights import autoencoder as weights_autoencoder

STAGES = ('autoencoder', 'latents', 'ldm', 'sample', 'eval')


@dataclasses.dataclass
class Program:
  """One call of a stage's jitted function: `jitted(*args)` processes `batch_size` images; `fn` is the same
  function unjitted-or-not, for the analytic FLOP count (flops.py)."""
  stage: str
  what: str
  jitted: Any
  fn: Callable
  args: tuple
  batch_size: int


def batch_field(stage):
  """The config field that holds a stage's global batch size."""
  return {'autoencoder': 'autoencoder.batch_size', 'latents': 'latents.batch_size', 'ldm': 'ldm.batch_size',
          'sample': 'sampling.batch_size', 'eval': 'eval.batch_size'}[stage]


def build(stage, config, mesh):
  """The Program of `stage` for `config` on `mesh` (the batch size of `batch_field(stage)`)."""
  builders = {'autoencoder': _autoencoder, 'latents': _latents, 'ldm': _ldm, 'sample': _sample, 'eval': _eval}
  if stage not in builders:
    raise ValueError(f"Unknown stage '{stage}'; choose one of {STAGES}.")
  return builders[stage](config, mesh)


def _struct(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _rng(mesh):
  return _struct((2,), jnp.uint32, parallel.replicated(mesh))


def _image_shape(config):
  return (config.data.resolution, config.data.resolution, 3)


def latent_metadata(config):
  """What the latent store's metadata would say for this config: the stored shape (KL: mean and logvar), kind,
  scale (1.0 where the store would measure it)."""
  model = config.autoencoder.model
  factor = autoencoder_lib.downsampling_factor(model.ch_mult)
  if config.data.resolution % factor:
    raise ValueError(f'data.resolution={config.data.resolution} does not divide by the first stage\'s '
                     f'downsampling factor {factor}; choose a multiple of {factor}.')
  size = config.data.resolution // factor
  channels = model.embed_dim * (2 if model.kind == 'kl' else 1)
  return {'shape': [size, size, channels], 'kind': model.kind, 'scale_factor': config.latents.scale_factor or 1.0}


def _batched(tree, batch_size, mesh):
  """Structs of a tree of one-example arrays with the batch dimension set to `batch_size`, batch-sharded."""
  return jax.tree.map(lambda x: _struct((batch_size,) + tuple(x.shape[1:]), x.dtype, parallel.batch_sharding(mesh)),
                      tree)


def _concat_inputs(config, batch_size, mesh, latent_shape):
  """The stored conditions of a training batch: concat inputs, a ControlNet's maps or images."""
  concat = config.ldm.conditioning.concat
  h, w, c = latent_shape
  r = config.data.resolution
  shapes = {'low_res': ((h, w, 3), jnp.float32), 'masked_latent': ((h, w, c), jnp.float32),
            'inpaint_mask': ((h, w, 1), jnp.float32), 'segmentation': ((r, r), jnp.uint8),
            'control': ((r, r, 3), jnp.uint8)}
  kind = config.ldm.controlnet.kind
  keys = concat_lib.KEYS[concat] + ((controlnet_lib.STORED[kind],) if kind else ())  # a ControlNet's input
  return {k: _struct((batch_size,) + shapes[k][0], shapes[k][1], parallel.batch_sharding(mesh)) for k in keys}


def _ldm_parts(config, mesh):
  metadata = latent_metadata(config)
  unet, conditioner, init = ldm_stage.create(config, metadata)
  state, shardings = parallel.abstract_sharded(init, mesh, _rng(mesh))
  return metadata, unet, conditioner, state, shardings


def _ldm(config, mesh):
  metadata, unet, conditioner, state, shardings = _ldm_parts(config, mesh)
  schedule = schedules.Schedule.from_config(config.ldm.schedule)
  step = ldm_stage.make_train_step(config, unet, conditioner, schedule, metadata['scale_factor'], metadata['kind'])
  step, jitted = loop.jit_train_step(step, shardings, mesh, config.ldm.train_schedule.on_nonfinite)
  b = config.ldm.batch_size
  parallel.check_batch_size(b, mesh, 'ldm.batch_size')
  shape = ldm_stage.stored_latent_shape(metadata)
  batch = {'latent': _struct((b,) + tuple(metadata['shape']), jnp.float32, parallel.batch_sharding(mesh)),
           **_concat_inputs(config, b, mesh, shape),
           **_batched(jax.tree.map(jnp.asarray, conditioner.null), b, mesh)}
  return Program('ldm', 'train step', jitted, step, (state, batch, _rng(mesh)), b)


def _autoencoder(config, mesh):
  ae = config.autoencoder
  model = autoencoder_lib.create_autoencoder(ae.model)
  discriminator = discriminator_lib.NLayerDiscriminator(ndf=ae.loss.disc_ndf, n_layers=ae.loss.disc_num_layers)
  init = autoencoder_stage.make_init(config, model, discriminator, _image_shape(config))
  state, shardings = parallel.abstract_sharded(init, mesh, _rng(mesh))
  b = ae.batch_size
  parallel.check_batch_size(b, mesh, 'autoencoder.batch_size')
  batch = {'image': _struct((b,) + _image_shape(config), jnp.float32, parallel.batch_sharding(mesh))}
  replicated = parallel.replicated(mesh)
  if ae.loss.perceptual_weight > 0:  # the frozen LPIPS network: an argument here, a constant in the stage
    x = jnp.zeros((1,) + _image_shape(config))
    lpips = jax.tree.map(lambda a: _struct(a.shape, a.dtype, replicated),
                         jax.eval_shape(lpips_lib.LPIPS().init, jax.random.PRNGKey(0), x, x)['params'])
  else:
    lpips = None

  def step(state, batch, rng, lpips_params):
    return autoencoder_stage.make_train_step(config, model, discriminator, lpips_params)(state, batch, rng)

  jitted = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), replicated, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  return Program('autoencoder', 'train step (+ discriminator, LPIPS)', jitted, step,
                 (state, batch, _rng(mesh), lpips), b)


def _first_stage_params(model, mesh):
  return parallel.abstract_structs(weights_autoencoder.abstract_params(model), mesh)[0]


def _latents(config, mesh):
  model = autoencoder_lib.create_autoencoder(config.autoencoder.model)
  concat = config.ldm.conditioning.concat
  encode = latents_stage.make_encode(model, config.autoencoder.model.kind, concat, config.autoencoder.tiling)
  b = config.latents.batch_size
  parallel.check_batch_size(b, mesh, 'latents.batch_size')
  r = config.data.resolution
  mask_shape = (b, r, r, 1) if concat == 'inpainting' else (b, 1, 1, 1)
  args = (_first_stage_params(model, mesh), _struct((b,) + _image_shape(config), jnp.float32,
                                                    parallel.batch_sharding(mesh)),
          _struct(mask_shape, jnp.float32, parallel.batch_sharding(mesh)))
  return Program('latents', 'encode batch', encode, encode, args, b)


def _sample(config, mesh):
  metadata, unet, conditioner, state, _ = _ldm_parts(config, mesh)
  model = autoencoder_lib.create_autoencoder(config.autoencoder.model)
  concat, control = config.ldm.conditioning.concat, config.ldm.controlnet.kind
  latent_shape = ldm_stage.sample_latent_shape(config, metadata)
  generator = generate.Generator(
      unet=unet, conditioner=conditioner, schedule=schedules.Schedule.from_config(config.ldm.schedule),
      parameterization=config.ldm.parameterization,
      decoder=lambda params, z: tiling.decode(model, params, z, config.autoencoder.tiling),
      latent_shape=latent_shape, scale_factor=metadata['scale_factor'], sampling_config=config.sampling, mesh=mesh,
      concat=concat, segmentation_classes=config.ldm.conditioning.segmentation_classes, control=control,
      controlnet=controlnet_lib.create(unet, config.ldm.controlnet) if control else None)
  b = config.sampling.batch_size
  inputs = _batched(jax.tree.map(jnp.asarray, conditioner.null), b, mesh)
  if concat:
    channels = concat_lib.num_channels(concat, latent_shape[-1], config.ldm.conditioning.segmentation_classes)
    inputs['concat'] = _struct((b,) + tuple(latent_shape[:2]) + (channels,), jnp.float32,
                               parallel.batch_sharding(mesh))
  if control:
    side = controlnet_lib.image_size(generator.controlnet, latent_shape[0])
    inputs['control'] = _struct((b, side, side, 3), jnp.float32, parallel.batch_sharding(mesh))
  seeds = _struct((b,), jnp.int32, parallel.batch_sharding(mesh))
  scale = _struct((), jnp.float32, parallel.replicated(mesh))
  args = (state.eval_params, _first_stage_params(model, mesh), inputs, seeds, scale)
  what = f'{config.sampling.sampler} x {config.sampling.num_steps} steps + guidance + decode'
  return Program('sample', what, generator.jitted, generator.jitted, args, b)


def _eval(config, mesh):
  model = inception.FIDInceptionV3(inception.NUM_CLASSES)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
  apply = features.make_apply(model, mesh, config.eval.preprocessing)
  b = config.eval.batch_size
  parallel.check_batch_size(b, mesh, 'eval.batch_size')
  images = _struct((b,) + _image_shape(config), jnp.uint8, parallel.batch_sharding(mesh))
  args = (jax.tree.map(lambda a: _struct(a.shape, a.dtype, parallel.replicated(mesh)), variables), images)
  return Program('eval', 'Inception features', apply, apply, args, b)
