"""The `ldm` stage: trains the UNet (and a text encoder trained jointly with it) on the frozen latent store.

Each step samples z from the stored posterior moments, scales it, drops the condition with probability
`p_uncond`, and takes one AdamW step (optional warm-up and clipping) on the diffusion loss, with EMA params kept.
With `ldm.lora`, the steps train LoRA adapters of a frozen UNet (and frozen conditioning encoder); with
`ldm.controlnet`, a ControlNet that steers the frozen UNet from each example's stored map or control image.
Every `eval_every` steps it draws the configured prompts with the EMA params (the `sample` stage's sampler).
"""

import os

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_diffusion import parallel
from latent_diffusion.data import captioned_shapes
from latent_diffusion.data import latent_store
from latent_diffusion.diffusion import concat as concat_lib
from latent_diffusion.diffusion import generate
from latent_diffusion.diffusion import objective
from latent_diffusion.diffusion import schedules
from latent_diffusion.evaluation import evaluator as evaluator_lib
from latent_diffusion.evaluation import prompt_agreement
from latent_diffusion.models import conditioning
from latent_diffusion.models import controlnet as controlnet_lib
from latent_diffusion.models import lora
from latent_diffusion.models import tiling
from latent_diffusion.models import unet as unet_lib
from latent_diffusion.training import autoencoder as autoencoder_stage
from latent_diffusion.training import checkpoint
from latent_diffusion.training import latents as latents_stage
from latent_diffusion.training import loop
from latent_diffusion.training import train_state
from latent_diffusion.weights import clip
from latent_diffusion.weights import conditioning as weights_conditioning
from latent_diffusion.weights import controlnet as weights_controlnet
from latent_diffusion.weights import lora as weights_lora
from latent_diffusion.weights import unet as weights_unet

STAGE = 'ldm'


class Conditioner:
  """Turns a batch's captions or labels into UNet context: host-side inputs, the null input, the encoder.

  kind 'text': a transformer over tokens, trained with the UNet; 'clip': the frozen CLIP text encoder and
  tokenizer of `ldm.conditioning.pretrained` (Stable Diffusion's; its params are `frozen`, never trained);
  'class': a one-token class embedding whose last id is the null class; 'layout': the stored boxes and object
  classes as tokens (`conditioning.layout_tokenizer`) through a transformer trained with the UNet, all-pad tokens
  as the null layout; 'none' (unconditional): no context, and the UNet's transformers attend to the image alone.
  """

  def __init__(self, cond_config):
    self.kind = cond_config.kind
    self.model, self.null, self.frozen = None, {}, self.kind == 'clip'
    if self.kind in conditioning.TEXT_KINDS:
      if self.kind == 'clip':
        self.tokenizer = clip.CLIPTokenizer(cond_config.pretrained)
        self.model = clip.text_transformer(clip.text_encoder_config(cond_config.pretrained))
        if cond_config.max_length > self.model.max_length:
          raise ValueError(f'ldm.conditioning.max_length={cond_config.max_length} exceeds the CLIP text encoder\'s '
                           f'{self.model.max_length} positions; set it to {self.model.max_length} or less.')
      else:
        self.tokenizer = conditioning.create_tokenizer(cond_config)
        self.model = text_encoder(cond_config, self.tokenizer.vocab_size)
      self.null = {'tokens': self.tokenizer([''], cond_config.max_length)}
      self.length = cond_config.max_length
    elif self.kind == 'layout':
      self.tokenizer = conditioning.layout_tokenizer(cond_config)
      self.model = text_encoder(cond_config, self.tokenizer.vocab_size)
      self.null = {'tokens': np.full((1, cond_config.max_length), self.tokenizer.pad, np.int32)}
      self.length = cond_config.max_length
    elif self.kind == 'class':
      self.model = conditioning.ClassEmbedder(cond_config.num_classes, cond_config.width)
      self.null = {'label': np.full((1,), cond_config.num_classes - 1, np.int32)}
    elif self.kind != 'none':
      raise ValueError(f"ldm.conditioning.kind='{self.kind}' is not one of {conditioning.KINDS}.")

  def inputs(self, batch):
    """Host-side conditioning inputs of a batch of stored examples (captions and layouts are tokenized here)."""
    if self.kind == 'layout':
      return {'tokens': self.tokenizer(batch['boxes'], batch['object_labels'], self.length)}
    if 'tokens' in self.null:
      return {'tokens': self.tokenizer(list(batch['caption']), self.length)}
    if self.kind == 'class':
      return {'label': np.asarray(batch['label']).astype(np.int32)}
    return {}

  def init(self, rng):
    if self.model is None:
      return {}
    return self.model.init(rng, *jax.tree.map(jnp.asarray, self.null).values())['params']

  def encode(self, params, inputs):
    """The UNet context [B, L, width], or None without conditioning."""
    if self.model is None:
      return None
    return self.model.apply({'params': params}, *inputs.values())


