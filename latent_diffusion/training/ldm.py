"""The `ldm` stage: trains the UNet (and a text encoder trained jointly with it) on the frozen latent store.

Each step samples z from the stored posterior moments, scales it, drops the condition with probability
`p_uncond`, and takes one AdamW step (warm-up, gradient clipping) on the diffusion loss, with EMA params kept.
"""

import os

import jax
import jax.numpy as jnp
import optax

from latent_diffusion import parallel
from latent_diffusion.data import latent_store
from latent_diffusion.diffusion import objective
from latent_diffusion.diffusion import schedules
from latent_diffusion.models import conditioning
from latent_diffusion.models import unet as unet_lib
from latent_diffusion.training import autoencoder as autoencoder_stage
from latent_diffusion.training import checkpoint
from latent_diffusion.training import loop
from latent_diffusion.training import train_state

STAGE = 'ldm'


class Conditioner:
  """Turns a batch's captions or labels into UNet context: host-side inputs, the null input, the encoder."""

  def __init__(self, cond_config):
    self.kind = cond_config.kind
    if self.kind == 'text':
      self.tokenizer = conditioning.create_tokenizer(cond_config)
      self.model = conditioning.TextTransformer(self.tokenizer.vocab_size, cond_config.max_length,
                                                cond_config.width, cond_config.depth, cond_config.num_heads)
      self.null = {'tokens': self.tokenizer([''], cond_config.max_length)}
      self.length = cond_config.max_length
    elif self.kind == 'class':
      self.model = conditioning.ClassEmbedder(cond_config.num_classes, cond_config.width)
      self.null = {'label': jnp.full((1,), cond_config.num_classes - 1, jnp.int32)}
    else:
      raise ValueError(f"ldm.conditioning.kind='{self.kind}' is not 'text' or 'class'.")

  def inputs(self, batch):
    """Host-side conditioning inputs of a batch of stored examples (captions are tokenized here)."""
    if self.kind == 'text':
      return {'tokens': self.tokenizer(list(batch['caption']), self.length)}
    return {'label': batch['label'].astype('int32')}

  def encode(self, params, inputs):
    return self.model.apply({'params': params}, next(iter(inputs.values())))


def sample_latent(latent, kind, rng):
  """z from the stored moments (KL: mean + std * noise) or the stored pre-quantisation latent (VQ)."""
  if kind != 'kl':
    return latent
  mean, logvar = jnp.split(latent, 2, axis=-1)
  return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape)


def optimizer(opt_config):
  learning_rate = optax.linear_schedule(0.0, opt_config.learning_rate, max(opt_config.warmup_steps, 1))
  return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip),
                     optax.adamw(learning_rate, weight_decay=opt_config.weight_decay))


def create(config, metadata):
  """The UNet, the conditioner and the train state's init function for a latent store's metadata."""
  ldm = config.ldm
  channels = metadata['shape'][-1] // (2 if metadata['kind'] == 'kl' else 1)
  unet = unet_lib.create_unet(ldm.unet, out_channels=channels)
  conditioner = Conditioner(ldm.conditioning)
  tx = optimizer(ldm.optimizer)
  latent_shape = tuple(metadata['shape'][:-1]) + (channels,)

  def init(rng):
    unet_rng, cond_rng = jax.random.split(rng)
    null = jax.tree.map(jnp.asarray, conditioner.null)
    cond_params = conditioner.model.init(cond_rng, next(iter(null.values())))['params']
    context = conditioner.model.apply({'params': cond_params}, next(iter(null.values())))
    unet_params = unet.init(unet_rng, jnp.zeros((1,) + latent_shape), jnp.zeros((1,), jnp.int32),
                            context)['params']
    return train_state.TrainState.create({'unet': unet_params, 'cond': cond_params}, tx, ldm.ema_decay)

  return unet, conditioner, init


def make_train_step(config, unet, conditioner, schedule, scale_factor, kind):
  ldm = config.ldm
  null = jax.tree.map(jnp.asarray, conditioner.null)

  def train_step(state, batch, rng):
    z_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 4)
    z = sample_latent(batch['latent'], kind, z_rng) * scale_factor
    inputs = objective.drop_condition(drop_rng, {k: batch[k] for k in null}, null, ldm.p_uncond)

    def loss_fn(params):
      context = conditioner.encode(params['cond'], inputs)
      denoise = lambda x_t, t: unet.apply({'params': params['unet']}, x_t, t, context, deterministic=False,
                                          rngs={'dropout': dropout_rng})
      loss, _ = objective.diffusion_loss(denoise, schedule, z, loss_rng, parameterization=ldm.parameterization,
                                         loss_type=ldm.loss, min_snr_gamma=ldm.min_snr_gamma)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  return train_step


def checkpoint_dir(workdir):
  return os.path.join(workdir, STAGE, 'checkpoints')


def is_done(config, workdir):
  return (checkpoint.latest_saved_step(checkpoint_dir(workdir)) or 0) >= config.ldm.total_steps


def run(config, workdir):
  """Trains under WORKDIR/ldm from the `train` latent store, resuming from the newest checkpoint."""
  ldm = config.ldm
  mesh = parallel.create_mesh(config.mesh)
  parallel.check_batch_size(ldm.batch_size, mesh)
  store = latent_store.split_dir(workdir, config.latents.splits[0])
  arrays, metadata = latent_store.load(store)
  latent_store.check_source(
      metadata, checkpoint.latest_saved_step(autoencoder_stage.checkpoint_dir(workdir)), store)
  unet, conditioner, init = create(config, metadata)
  schedule = schedules.Schedule.from_config(ldm.schedule)

  def batches(start_step):
    for batch in latent_store.LatentBatches(arrays, ldm.batch_size, seed=config.seed, start_step=start_step):
      yield {'latent': batch['latent'], **conditioner.inputs(batch)}

  task = loop.Task(init=init, batches=batches, train_step=make_train_step(
      config, unet, conditioner, schedule, metadata['scale_factor'], metadata['kind']))
  s = ldm.train_schedule
  return loop.train(task, workdir=os.path.join(workdir, STAGE), mesh=mesh, seed=config.seed,
                    total_steps=ldm.total_steps, log_every=s.log_every, checkpoint_every=s.checkpoint_every,
                    eval_every=s.eval_every, keep_checkpoints=s.keep_checkpoints)
