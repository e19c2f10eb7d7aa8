"""Noise schedules and the conversions between eps, x0 and v (Ho et al. 2020; Salimans & Ho 2022).

Betas are built in float64 as the reference does (numpy), then stored as float32 arrays.
"""

import flax
import jax.numpy as jnp
import numpy as np

KINDS = ('scaled_linear', 'linear', 'cosine')  # ldm.schedule.kind


def make_betas(kind, num_timesteps, beta_start=0.00085, beta_end=0.012, cosine_s=0.008):
  """float64 betas: 'scaled_linear' (the reference's "linear": linspace of square roots, squared), 'linear',
  or 'cosine' (Nichol & Dhariwal 2021, betas clipped at 0.999)."""
  if kind == 'scaled_linear':
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  if kind == 'linear':
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if kind == 'cosine':
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alphas_cumprod = np.cos((t + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
  raise ValueError(f"Unknown schedule kind '{kind}'; use one of {KINDS}.")


@flax.struct.dataclass
class Schedule:
  """alphas_cumprod[t] = prod_{s<=t} (1 - beta_s), t = 0 .. T-1."""
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray

  @classmethod
  def create(cls, kind='scaled_linear', num_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    betas = make_betas(kind, num_timesteps, beta_start, beta_end)
    return cls(betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(np.cumprod(1 - betas), jnp.float32))

  @classmethod
  def from_config(cls, schedule_config):
    return cls.create(schedule_config.kind, schedule_config.num_timesteps, schedule_config.beta_start,
                      schedule_config.beta_end)

  @property
  def num_timesteps(self):
    return self.betas.shape[0]


def _expand(values, ndim):
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def alpha_sigma(alphas_cumprod, x):
  """sqrt(a) and sqrt(1 - a), broadcast against x (a is a scalar or per-example [B])."""
  a = _expand(jnp.asarray(alphas_cumprod, x.dtype), x.ndim)
  return jnp.sqrt(a), jnp.sqrt(1 - a)


def q_sample(schedule, x0, t, noise):
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
  alpha, sigma = alpha_sigma(schedule.alphas_cumprod[t], x0)
  return alpha * x0 + sigma * noise


def x0_from_eps(x_t, eps, alphas_cumprod):
  alpha, sigma = alpha_sigma(alphas_cumprod, x_t)
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alphas_cumprod):
  alpha, sigma = alpha_sigma(alphas_cumprod, x_t)
  return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alphas_cumprod):
  alpha, sigma = alpha_sigma(alphas_cumprod, x0)
  return alpha * eps - sigma * x0


def eps_from_v(x_t, v, alphas_cumprod):
  alpha, sigma = alpha_sigma(alphas_cumprod, x_t)
  return sigma * x_t + alpha * v


def x0_from_v(x_t, v, alphas_cumprod):
  alpha, sigma = alpha_sigma(alphas_cumprod, x_t)
  return alpha * x_t - sigma * v