def text_encoder(cond_config, tokenizer_vocab):
  """The jointly trained transformer of kinds 'text' and 'layout'; its embedding table has
  `ldm.conditioning.vocab_size` rows (0: the tokenizer's vocabulary; the reference BERTEmbedders' are larger)."""
  vocab_size = cond_config.vocab_size or tokenizer_vocab
  if vocab_size < tokenizer_vocab:
    raise ValueError(f'ldm.conditioning.vocab_size={vocab_size} is smaller than the tokenizer\'s {tokenizer_vocab} '
                     'tokens; set it to 0 (the tokenizer\'s) or at least that.')
  return conditioning.TextTransformer(vocab_size, cond_config.max_length, cond_config.width, cond_config.depth,
                                      cond_config.num_heads, head_dim=cond_config.head_dim,
                                      qkv_bias=cond_config.qkv_bias, token_conv=cond_config.token_conv)


def sample_latent(latent, kind, rng):
  """z from the stored moments (KL: mean + std * noise) or the stored pre-quantisation latent (VQ)."""
  if kind != 'kl':
    return latent
  mean, logvar = jnp.split(latent, 2, axis=-1)
  return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape)


def optimizer(opt_config, total_steps):
  """AdamW on the schedule of `ldm.optimizer`, after global-norm clipping at `grad_clip` (0: none)."""
  learning_rate = train_state.learning_rate(
      opt_config.learning_rate, warmup_steps=opt_config.warmup_steps, decay=opt_config.decay,
      total_steps=total_steps, warmup_from=opt_config.warmup_from, decay_steps=opt_config.decay_steps,
      decay_to=opt_config.decay_to)
  adamw = optax.adamw(learning_rate, weight_decay=opt_config.weight_decay)
  return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), adamw) if opt_config.grad_clip else adamw


