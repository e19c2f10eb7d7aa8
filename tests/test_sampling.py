"""Samplers: DDIM parity with diffusers, one compile for many guidance scales, accuracy on a Gaussian toy
problem whose exact eps is known, inpainting, and the schedules and parameterisation conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latent_diffusion.diffusion import sampling
from latent_diffusion.diffusion import schedules
from tests import torch_reference

SCHEDULE = schedules.Schedule.create('scaled_linear', 1000, 0.00085, 0.012)


def gaussian_eps(schedule, std):
  """Exact eps for data N(mu, std^2) per element, mu given as the context: E[eps | x_t]."""
  def eps_fn(x, t, mu):
    a = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
    mu = mu.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * std**2 + 1 - a)
  return eps_fn


def exact_x_T(schedule, mu, std, shape, seed):
  """Samples of the exact marginal at the last timestep, so that only the sampler's error remains."""
  a = float(schedule.alphas_cumprod[-1])
  noise = np.random.default_rng(seed).normal(size=shape)
  return jnp.asarray(np.sqrt(a) * mu + np.sqrt(a * std**2 + 1 - a) * noise, jnp.float32)


def test_schedules_equal_the_reference_formulas():
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
  np.testing.assert_allclose(np.asarray(SCHEDULE.betas), betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(SCHEDULE.alphas_cumprod), np.cumprod(1 - betas), rtol=1e-6)
  linear = schedules.make_betas('linear', 1000, 1e-4, 0.02)
  assert linear[0] == 1e-4 and linear[-1] == pytest.approx(0.02) and np.all(np.diff(linear) > 0)
  cosine = np.cumprod(1 - schedules.make_betas('cosine', 1000))
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(cosine[:900], f(np.arange(1, 901)) / f(0), rtol=1e-6)


def test_eps_x0_v_conversions_round_trip():
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32) for _ in range(2))
  t = jnp.array([0, 10, 500, 999])
  x_t = schedules.q_sample(SCHEDULE, x0, t, eps)
  a = SCHEDULE.alphas_cumprod[t]
  v = schedules.v_from_x0_eps(x0, eps, a)
  np.testing.assert_allclose(schedules.x0_from_eps(x_t, eps, a), x0, atol=2e-4)
  np.testing.assert_allclose(schedules.eps_from_x0(x_t, x0, a)[1:], eps[1:], atol=2e-4)  # t=0: sigma tiny
  np.testing.assert_allclose(schedules.eps_from_v(x_t, v, a), eps, atol=1e-5)
  np.testing.assert_allclose(schedules.x0_from_v(x_t, v, a), x0, atol=1e-5)


def test_ddim_timesteps_are_the_reference_ones():
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 10), np.arange(1, 1000, 100))
  assert len(sampling.ddim_timesteps(1000, 50)) == 50
  with pytest.raises(ValueError, match='use fewer steps'):
    sampling.ddim_timesteps(1000, 1000)


@pytest.mark.parametrize('num_steps', [10, 50, 200])
@pytest.mark.parametrize('guidance_scale', [None, 4.0])
def test_ddim_matches_diffusers_step_by_step(num_steps, guidance_scale):
  diffusers = torch_reference.import_diffusers()
  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing='leading')
  scheduler.set_timesteps(num_steps)
  eps_fn = gaussian_eps(SCHEDULE, 0.5)
  mu, uncond_mu = jnp.array([1.0, -0.5]), jnp.zeros(2)
  x_T = exact_x_T(SCHEDULE, 0.0, 0.5, (2, 4, 4, 3), 0)
  if guidance_scale is None:
    ours = jax.jit(lambda x: sampling.ddim_sample(eps_fn, SCHEDULE, x, mu, num_steps=num_steps,
                                                  return_trajectory=True)[1])(x_T)
    model = lambda x, t: eps_fn(x, jnp.full((2,), t), mu)
  else:
    fn = sampling.guided(eps_fn, guidance_scale, uncond_mu)
    ours = jax.jit(lambda x: sampling.ddim_sample(fn, SCHEDULE, x, mu, num_steps=num_steps,
                                                  return_trajectory=True)[1])(x_T)
    model = lambda x, t: (eps_fn(x, jnp.full((2,), t), uncond_mu) + guidance_scale * (
        eps_fn(x, jnp.full((2,), t), mu) - eps_fn(x, jnp.full((2,), t), uncond_mu)))
  # diffusers builds its cumulative products in float32; give it the reference (float64-built) values.
  scheduler.alphas_cumprod = torch.from_numpy(np.asarray(SCHEDULE.alphas_cumprod))
  scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
  x = torch.from_numpy(np.asarray(x_T))
  np.testing.assert_array_equal(scheduler.timesteps.numpy(), sampling.ddim_timesteps(1000, num_steps)[::-1])
  scale = float(np.abs(np.asarray(ours)).max())
  for k, t in enumerate(scheduler.timesteps):
    eps = torch.from_numpy(np.asarray(model(jnp.asarray(x.numpy()), int(t))))
    x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    assert np.abs(np.asarray(ours[k]) - x.numpy()).max() <= 1e-5 * scale, k


