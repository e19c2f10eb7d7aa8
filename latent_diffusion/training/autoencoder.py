"""The `autoencoder` stage: trains the first stage (KL or VQ) with L1 + LPIPS + regulariser + PatchGAN.

One jitted, sharded step updates both the autoencoder (Adam 0.5, 0.9; with the learnable logvar) and the
discriminator on the same batch. The autoencoder's forward pass runs once under `jax.vjp`: its pullback gives
the adaptive weight's last-layer gradients (the rest of those backward passes is pruned by XLA) and the full
gradient, without a second forward pass.
"""

import functools
import os
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.evaluation import image_metrics
from latent_diffusion.losses import autoencoder as losses
from latent_diffusion.losses import lpips as lpips_lib
from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.models import discriminator as discriminator_lib
from latent_diffusion.training import checkpoint
from latent_diffusion.training import loop
from latent_diffusion.training import train_state
from latent_diffusion.weights import autoencoder as weights_autoencoder
from latent_diffusion.weights import lpips as lpips_weights

STAGE = 'autoencoder'


class AutoencoderState(flax.struct.PyTreeNode):
  """The generator (autoencoder params + loss logvar, optional EMA) and the discriminator with its BatchNorm stats
  (None when the config never switches the adversarial term on)."""
  generator: train_state.TrainState
  discriminator: train_state.TrainState
  disc_batch_stats: Any

  @property
  def step(self):
    return self.generator.step


def uses_discriminator(config):
  loss = config.autoencoder.loss
  return loss.disc_weight > 0 and loss.disc_factor > 0 and loss.disc_start < config.autoencoder.total_steps


def load_lpips(loss_config):
  """LPIPS params when the loss uses them; None (logged) when the config opts out with perceptual_weight=0."""
  if loss_config.perceptual_weight <= 0:
    logging.warning('autoencoder.loss.perceptual_weight=0: training without the LPIPS term (opted out).')
    return None
  return lpips_weights.load(loss_config.lpips_weights)


def _optimizer(opt_config, total_steps):
  learning_rate = train_state.learning_rate(opt_config.learning_rate, warmup_steps=0, decay=opt_config.decay,
                                            total_steps=total_steps)
  return optax.adam(learning_rate, b1=opt_config.b1, b2=opt_config.b2)


def make_init(config, model, discriminator, image_shape):
  g_tx, d_tx = (_optimizer(config.autoencoder.optimizer, config.autoencoder.total_steps) for _ in range(2))

  def init(rng):
    ae_rng, sample_rng, d_rng = jax.random.split(rng, 3)
    x = jnp.zeros((1,) + image_shape, jnp.float32)
    params = {'autoencoder': model.init(ae_rng, x, sample_rng)['params'], 'logvar': jnp.zeros(())}
    generator = train_state.TrainState.create(params, g_tx, config.autoencoder.ema_decay)
    if not uses_discriminator(config):
      return AutoencoderState(generator=generator, discriminator=None, disc_batch_stats=None)
    d_vars = discriminator.init(d_rng, x, train=False)
    return AutoencoderState(generator=generator, discriminator=train_state.TrainState.create(d_vars['params'], d_tx),
                            disc_batch_stats=d_vars['batch_stats'])
  return init