def create(config, metadata):
  """The UNet, the conditioner and the train state's init function for a latent store's metadata."""
  ldm = config.ldm
  shape = stored_latent_shape(metadata)
  concat_channels = concat_lib.num_channels(ldm.conditioning.concat, shape[-1], ldm.conditioning.segmentation_classes)
  unet = unet_lib.create_unet(ldm.unet, out_channels=shape[-1],
                              segmentation_map=ldm.conditioning.segmentation_map_channels)
  conditioner = Conditioner(ldm.conditioning)
  tx = optimizer(ldm.optimizer, ldm.total_steps)

  def init(rng):
    unet_rng, cond_rng, adapter_rng = jax.random.split(rng, 3)
    cond_params = conditioner.init(cond_rng)
    context = conditioner.encode(cond_params, jax.tree.map(jnp.asarray, conditioner.null))
    x = jnp.zeros((1,) + shape[:-1] + (shape[-1] + concat_channels,))
    t = jnp.zeros((1,), jnp.int32)
    unet_params = unet.init(unet_rng, x, t, context)['params']
    frozen = {'unet': unet_params, 'cond': cond_params}
    if ldm.lora.rank:  # the base frozen, the adapters trained (and their EMA)
      params = {'lora': lora.init(adapter_rng, unet_params, ldm.lora)}
      if ldm.lora.text_targets:
        params['lora_cond'] = lora.init_text(jax.random.fold_in(adapter_rng, 1), cond_params, ldm.lora)
      return train_state.TrainState.create(params, tx, ldm.ema_decay, frozen=frozen)
    if ldm.controlnet.kind:  # the base frozen, the ControlNet (a copy of its encoder) trained
      controlnet = controlnet_lib.create(unet, ldm.controlnet)
      control = jnp.zeros((1,) + tuple(controlnet_lib.image_size(controlnet, n) for n in shape[:-1]) + (3,))
      params = controlnet_lib.copy_base(controlnet.init(adapter_rng, x, t, control, context)['params'], unet_params)
      return train_state.TrainState.create({'controlnet': params}, tx, ldm.ema_decay, frozen=frozen)
    if conditioner.frozen:
      return train_state.TrainState.create({'unet': unet_params}, tx, ldm.ema_decay, frozen={'cond': cond_params})
    ema_keys = () if ldm.ema_cond or not cond_params else ('unet',)
    return train_state.TrainState.create({'unet': unet_params, 'cond': cond_params}, tx, ldm.ema_decay,
                                         ema_keys=ema_keys)

  return unet, conditioner, init


def is_ldm_workdir(path):
  """Whether `path` is a workdir of ours with ldm checkpoints (a base for `ldm.init_from`)."""
  return bool(path) and epath.Path(path, STAGE, 'checkpoints').is_dir()


def _trained_params(config, workdir, mesh):
  """The params sampling would use (EMA) of the newest ldm checkpoint of another workdir, on the host."""
  base = config.copy_and_resolve_references()
  base.ldm.lora.rank, base.ldm.controlnet.kind, base.ldm.init_from = 0, '', ''
  metadata = latent_store.read_metadata(latent_store.split_dir(workdir, config.latents.splits[0]))
  _, _, init = create(base, metadata)
  state, step = checkpoint.restore_newest(checkpoint_dir(workdir), init, mesh, STAGE,
                                         frozen=frozen_params(base, init))
  logging.info('Read the trained ldm of %s at step %d.', workdir, step)
  return jax.device_get(state.eval_params)


def _imported(config, base, mesh):
  """(UNet params, conditioning params or None) of `ldm.init_from`, on the host, shaped like `base`."""
  ldm = config.ldm
  trains_cond = 'cond' in base and ldm.conditioning.kind != 'clip'
  if is_ldm_workdir(ldm.init_from):
    trained = _trained_params(config, ldm.init_from, mesh)
    return trained['unet'], trained['cond'] if trains_cond else None
  unet_params, state_dict = weights_unet.load(ldm.init_from, base['unet'], ldm.unet)
  if state_dict and trains_cond and any(k.startswith(weights_conditioning.PREFIX) for k in state_dict):
    return unet_params, weights_conditioning.convert(state_dict, ldm.conditioning.kind, base['cond'], ldm.init_from)
  return unet_params, None


def _adapted(config):
  """Whether the run trains adapters of a frozen base (LoRA, a ControlNet) rather than the UNet itself."""
  return bool(config.ldm.lora.rank or config.ldm.controlnet.kind)


def _mesh(shardings):
  return jax.tree.leaves(shardings.params)[0].mesh