@pytest.mark.parametrize('strength', [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers_img2img_recipe(strength):
  """SDEdit as diffusers' StableDiffusionImg2ImgPipeline runs it: the last int(S x strength) DDIM timesteps,
  starting from the init latent noised (scheduler.add_noise) to the first of them."""
  diffusers = torch_reference.import_diffusers()
  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing='leading')
  scheduler.set_timesteps(20)
  scheduler.alphas_cumprod = torch.from_numpy(np.asarray(SCHEDULE.alphas_cumprod))
  scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
  eps_fn, mu = gaussian_eps(SCHEDULE, 0.5), jnp.array([1.0, -0.5])
  init = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 3)), jnp.float32)
  ours = sampling.ddim_sample(eps_fn, SCHEDULE, noise, mu, num_steps=20, init=init, strength=strength)
  steps = min(int(20 * strength), 20)
  timesteps = scheduler.timesteps[20 - steps:]
  x = scheduler.add_noise(torch.from_numpy(np.asarray(init)), torch.from_numpy(np.asarray(noise)), timesteps[:1])
  for t in timesteps:
    eps = torch.from_numpy(np.asarray(eps_fn(jnp.asarray(x.numpy()), jnp.full((2,), int(t)), mu)))
    x = scheduler.step(eps, t, x, eta=0.0).prev_sample
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-5 * float(np.abs(x.numpy()).max()))
  low = sampling.ddim_sample(eps_fn, SCHEDULE, noise, mu, num_steps=20, init=init, strength=0.1)
  assert float(jnp.abs(low - init).mean()) < float(jnp.abs(ours - init).mean())  # less strength, closer to init
  with pytest.raises(ValueError, match='sampling.strength=0.01 runs no step of sampling.num_steps=20'):
    sampling.ddim_sample(eps_fn, SCHEDULE, noise, mu, num_steps=20, init=init, strength=0.01)


@pytest.mark.parametrize('num_steps', [1000, 50])
def test_ddpm_matches_diffusers_step_by_step(num_steps, monkeypatch):
  """The ancestral sampler against diffusers' DDPMScheduler ('fixed_small' variance, leading spacing; at 1000
  steps the reference's p_sample_loop), fed the same per-step noise."""
  diffusers = torch_reference.import_diffusers()
  from diffusers.schedulers import scheduling_ddpm  # pylint: disable=g-import-not-at-top
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule='scaled_linear', clip_sample=False, variance_type='fixed_small')
  scheduler.set_timesteps(num_steps)
  scheduler.alphas_cumprod = torch.from_numpy(np.asarray(SCHEDULE.alphas_cumprod))
  np.testing.assert_array_equal(scheduler.timesteps.numpy(), sampling.ddpm_timesteps(1000, num_steps))
  eps_fn, mu = gaussian_eps(SCHEDULE, 0.5), jnp.array([1.0, -0.5])
  x_T = exact_x_T(SCHEDULE, 0.0, 0.5, (2, 4, 4, 3), 0)
  rng = jax.random.PRNGKey(3)
  ours = np.asarray(jax.jit(lambda x: sampling.ddpm_sample(eps_fn, SCHEDULE, x, mu, num_steps=num_steps,
                                                           rng=rng))(x_T))
  keys = sampling.image_keys(rng, 2)
  step_index = {}
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor', lambda shape, **kwargs: torch.from_numpy(np.asarray(
      sampling._normal(keys, step_index['n'], shape, jnp.float32, stream=0))))  # pylint: disable=protected-access
  x = torch.from_numpy(np.asarray(x_T))
  for n, t in enumerate(scheduler.timesteps):
    step_index['n'] = n
    eps = torch.from_numpy(np.asarray(eps_fn(jnp.asarray(x.numpy()), jnp.full((2,), int(t)), mu)))
    x = scheduler.step(eps, t, x).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), atol=2e-4 * float(np.abs(ours).max()))
  assert float(np.abs(ours - np.asarray(sampling.ddpm_sample(eps_fn, SCHEDULE, x_T, mu, num_steps=num_steps,
                                                             rng=jax.random.PRNGKey(4)))).max()) > 0.05


