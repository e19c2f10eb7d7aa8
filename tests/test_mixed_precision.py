"""bfloat16 compute with float32 parameters: the smoke txt2img UNet trains with a falling loss, and its first
loss matches float32's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import txt2img
from latent_diffusion.diffusion import schedules
from latent_diffusion.training import ldm


def train_losses(dtype, steps):
  """Losses of `steps` steps of the smoke config's ldm train step on one fixed batch of 16 latents + captions."""
  config = txt2img.get_config('smoke')
  config.ldm.unet.dtype = dtype
  config.ldm.optimizer.warmup_steps = 1
  metadata = {'shape': [8, 8, 6], 'kind': 'kl', 'scale_factor': 1.0}
  unet, conditioner, init = ldm.create(config, metadata)
  step = jax.jit(ldm.make_train_step(config, unet, conditioner, schedules.Schedule.from_config(config.ldm.schedule),
                                     1.0, 'kl'))
  rng = np.random.default_rng(0)
  mean = np.repeat(np.repeat(rng.normal(size=(16, 2, 2, 3)), 4, axis=1), 4, axis=2)  # smooth latents
  batch = {'latent': np.concatenate([mean, np.full_like(mean, -8.0)], -1).astype(np.float32),
           **conditioner.inputs({'caption': [txt2img.SMOKE_PROMPTS[i % 8] for i in range(16)]})}
  state = init(jax.random.PRNGKey(0))
  state = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, state,
                       is_leaf=lambda x: hasattr(x, 'unbox'))
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics['loss']))
  return losses, state


@pytest.mark.slow  # bfloat16 is emulated on CPUs: ~2 s per step here
def test_bfloat16_training_of_the_smoke_config_keeps_a_falling_loss():
  losses, state = train_losses('bfloat16', 20)
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses  # measured: 1.00 -> 0.60
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}  # parameters stay float32
  full, _ = train_losses('float32', 1)
  assert abs(losses[0] - full[0]) < 0.02 * full[0]