def make_load_frozen(config):
  """The frozen params a run imports on every start (its checkpoints do not hold them): the CLIP text encoder of
  `ldm.conditioning.pretrained` and, under LoRA or a ControlNet, the base of `ldm.init_from` (its UNet and, from
  a CompVis checkpoint or a workdir of ours, its trained conditioning encoder); None when there are none."""
  ldm = config.ldm
  imports_base = _adapted(config) and bool(ldm.init_from)
  if not imports_base and ldm.conditioning.kind != 'clip':
    return None

  def load_frozen(state, shardings):
    frozen = dict(state.frozen)
    if imports_base:
      unet_params, cond_params = _imported(config, frozen, _mesh(shardings))
      frozen['unet'] = parallel.put(unet_params, shardings.frozen['unet'])
      logging.info('Initialised the UNet from %s.', ldm.init_from)
      if cond_params is not None:
        frozen['cond'] = parallel.put(cond_params, shardings.frozen['cond'])
        logging.info('Initialised the conditioning encoder from %s.', ldm.init_from)
    if ldm.conditioning.kind == 'clip':
      _, cond_params = clip.load_text_encoder(ldm.conditioning.pretrained)
      frozen['cond'] = parallel.put(cond_params, shardings.frozen['cond'])
      logging.info('Loaded the frozen CLIP text encoder of %s.', ldm.conditioning.pretrained)
    return state.replace(frozen=frozen)

  return load_frozen


def frozen_params(config, init):
  """`checkpoint.restore_newest`'s `frozen`: a state's frozen params as its run had them, the random init of
  the run's seed with what `make_load_frozen` imports over it."""
  load_frozen = make_load_frozen(config)

  def fill(target, shardings):
    frozen = jax.jit(lambda rng: nn.meta.unbox(init(rng)).frozen, out_shardings=shardings.frozen)(
        loop.init_rng(config.seed))
    state = target.replace(frozen=frozen)
    return load_frozen(state, shardings) if load_frozen else state

  return fill


def make_warm_start(config):
  """Imported weights for a fresh `ldm` state: fine-tuning's UNet of `ldm.init_from` (a diffusers folder, a
  CompVis checkpoint or a workdir of ours with a trained ldm) with, from a CompVis checkpoint or a workdir, its
  trained conditioning encoder (BERTEmbedder, ClassEmbedder), in the params and their EMA; a ControlNet's start,
  a copy of the frozen base UNet's encoder (imported by `make_load_frozen`) or `ldm.controlnet.init_from`; None
  when there is nothing to import."""
  ldm = config.ldm
  fine_tunes = bool(ldm.init_from) and not _adapted(config)
  if not fine_tunes and not (ldm.controlnet.kind and (ldm.init_from or ldm.controlnet.init_from)):
    return None

  def warm_start(state, shardings):
    params, ema = dict(state.params), state.ema_params
    if fine_tunes:
      unet_params, cond_params = _imported(config, params, _mesh(shardings))
      if cond_params is not None:
        params['cond'] = parallel.put(cond_params, shardings.params['cond'])
        if ema is not None and 'cond' in ema:
          ema = {**ema, 'cond': parallel.put(cond_params, shardings.ema_params['cond'])}
        logging.info('Initialised the conditioning encoder from %s.', ldm.init_from)
      params['unet'] = parallel.put(unet_params, shardings.params['unet'])
      logging.info('Initialised the UNet from %s.', ldm.init_from)
      if ema is not None and 'unet' in ema:  # the EMA starts at the imported UNet too, in its own buffers
        ema = {**ema, 'unet': parallel.put(unet_params, shardings.ema_params['unet'])}
    if ldm.controlnet.kind:
      start = _controlnet_start(config, params['controlnet'], state.frozen['unet'])
      copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings.params['controlnet'])
      params['controlnet'] = copy(start)  # own buffers: the train step donates the whole state
      if ema is not None:
        ema = {**ema, 'controlnet': copy(start)}
    return state.replace(params=params, ema_params=ema)

  return warm_start


def _controlnet_start(config, control_params, unet_params):
  """The ControlNet's first params: those of `ldm.controlnet.init_from` (a diffusers ControlNetModel), else the
  base UNet's encoder (`unet_params`) with the fresh control embedding and zero convs."""
  ldm = config.ldm
  if not ldm.controlnet.init_from:
    return controlnet_lib.copy_base(control_params, unet_params)
  logging.info('Initialised the ControlNet from %s.', ldm.controlnet.init_from)
  return weights_controlnet.load(ldm.controlnet.init_from, control_params, ldm.unet, ldm.controlnet)