def make_train_step(config, model, discriminator, lpips_params):
  """(state, batch, rng) -> (state, metrics): one generator and one discriminator update on the same batch."""
  loss_config = config.autoencoder.loss
  kind = config.autoencoder.model.kind
  reg_weight = loss_config.kl_weight if kind == 'kl' else loss_config.codebook_weight
  lpips = lpips_lib.lpips_fn(lpips_params) if lpips_params is not None else None
  use_disc = uses_discriminator(config)
  disc_loss = losses.DISC_LOSSES[loss_config.disc_loss]

  def train_step(state, batch, rng):
    x = batch['image']
    sample_rng, dropout_rng = jax.random.split(rng)
    g_params = state.generator.params

    def forward(ae_params):
      x_hat, reg, info = model.apply({'params': ae_params}, x, sample_rng, sample_posterior=True,
                                     deterministic=False, rngs={'dropout': dropout_rng})
      return (x_hat, reg), info

    (x_hat, reg), pullback, info = jax.vjp(forward, g_params['autoencoder'], has_aux=True)
    nll_fn = functools.partial(losses.reconstruction_nll, x, kind=kind,
                               perceptual_weight=loss_config.perceptual_weight, lpips=lpips)
    (nll, rec), (nll_cot, logvar_grad) = jax.value_and_grad(nll_fn, argnums=(0, 1), has_aux=True)(
        x_hat, g_params['logvar'])
    zero_reg = jnp.zeros_like(reg)
    x_hat_cot = nll_cot
    metrics = {'loss': nll + reg_weight * reg, 'nll_loss': nll, 'rec_loss': rec, 'logvar': g_params['logvar'],
               'reg_loss': reg, **{k: v for k, v in info.items() if k != 'indices'}}
    discriminator_state, batch_stats = state.discriminator, state.disc_batch_stats
    if use_disc:
      def d_apply(d_params, stats, images):
        logits, updates = discriminator.apply({'params': d_params, 'batch_stats': stats}, images, train=True,
                                              mutable=['batch_stats'])
        return logits, updates['batch_stats']

      def g_fn(x_hat):
        logits, stats = d_apply(discriminator_state.params, batch_stats, x_hat)
        return -jnp.mean(logits), stats

      (g_loss, batch_stats), g_cot = jax.value_and_grad(g_fn, has_aux=True)(x_hat)
      last_layer = lambda cot: pullback((cot, zero_reg))[0]['decoder']['conv_out']['kernel']
      d_weight = losses.adaptive_weight(last_layer(nll_cot), last_layer(g_cot)) * loss_config.disc_weight
      factor = (state.step >= loss_config.disc_start).astype(jnp.float32) * loss_config.disc_factor
      x_hat_cot = x_hat_cot + d_weight * factor * g_cot

      def d_loss_fn(d_params):
        logits_real, stats = d_apply(d_params, batch_stats, x)
        logits_fake, stats = d_apply(d_params, stats, jax.lax.stop_gradient(x_hat))
        return factor * disc_loss(logits_real, logits_fake), (stats, logits_real, logits_fake)

      (d_loss, (batch_stats, real, fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
          discriminator_state.params)
      discriminator_state = discriminator_state.apply_gradients(d_grads)
      metrics.update(loss=metrics['loss'] + d_weight * factor * g_loss, g_loss=g_loss, d_weight=d_weight,
                     disc_factor=factor, disc_loss=d_loss, logits_real=jnp.mean(real), logits_fake=jnp.mean(fake))
    (ae_grads,) = pullback((x_hat_cot, jnp.full_like(reg, reg_weight)))
    generator = state.generator.apply_gradients({'autoencoder': ae_grads, 'logvar': logvar_grad})
    return state.replace(generator=generator, discriminator=discriminator_state,
                         disc_batch_stats=batch_stats), metrics

  return train_step


def make_evaluate(config, model, mesh, lpips_params):
  """Reconstructs the first `eval.num_images` validation images with the posterior mode (EMA params if kept)."""
  batch_size = config.autoencoder.batch_size
  images = [b for b in input_pipeline.eval_iterator(config.data, batch_size,
                                                    num_examples=config.autoencoder.eval.num_images)]
  lpips = lpips_lib.lpips_fn(lpips_params) if lpips_params is not None else None

  @jax.jit
  def measure(params, x):
    x_hat, _, info = model.apply({'params': params}, x, None, sample_posterior=False)
    x_hat = jnp.clip(x_hat, -1, 1)
    out = {'psnr': image_metrics.psnr(x, x_hat), 'ssim': image_metrics.ssim(x, x_hat)}
    if lpips is not None:
      out['lpips'] = lpips(x, x_hat)
    return out, x_hat, info.get('indices')

  def evaluate(state, step):
    del step
    params = state.generator.eval_params['autoencoder']
    values, used, grids = {}, [], {}
    for batch in images:
      x = input_pipeline.to_global({'image': batch['image']}, mesh)['image']
      out, x_hat, indices = measure(params, x)
      mask = batch['mask']
      for k, v in parallel.to_host(out).items():
        values.setdefault(k, []).append(v[mask])
      if indices is not None:
        used.append(parallel.to_host(indices)[mask].reshape(-1))
      if not grids:
        n = min(8, int(mask.sum()))
        pairs = np.stack([batch['image'][:n], parallel.to_host(x_hat)[:n]], axis=1)
        grids['reconstructions'] = pairs.reshape((-1,) + pairs.shape[2:])  # input, reconstruction, ...
    scalars = {k: float(np.mean(np.concatenate(v))) for k, v in values.items()}
    if used:
      counts = np.bincount(np.concatenate(used), minlength=config.autoencoder.model.n_embed)
      p = counts / counts.sum()
      scalars['perplexity'] = float(np.exp(-np.sum(p * np.log(p + 1e-10))))
      scalars['codebook_usage'] = float(np.mean(counts > 0))
    return scalars, grids

  return evaluate


def checkpoint_dir(workdir):
  return os.path.join(workdir, STAGE, 'checkpoints')


def is_done(config, workdir):
  step = checkpoint.latest_saved_step(checkpoint_dir(workdir))
  return bool(config.autoencoder.pretrained) or (step or 0) >= config.autoencoder.total_steps


def run(config, workdir):
  """Trains the configured autoencoder under WORKDIR/autoencoder, resuming from its newest checkpoint; with
  `autoencoder.pretrained` there is nothing to train (later stages convert the imported weights)."""
  ae = config.autoencoder
  if ae.pretrained:
    logging.info('autoencoder.pretrained=%s: using the imported first stage, nothing to train.', ae.pretrained)
    return None
  lpips_params = load_lpips(ae.loss)  # Fails before any data is read if the weights are missing.
  mesh = parallel.create_mesh(config.mesh)
  parallel.check_batch_size(ae.batch_size, mesh)
  model = autoencoder_lib.create_autoencoder(ae.model)
  discriminator = discriminator_lib.NLayerDiscriminator(ndf=ae.loss.disc_ndf, n_layers=ae.loss.disc_num_layers)
  image_shape = (config.data.resolution, config.data.resolution, 3)
  task = loop.Task(
      init=make_init(config, model, discriminator, image_shape),
      train_step=make_train_step(config, model, discriminator, lpips_params),
      batches=lambda start: ({'image': b['image']} for b in input_pipeline.train_iterator(
          config.data, ae.batch_size, seed=config.seed, start_step=start)),
      evaluate=make_evaluate(config, model, mesh, lpips_params))
  return loop.train(task, workdir=os.path.join(workdir, STAGE), mesh=mesh, seed=config.seed,
                    total_steps=ae.total_steps, **ae.train_schedule.to_dict())


def load_trained(config, workdir, mesh):
  """The frozen first stage for later stages: (model, params (EMA when kept), checkpoint step), restored
  straight into their shardings without initialising a model first; or the weights of `autoencoder.pretrained`
  (a diffusers folder or a CompVis checkpoint converted, or the trained first stage of another workdir of ours,
  as a ControlNet on our own base reads it), with step None."""
  model = autoencoder_lib.create_autoencoder(config.autoencoder.model)
  pretrained = config.autoencoder.pretrained
  if pretrained and not epath.Path(checkpoint_dir(pretrained)).is_dir():
    params = weights_autoencoder.load(pretrained, config.autoencoder.model)
    return model, parallel.put(params, parallel.tree_shardings(weights_autoencoder.abstract_params(model), mesh)), None
  discriminator = discriminator_lib.NLayerDiscriminator(ndf=config.autoencoder.loss.disc_ndf,
                                                        n_layers=config.autoencoder.loss.disc_num_layers)
  image_shape = (config.data.resolution, config.data.resolution, 3)
  state, step = checkpoint.restore_newest(checkpoint_dir(pretrained or workdir), make_init(
      config, model, discriminator, image_shape), mesh, STAGE)
  return model, state.generator.eval_params['autoencoder'], None if pretrained else step
