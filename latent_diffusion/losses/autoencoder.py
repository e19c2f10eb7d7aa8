"""First-stage losses (taming's `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`) as pure functions.

Generator: nll of the L1 + LPIPS reconstruction error (KL: divided by exp(logvar) plus logvar, with a
learnable scalar logvar; VQ: plain mean), plus the regulariser (KL or VQ loss) and the adversarial term
-mean(D(x_hat)) weighted by the adaptive weight ||grad_L nll|| / (||grad_L g|| + 1e-4), L the decoder's last
layer, once step >= disc_start. Discriminator: hinge or vanilla GAN loss on real and reconstructed images.
"""

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISC_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


def adaptive_weight(nll_grad, g_grad, max_weight=1e4):
  """The reference's balance of the adversarial term: ||grad nll|| / (||grad g|| + 1e-4), clipped, no gradient."""
  weight = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def reconstruction_nll(x, x_hat, logvar, *, kind, perceptual_weight=0.0, lpips=None):
  """Returns (nll loss, mean reconstruction error). Per pixel: |x - x_hat| + perceptual_weight * LPIPS(x, x_hat).

  KL models: sum(rec / exp(logvar) + logvar) / batch, with logvar a learnable scalar (the reference declares it
  but never gives it to an optimizer; we optimise it). VQ models: the plain mean of rec.
  """
  rec = jnp.abs(x - x_hat)
  if perceptual_weight > 0:
    rec = rec + perceptual_weight * lpips(x, x_hat)[:, None, None, None]
  if kind == 'vq':
    return jnp.mean(rec), jnp.mean(rec)
  nll = rec / jnp.exp(logvar) + logvar
  return jnp.sum(nll) / x.shape[0], jnp.mean(rec)