def make_train_step(config, unet, conditioner, schedule, scale_factor, kind):
  ldm = config.ldm
  null = jax.tree.map(jnp.asarray, conditioner.null)
  controlnet = controlnet_lib.create(unet, ldm.controlnet) if ldm.controlnet.kind else None

  def train_step(state, batch, rng):
    z_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 4)
    z = sample_latent(batch['latent'], kind, z_rng) * scale_factor
    inputs = objective.drop_condition(drop_rng, {k: batch[k] for k in null}, null, ldm.p_uncond)
    condition = concat_lib.condition(batch, ldm.conditioning.concat, scale_factor, size=z.shape[1],
                                     segmentation_classes=ldm.conditioning.segmentation_classes)
    control = controlnet_lib.control_image(batch, ldm.controlnet.kind) if controlnet else None

    def loss_fn(params):
      params = model_params(config, state.with_frozen(params))
      context = conditioner.encode(params['cond'], inputs)
      unet_fn = controlnet_lib.controlled(unet, controlnet, params, control, deterministic=False,
                                          rngs={'dropout': dropout_rng})
      model = concat_lib.with_concat(unet_fn, condition)
      denoise = lambda x_t, t: model(x_t, t, context)
      loss, _ = objective.diffusion_loss(denoise, schedule, z, loss_rng, parameterization=ldm.parameterization,
                                         loss_type=ldm.loss, min_snr_gamma=ldm.min_snr_gamma)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  return train_step


def model_params(config, params):
  """The params the models read: a LoRA run's adapters ({'lora': ..., 'lora_cond': ...}) merged into its frozen
  UNet and text encoder."""
  params = dict(params)
  for adapters, base in (('lora', 'unet'), ('lora_cond', 'cond')):
    if adapters in params:
      params[base] = lora.merge(params[base], params.pop(adapters), lora.scale_of(config.ldm.lora))
  return params


def stored_latent_shape(metadata):
  """z's shape [h, w, c]: the store keeps KL posteriors as (mean, logvar) on 2c channels."""
  h, w, c = metadata['shape']
  return h, w, c // (2 if metadata['kind'] == 'kl' else 1)


def sample_latent_shape(config, metadata):
  """The stored shape, or `sampling.latent_size` square: the UNet is convolutional, so a model trained on 32x32
  latents can draw 64x64 ones (the paper samples 512x1024 images from models trained at 256x256)."""
  h, w, c = stored_latent_shape(metadata)
  size = config.sampling.latent_size
  return (size, size, c) if size else (h, w, c)


def make_generator(config, workdir, mesh, unet, conditioner, metadata):
  """The sampler of this stage's models, decoding with the trained first stage: (Generator, its params).
  Concat-, layout- and ControlNet-conditioned models take their conditions from the latent store of
  `sampling.condition_split`."""
  ae_model, ae_params, _ = autoencoder_stage.load_trained(config, workdir, mesh)
  concat, control = config.ldm.conditioning.concat, config.ldm.controlnet.kind
  source = None
  if generate.conditions_are_stored(config.ldm.conditioning.kind, concat, control):
    source, _ = latent_store.load(latent_store.split_dir(workdir, config.sampling.condition_split))
  generator = generate.Generator(
      unet=unet, conditioner=conditioner, schedule=schedules.Schedule.from_config(config.ldm.schedule),
      parameterization=config.ldm.parameterization,
      decoder=lambda params, z: tiling.decode(ae_model, params, z, config.autoencoder.tiling),
      latent_shape=sample_latent_shape(config, metadata), scale_factor=metadata['scale_factor'],
      sampling_config=config.sampling, mesh=mesh, concat=concat,
      segmentation_classes=config.ldm.conditioning.segmentation_classes, condition_source=source,
      encoder=lambda params, x: latents_stage.encode_mode(ae_model, params, x, config.autoencoder.model.kind,
                                                          config.autoencoder.tiling),
      controlnet=controlnet_lib.create(unet, config.ldm.controlnet) if control else None, control=control)
  return generator, ae_params


