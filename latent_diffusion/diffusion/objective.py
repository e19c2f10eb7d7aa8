"""The latent diffusion training objective (Ho et al. 2020; the paper's Eq. 2), with our additions: v and x0
targets, l1, min-SNR weighting (Hang et al. 2023) and condition dropout for classifier-free guidance."""

import jax
import jax.numpy as jnp

from latent_diffusion.diffusion import schedules

PARAMETERIZATIONS = ('eps', 'x0', 'v')  # what the UNet predicts (ldm.parameterization)
LOSSES = ('l2', 'l1')  # ldm.loss


def drop_condition(rng, context, null_context, p_uncond):
  """Replaces each example's context by the null context with probability p_uncond (missing in the reference)."""
  if not p_uncond or not jax.tree.leaves(context):
    return context
  batch = jax.tree.leaves(context)[0].shape[0]
  drop = jax.random.bernoulli(rng, p_uncond, (batch,))
  return jax.tree.map(lambda c, n: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), n, c), context, null_context)


def snr_weight(alphas_cumprod, parameterization, gamma):
  """min(SNR, gamma) expressed for the prediction target, so every target weights x0 errors alike."""
  snr = alphas_cumprod / (1 - alphas_cumprod)
  clipped = jnp.minimum(snr, gamma)
  return {'eps': clipped / snr, 'v': clipped / (snr + 1), 'x0': clipped}[parameterization]


def diffusion_loss(denoise, schedule, x0, rng, *, parameterization='eps', loss_type='l2', min_snr_gamma=0.0):
  """Mean over the batch of the per-example error (mean over C, H, W) between `denoise(x_t, t)` and the target.

  Returns (loss, per-example t). `denoise` closes over the (already dropped-out) context.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = schedules.q_sample(schedule, x0, t, noise)
  a = schedule.alphas_cumprod[t]
  target = {'eps': noise, 'x0': x0, 'v': schedules.v_from_x0_eps(x0, noise, a)}[parameterization]
  error = denoise(x_t, t).astype(jnp.float32) - target
  error = jnp.mean(error**2 if loss_type == 'l2' else jnp.abs(error), axis=tuple(range(1, x0.ndim)))
  if min_snr_gamma:
    error = error * snr_weight(a, parameterization, min_snr_gamma)
  return jnp.mean(error), t