def test_guidance_scale_is_traced_and_compiles_once():
  traces = []
  eps_fn = gaussian_eps(SCHEDULE, 0.5)

  @jax.jit
  def sample(x, scale):
    traces.append(1)
    return sampling.ddim_sample(sampling.guided(eps_fn, scale, jnp.zeros(2)), SCHEDULE, x, jnp.ones(2),
                                num_steps=10)

  x_T = exact_x_T(SCHEDULE, 0.0, 0.5, (2, 4, 4, 1), 0)
  outputs = [sample(x_T, jnp.float32(s)) for s in (1.0, 3.0, 7.5)]
  assert len(traces) == 1
  assert float(jnp.abs(outputs[0] - outputs[2]).max()) > 0.1


def test_eta_zero_is_deterministic_and_eta_one_uses_the_key():
  eps_fn = gaussian_eps(SCHEDULE, 0.5)
  x_T = exact_x_T(SCHEDULE, 0.0, 0.5, (2, 4, 4, 1), 0)
  run = lambda eta, seed: sampling.ddim_sample(eps_fn, SCHEDULE, x_T, jnp.ones(2), num_steps=20, eta=eta,
                                               rng=jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(np.asarray(run(0.0, 0)), np.asarray(run(0.0, 1)))
  np.testing.assert_array_equal(np.asarray(run(1.0, 0)), np.asarray(run(1.0, 0)))
  assert float(jnp.abs(run(1.0, 0) - run(1.0, 1)).max()) > 0.05


@pytest.mark.parametrize('sampler,num_steps', [('plms', 20), ('dpm_solver_pp', 20), ('ddim', 200), ('ddpm', 1000)])
def test_samplers_recover_a_gaussian(sampler, num_steps):
  # First-order DDIM needs many more steps than the multistep samplers: at 20 steps its std is ~11% low.
  mu, std = 1.5, 0.5
  fn = getattr(sampling, f'{sampler}_sample')
  x_T = exact_x_T(SCHEDULE, mu, std, (4096, 2, 2, 1), 1)
  samples = np.asarray(jax.jit(lambda x: fn(gaussian_eps(SCHEDULE, std), SCHEDULE, x, jnp.full((4096,), mu),
                                            num_steps=num_steps))(x_T))
  assert samples.mean() == pytest.approx(mu, rel=0.02)
  assert samples.std() == pytest.approx(std, rel=0.02)


def test_v_and_x0_models_wrap_into_the_same_eps():
  eps_fn = gaussian_eps(SCHEDULE, 0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 1)), jnp.float32)
  t, mu = jnp.array([100, 700]), jnp.array([0.3, -1.0])
  eps = eps_fn(x, t, mu)
  a = SCHEDULE.alphas_cumprod[t]
  x0 = schedules.x0_from_eps(x, eps, a)
  v_model = lambda x, t, c: schedules.v_from_x0_eps(schedules.x0_from_eps(x, eps_fn(x, t, c), a), eps_fn(x, t, c), a)
  np.testing.assert_allclose(sampling.as_eps_fn(v_model, 'v', SCHEDULE)(x, t, mu), eps, atol=1e-5)
  np.testing.assert_allclose(sampling.as_eps_fn(lambda *_: x0, 'x0', SCHEDULE)(x, t, mu), eps, atol=1e-4)


@pytest.mark.parametrize('sampler', ['ddim', 'plms', 'dpm_solver_pp'])
def test_inpainting_keeps_the_known_region(sampler):
  std = 0.5
  known = jnp.asarray(np.random.default_rng(2).normal(0, std, (2, 8, 8, 1)), jnp.float32)
  mask = jnp.zeros((1, 8, 8, 1)).at[:, :, :4].set(1.0)  # left half known
  x_T = exact_x_T(SCHEDULE, 0.0, std, (2, 8, 8, 1), 3)
  fn = getattr(sampling, f'{sampler}_sample')
  out = fn(gaussian_eps(SCHEDULE, std), SCHEDULE, x_T, jnp.zeros(2), num_steps=50, rng=jax.random.PRNGKey(0),
           mask=mask, known=known)
  known_error = float(jnp.abs((out - known) * mask).max())
  # The reference re-noises the known region to the current timestep before each step, so the last step
  # starts from noise of std sqrt(1 - a_1) = 0.041: errors stay within 4 of those stds of 0.5-std data.
  assert known_error < 4 * float(jnp.sqrt(1 - SCHEDULE.alphas_cumprod[1]))
  assert float(jnp.abs((out - known) * (1 - mask)).mean()) > 0.2  # the unknown half is generated anew