def make_evaluate(config, workdir, generator, ae_params, fid_evaluator=None):
  """Periodic sampling: the configured prompts drawn with the EMA params, as a grid, plus prompt agreement on
  the built-in dataset; with an `fid_evaluator`, also FID (IS, precision/recall) of eval.training_num_samples
  fresh samples."""
  cond = config.ldm.conditioning
  requests = generate.requests_from_config(config.sampling, cond.kind, cond.concat,
                                           control=config.ldm.controlnet.kind)
  if fid_evaluator is not None:  # the FID conditions are read once, not at every evaluation
    fresh = evaluator_lib.eval_requests(config, workdir, config.eval.training_num_samples)

  def evaluate(state, step):
    del step
    params = model_params(config, state.eval_params)
    images = generator(params, ae_params, requests)
    scalars = sample_scalars(config, requests, images, generator.condition_source)
    if fid_evaluator is not None:
      out, _ = evaluator_lib.sample_features(config, fid_evaluator, generator, params, ae_params,
                                             fresh, lambda *_: {}, chunk=len(fresh.seeds))
      scalars.update(fid_evaluator.metrics(out))
    return scalars, {'samples': images / 127.5 - 1.0}

  return evaluate


def sample_scalars(config, requests, images, condition_source=None):
  """Prompt agreement of text and layout samples of `captioned_shapes` (the fraction of prompted objects drawn
  with the right colour at the right position, read from pixels; a layout is read as its caption); nothing for
  other data. Layout and hybrid (concat and text) conditions index `condition_source`, the stored examples."""
  cond = config.ldm.conditioning
  if cond.kind not in conditioning.TEXT_KINDS + ('layout',) or not config.data.name.startswith('captioned_shapes'):
    return {}
  prompts = requests.conditions
  if cond.kind == 'layout':
    prompts = [captioned_shapes.caption_of_layout(condition_source['boxes'][i], condition_source['object_labels'][i])
               for i in requests.conditions]
  elif generate.conditions_are_stored(cond.kind, cond.concat, config.ldm.controlnet.kind):
    prompts = [condition_source['caption'][i].decode() for i in requests.conditions]
  agreement = prompt_agreement.prompt_agreement(images, prompts)
  return {f'prompt_agreement/{k}': v for k, v in agreement.items() if k != 'objects'}


def checkpoint_dir(workdir):
  return os.path.join(workdir, STAGE, 'checkpoints')


def load_trained(config, workdir, mesh, metadata, step=None):
  """The trained stage 2 for sampling: (unet, conditioner, EMA params (raw params, with a warning, when no EMA
  is kept), step), from the newest checkpoint or the one at `step`, restored straight into their shardings."""
  unet, conditioner, init = create(config, metadata)
  state, step = checkpoint.restore_newest(checkpoint_dir(workdir), init, mesh, STAGE, step,
                                         frozen=frozen_params(config, init))
  if state.ema_params is None:
    logging.warning('The ldm checkpoint at step %d keeps no EMA params (ldm.ema_decay=0); sampling with the raw '
                    'params.', step)
  params = model_params(config, state.eval_params)
  s = config.sampling
  if s.loras:  # LoRA files merged in at their weights (their text-encoder adapters into a CLIP text encoder)
    clip_params = params['cond'] if config.ldm.conditioning.kind == 'clip' else None
    params['unet'], clip_params = weights_lora.merge_files(
        params['unet'], s.loras, s.lora_weights or (1.0,) * len(s.loras), config.ldm.unet, clip_params)
    if clip_params is not None:
      params['cond'] = clip_params
    logging.info('Merged the LoRA files %s into the model.', ', '.join(s.loras))
  return unet, conditioner, params, step


def is_done(config, workdir):
  """Trained to ldm.total_steps (and a LoRA run's files exported: a run killed before writing them writes them
  on its rerun, from the last checkpoint)."""
  step = checkpoint.latest_saved_step(checkpoint_dir(workdir))
  exported = not config.ldm.lora.rank or all(
      epath.Path(lora_dir(workdir), name).exists() for name, _ in LORA_FILES)
  return step is not None and step >= config.ldm.total_steps and exported


