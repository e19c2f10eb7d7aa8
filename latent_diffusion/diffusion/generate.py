"""Text/class -> image: encode the condition, sample latents with guidance, decode with the frozen first stage.

One jitted, sharded program per batch shape; the guidance scale is an argument, so every scale reuses it. The
`sample` stage and the periodic sampling of `ldm` training both call `Generator`, so they draw the same images.
Each image's starting noise comes from its own seed alone, so an image does not depend on its batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from latent_diffusion import flops
from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.diffusion import concat as concat_lib
from latent_diffusion.diffusion import sampling
from latent_diffusion.evaluation import features
from latent_diffusion.models import conditioning
from latent_diffusion.models import controlnet as controlnet_lib

SAMPLERS = {'ddim': sampling.ddim_sample, 'ddpm': sampling.ddpm_sample, 'plms': sampling.plms_sample,
            'dpm_solver_pp': sampling.dpm_solver_pp_sample}


@dataclasses.dataclass
class Requests:
  """What to draw, one entry per image in output order: conditions (prompts or class ids), seeds, scales; for
  text models optionally negative prompts (the unconditional half of guidance; None: the null prompt); for
  img2img the init images (float [N, H, W, 3] in [-1, 1]; None: from noise) and optionally the masks of the
  regions to repaint (float [N, H, W, 1], 1 = repaint; None: all)."""
  conditions: list
  seeds: np.ndarray
  guidance_scales: np.ndarray
  negative_prompts: list = None
  init_images: np.ndarray = None
  masks: np.ndarray = None

  def rows(self, index):
    """The requests at positions `index`."""
    negative = None if self.negative_prompts is None else [self.negative_prompts[i] for i in index]
    pick = lambda images: None if images is None else images[index]
    return Requests([self.conditions[i] for i in index], self.seeds[index], self.guidance_scales[index], negative,
                    pick(self.init_images), pick(self.masks))


def conditions_are_stored(kind, concat, control=''):
  """Whether a model's conditions are stored examples (concat inputs, layouts, control maps) rather than prompts
  or classes."""
  return bool(concat) or bool(control) or kind == 'layout'


def requests_from_config(sampling_config, kind, concat='', init_images=None, masks=None, control=''):
  """Every (guidance scale, condition, seed) of the `sampling` section, the images of one condition
  consecutive in the config's order. Prompts come from `prompt_file` (one per line) when it is set; the
  conditions of concat- and layout-conditioned models are example indices of `sampling.condition_split` (a
  hybrid model, concat and text, draws each stored example with its stored caption). `init_images` (img2img,
  from `read_init_images`) and `masks` (inpainting them, from `read_masks`): one for every condition or one per
  condition."""
  s = sampling_config
  if conditions_are_stored(kind, concat, control):
    conditions = [int(i) for i in s.condition_indices]
  elif kind in conditioning.TEXT_KINDS:
    conditions = list(s.prompts)
    if s.prompt_file:
      if not tf.io.gfile.exists(s.prompt_file):
        raise FileNotFoundError(f'sampling.prompt_file={s.prompt_file} does not exist; give a text file with one '
                                'prompt per line, or leave it empty to use sampling.prompts.')
      with tf.io.gfile.GFile(s.prompt_file) as f:
        conditions = [line.strip() for line in f if line.strip()]
  elif kind == 'class':
    conditions = [int(c) for c in s.class_ids]
  else:
    conditions = ['']  # unconditional: one row of seeds per guidance scale
  if not conditions:
    field = 'prompts' if kind in conditioning.TEXT_KINDS else 'class_ids'
    raise ValueError(f'Nothing to sample: set sampling.{field}.')
  negatives = _negative_prompts(s.negative_prompts, kind, len(conditions))
  grid = [(scale, i, seed) for scale in s.guidance_scales for i in range(len(conditions)) for seed in s.seeds]
  index = np.array([i for _, i, _ in grid])

  def per_image(images, field):
    if images is None:
      return None
    if len(images) not in (1, len(conditions)):
      raise ValueError(f'sampling.{field} holds {len(images)} images for {len(conditions)} conditions; give one for '
                       'all or one per condition (in file-name order).')
    return images[index % len(images)]

  return Requests(conditions=[conditions[i] for i in index],
                  seeds=np.array([seed for *_, seed in grid], np.int32),
                  guidance_scales=np.array([scale for scale, *_ in grid], np.float32),
                  negative_prompts=None if negatives is None else [negatives[i] for i in index],
                  init_images=per_image(init_images, 'init_images'), masks=per_image(masks, 'mask_images'))


def read_init_images(sampling_config, resolution):
  """The images of the `sampling.init_images` folder in file-name order, centre-cropped and resized to
  `resolution` as training data is, float32 [M, resolution, resolution, 3] in [-1, 1]; None when unset."""
  return _read_folder(sampling_config.init_images, resolution)


def read_masks(sampling_config, resolution):
  """The masks of the `sampling.mask_images` folder, cropped and resized like the init images: float32
  [M, resolution, resolution, 1], 1 where the mean of the channels is white (> 127.5), the region to repaint."""
  images = _read_folder(sampling_config.mask_images, resolution)
  return None if images is None else (images.mean(axis=-1, keepdims=True) > 0).astype(np.float32)


def _read_folder(folder, resolution):
  if not folder:
    return None
  paths = features.image_files(folder)
  return np.stack([input_pipeline.preprocess(features.load_image(p), resolution).numpy() for p in paths])


def _negative_prompts(negative_prompts, kind, count):
  """sampling.negative_prompts per condition: one for all, or one per condition; None when unset."""
  if not negative_prompts:
    return None
  if kind not in conditioning.TEXT_KINDS:
    raise ValueError(f"sampling.negative_prompts needs a text model; ldm.conditioning.kind='{kind}'. Leave it empty.")
  if len(negative_prompts) not in (1, count):
    raise ValueError(f'sampling.negative_prompts has {len(negative_prompts)} entries for {count} conditions; give '
                     'one for all or one per condition.')
  return list(negative_prompts) * (count if len(negative_prompts) == 1 else 1)


class Generator:
  """Samples images for `Requests` with given UNet/conditioner params and first-stage params."""

  def __init__(self, *, unet, conditioner, schedule, parameterization, decoder, latent_shape, scale_factor,
               sampling_config, mesh, concat='', segmentation_classes=0, condition_source=None, encoder=None,
               controlnet=None, control=''):
    """`condition_source`: for concat-, layout- and ControlNet-conditioned models, the stored arrays of the
    examples that conditions index. `encoder(params, images)`: the first stage's latent (its posterior mode), for
    img2img. `controlnet` (params['controlnet']) adds its residuals for the control images of kind `control`
    (ldm.controlnet.kind) drawn from the stored examples, times sampling.control_scale."""
    s = sampling_config
    if s.sampler not in SAMPLERS:
      raise ValueError(f"Unknown sampling.sampler '{s.sampler}'; choose one of {sorted(SAMPLERS)}.")
    parallel.check_batch_size(s.batch_size, mesh, 'sampling.batch_size')
    self.conditioner, self.mesh, self.batch_size = conditioner, mesh, s.batch_size
    self.flops_per_image = None  # analytic FLOPs of one image's sampling and decoding, known after a batch
    self.concat, self.condition_source, self.scale_factor = concat, condition_source, scale_factor
    self.control, self.controlnet = control, controlnet
    self.condition_options = dict(size=latent_shape[0], segmentation_classes=segmentation_classes)
    sampler = SAMPLERS[s.sampler]
    options = dict(eta=s.eta) if s.sampler == 'ddim' else {}

    def generate(params, decoder_params, inputs, seeds, guidance_scale):
      inputs = dict(inputs)
      condition, negative = inputs.pop('concat', None), inputs.pop('negative_tokens', None)
      init, mask, control = inputs.pop('init', None), inputs.pop('mask', None), inputs.pop('control', None)
      context = conditioner.encode(params['cond'], inputs)
      model = concat_lib.with_concat(
          controlnet_lib.controlled(unet, controlnet, params, control, s.control_scale), condition)
      eps_fn = sampling.as_eps_fn(model, parameterization, schedule)
      if context is not None:  # unconditional models have nothing to guide
        null = jax.tree.map(jnp.asarray, conditioner.null) if negative is None else {'tokens': negative}
        null = conditioner.encode(params['cond'], null)
        eps_fn = sampling.guided(eps_fn, guidance_scale, jnp.broadcast_to(null, context.shape))
      x_T = jax.vmap(lambda seed: jax.random.normal(jax.random.PRNGKey(seed), latent_shape))(seeds)
      step_keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.PRNGKey(seed), 1))(seeds)  # per image
      img2img = {}
      if init is not None:
        img2img = dict(init=encoder(decoder_params, init) * scale_factor, strength=s.strength)
        if mask is not None:  # keep the latent cells mostly outside the region to repaint (the sampler's mask = 1)
          keep = (concat_lib.area_downsample(mask, latent_shape[0]) < 0.5).astype(x_T.dtype)
          img2img.update(mask=keep, known=img2img['init'])
      z = sampler(eps_fn, schedule, x_T, context, num_steps=s.num_steps, rng=step_keys, **options, **img2img)
      if 'mask' in img2img:  # the last step leaves noise of t=1 in the kept cells: paste the init latent itself
        z = img2img['mask'] * img2img['known'] + (1 - img2img['mask']) * z
      return jnp.clip(decoder(decoder_params, z / scale_factor), -1.0, 1.0)

    batch = parallel.batch_sharding(mesh)
    # (params, decoder params, inputs, seeds, guidance scale) -> images: the whole loop, one program.
    self.jitted = jax.jit(generate, in_shardings=(None, None, batch, batch, parallel.replicated(mesh)),
                          out_shardings=batch)

  def __call__(self, params, decoder_params, requests):
    """uint8 images [N, H, W, 3] in the order of `requests`, on every host."""
    order, images = [], []
    for scale in dict.fromkeys(requests.guidance_scales.tolist()):  # each scale's images, in batches
      index = np.flatnonzero(requests.guidance_scales == scale)
      for start in range(0, len(index), self.batch_size):
        rows = index[start:start + self.batch_size]
        images.append(self._batch(params, decoder_params, requests.rows(rows), scale))
        order.append(rows)
    pixels = np.empty((len(requests.seeds),) + images[0].shape[1:], np.uint8)
    pixels[np.concatenate(order)] = np.concatenate(images)
    return pixels

  def _batch(self, params, decoder_params, requests, scale):
    """One padded global batch of one guidance scale; every host passes its own rows and receives all of them."""
    n, pad = len(requests.seeds), self.batch_size - len(requests.seeds)
    conditions = requests.conditions + requests.conditions[-1:] * pad
    seeds = np.concatenate([requests.seeds, np.repeat(requests.seeds[-1:], pad)])
    per_host = self.batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    local = {'seeds': seeds[rows]}
    for key, images in (('init', requests.init_images), ('mask', requests.masks)):
      if images is not None:
        local[key] = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])[rows]
    if requests.negative_prompts is not None:
      negatives = requests.negative_prompts + requests.negative_prompts[-1:] * pad
      local['negative_tokens'] = self.conditioner.inputs({'caption': np.array(negatives[rows])})['tokens']
    if self.condition_source is not None:  # conditions index stored examples
      stored = {k: v[np.array(conditions[rows])] for k, v in self.condition_source.items()}
    else:
      stored = {'caption' if self.conditioner.kind in conditioning.TEXT_KINDS else 'label': np.array(conditions[rows])}
    if self.concat:
      local['concat'] = np.asarray(concat_lib.condition(stored, self.concat, self.scale_factor,
                                                        **self.condition_options), np.float32)
    if self.control:
      local['control'] = np.asarray(controlnet_lib.control_image(stored, self.control))
    local.update(self.conditioner.inputs(stored))
    batch = input_pipeline.to_global(local, self.mesh)
    seeds = batch.pop('seeds')
    if self.flops_per_image is None:
      self.flops_per_image = flops.count(self.jitted, params, decoder_params, batch, seeds,
                                         jnp.float32(scale)) / self.batch_size
    out = self.jitted(params, decoder_params, batch, seeds, jnp.float32(scale))
    pixels = parallel.to_host(out)[:n]
    return np.round((pixels + 1) * 127.5).astype(np.uint8)