def run(config, workdir):
  """Trains under WORKDIR/ldm from the `train` latent store, resuming from the newest checkpoint."""
  ldm = config.ldm
  mesh = parallel.create_mesh(config.mesh)
  parallel.check_batch_size(ldm.batch_size, mesh)
  store = latent_store.split_dir(workdir, config.latents.splits[0])
  shards = latent_store.Shards(store)
  metadata = shards.metadata
  latent_store.check_source(
      metadata, checkpoint.latest_saved_step(autoencoder_stage.checkpoint_dir(workdir)), store)
  if metadata.get('concat', '') != ldm.conditioning.concat:
    raise ValueError(f"The latent store {store} holds concat conditions '{metadata.get('concat', '')}', but "
                     f"ldm.conditioning.concat='{ldm.conditioning.concat}'. Delete {store} to re-encode.")
  if not ldm.shuffle_window_shards:
    latent_store.check_fits_in_memory(shards, os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2)
  unet, conditioner, init = create(config, metadata)
  schedule = schedules.Schedule.from_config(ldm.schedule)

  def batches(start_step):
    for batch in latent_store.LatentBatches(shards, ldm.batch_size, seed=config.seed, start_step=start_step,
                                            window_shards=ldm.shuffle_window_shards):
      control = (controlnet_lib.STORED[ldm.controlnet.kind],) if ldm.controlnet.kind else ()
      stored = concat_lib.KEYS[ldm.conditioning.concat] + control
      yield {'latent': batch['latent'], **{k: batch[k] for k in stored}, **conditioner.inputs(batch)}

  generator, ae_params = make_generator(config, workdir, mesh, unet, conditioner, metadata)
  fid_evaluator = (evaluator_lib.Evaluator(config, workdir, mesh)  # fails now if the Inception weights are missing
                   if config.eval.training_num_samples else None)
  task = loop.Task(init=init, batches=batches, train_step=make_train_step(
      config, unet, conditioner, schedule, metadata['scale_factor'], metadata['kind']),
                   evaluate=make_evaluate(config, workdir, generator, ae_params, fid_evaluator),
                   warm_start=make_warm_start(config), load_frozen=make_load_frozen(config))
  state = loop.train(task, workdir=os.path.join(workdir, STAGE), mesh=mesh, seed=config.seed,
                     total_steps=ldm.total_steps, **ldm.train_schedule.to_dict())
  if ldm.lora.rank:
    export_lora(config, workdir, state)
  return state


LORA_FILES = (('pytorch_lora_weights.safetensors', 'diffusers'), ('lora_kohya.safetensors', 'kohya'))


def lora_dir(workdir):
  return os.path.join(workdir, STAGE, 'lora')


def export_lora(config, workdir, state):
  """Writes the adapters sampling uses (EMA when kept) as WORKDIR/ldm/lora/pytorch_lora_weights.safetensors
  (diffusers' name and format) and lora_kohya.safetensors. A text encoder's adapters go in when it is CLIP; our
  own text encoders have no PyTorch counterpart, so theirs stay in the checkpoint."""
  adapters = parallel.to_host(state.eval_params['lora'])
  text_adapters = parallel.to_host(state.eval_params.get('lora_cond'))
  if not parallel.is_main_process():
    return
  if text_adapters and config.ldm.conditioning.kind != 'clip':
    logging.info("The text encoder's adapters have no PyTorch format (ldm.conditioning.kind='%s' is ours, not "
                 'CLIP): they are in the checkpoint only.', config.ldm.conditioning.kind)
    text_adapters = None
  for name, fmt in LORA_FILES:
    weights_lora.write(os.path.join(lora_dir(workdir), name), adapters, lora.scale_of(config.ldm.lora),
                       config.ldm.unet, fmt, text_adapters)
  logging.info('Wrote the LoRA adapters to %s.', lora_dir(workdir))
