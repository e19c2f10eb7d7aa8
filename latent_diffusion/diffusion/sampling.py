"""Samplers whose whole loop is one traced program (`lax.scan`), for any `eps_fn(x, t, context) -> eps`.

`ddim_sample` is the reference DDIM (Song et al. 2021; CompVis `ddim.py`), `ddpm_sample` the reference's
ancestral sampler (`p_sample_loop`), `plms_sample` the reference PLMS (Liu et al. 2022; CompVis `plms.py`),
`dpm_solver_pp_sample` DPM-Solver++(2M) (Lu et al. 2022). Classifier-free guidance wraps an eps_fn (`guided`),
so every sampler gets it; its scale is a traced value. Models that predict v or x0 are wrapped by `as_eps_fn`. Inpainting (`mask`, `known`) follows the reference: before each
step the known region is replaced by the known latent noised to the current timestep. `rng` gives one key per
image (or one key to split), and each image's noise comes from its key alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion import schedules


def as_eps_fn(model_fn, parameterization, schedule):
  """Wraps a model predicting 'eps', 'v' or 'x0' as an eps predictor."""
  if parameterization == 'eps':
    return model_fn
  convert = {'v': schedules.eps_from_v, 'x0': schedules.eps_from_x0}[parameterization]
  return lambda x, t, context: convert(x, model_fn(x, t, context), schedule.alphas_cumprod[t])


def interleave(a, b):
  """[B, ...] and [B, ...] -> [2B, ...] ordered a_0, b_0, a_1, b_1, ...: row pairs stay in their batch shard."""
  return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def guided(eps_fn, guidance_scale, uncond_context, guidance_rescale=0.0):
  """Classifier-free guidance: the conditional and unconditional contexts run as one doubled batch, and
  eps = eps_u + s (eps_c - eps_u). `guidance_rescale` > 0 rescales eps towards the std of eps_c (Lin et al. 2023).
  A negative prompt is simply its context passed as `uncond_context`. The doubled batch interleaves each
  example's two rows, so a batch-sharded x stays on its devices (concatenating halves would gather the batch)."""
  def fn(x, t, context):
    both = jax.tree.map(interleave, uncond_context, context)
    eps = eps_fn(interleave(x, x), interleave(t, t), both).reshape((x.shape[0], 2) + x.shape[1:])
    eps_u, eps_c = eps[:, 0], eps[:, 1]
    eps = eps_u + guidance_scale * (eps_c - eps_u)
    if guidance_rescale:
      axes = tuple(range(1, x.ndim))
      rescaled = eps * jnp.std(eps_c, axis=axes, keepdims=True) / jnp.std(eps, axis=axes, keepdims=True)
      eps = guidance_rescale * rescaled + (1 - guidance_rescale) * eps
    return eps
  return fn


def ddim_timesteps(num_timesteps, num_steps, spacing='uniform'):
  """The reference's `make_ddim_timesteps`: range(0, T, T // S) + 1 ('uniform') or squared spacing ('quad')."""
  if spacing == 'uniform':
    steps = np.arange(0, num_timesteps, num_timesteps // num_steps) + 1
  elif spacing == 'quad':
    steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(int) + 1
  else:
    raise ValueError(f"Unknown DDIM spacing '{spacing}'; use 'uniform' or 'quad'.")
  if steps[-1] >= num_timesteps:
    raise ValueError(f'{num_steps} DDIM steps of a {num_timesteps}-step schedule reach timestep {steps[-1]}; '
                     'use fewer steps.')
  return steps


def _ddim_coefficients(schedule, timesteps, eta):
  """alpha_t, alpha_prev (alphas_cumprod[0] before the first timestep, not 1) and sigma_t, as the reference."""
  alphas = schedule.alphas_cumprod[timesteps]
  alphas_prev = jnp.concatenate([schedule.alphas_cumprod[:1], alphas[:-1]])
  sigmas = eta * jnp.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  return alphas, alphas_prev, sigmas


def _threshold(x0, clip_x0, dynamic_percentile):
  """Optional x0 clipping to [-c, c] or dynamic thresholding (Saharia et al. 2022), for pixel-space models."""
  if dynamic_percentile:
    axes = tuple(range(1, x0.ndim))
    s = jnp.maximum(jnp.percentile(jnp.abs(x0), dynamic_percentile, axis=axes, keepdims=True), 1.0)
    x0 = jnp.clip(x0, -s, s) / s
  if clip_x0:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
  return x0


def _ddim_step(x, eps, alpha, alpha_prev, sigma, noise, clip_x0=None, dynamic_percentile=None):
  """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise; returns (x_prev, x0)."""
  x0 = schedules.x0_from_eps(x, eps, alpha)
  if clip_x0 or dynamic_percentile:
    x0 = _threshold(x0, clip_x0, dynamic_percentile)
    eps = schedules.eps_from_x0(x, x0, alpha)
  direction = jnp.sqrt(1 - alpha_prev - sigma**2) * eps
  return jnp.sqrt(alpha_prev) * x0 + direction + sigma * noise, x0


def image_keys(rng, batch):
  """One key per image: a batch of keys as given (from each image's seed, so that its noise does not depend on
  its batch), or `batch` keys split from one key (None: key 0)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  single = rng.ndim == (0 if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1)
  return jax.random.split(rng, batch) if single else rng


def _normal(keys, i, shape, dtype, stream):
  """Noise [B, ...] for step i: image b's from its own key alone; `stream` separates the step noise (0) from the
  inpainting noise (1)."""
  draw = lambda key: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), stream), shape[1:], dtype)
  return jax.vmap(draw)(keys)


def _inpaint(x, schedule, t, keys, i, mask, known):
  """Replaces the known region (mask = 1) of x by the known latent noised to timestep t (noise of step i)."""
  if mask is None:
    return x
  noised = schedules.q_sample(schedule, known, t, _normal(keys, i, known.shape, known.dtype, stream=1))
  return mask * noised + (1 - mask) * x


def _batch_t(x, t):
  return jnp.full((x.shape[0],), t, jnp.int32)


def img2img_steps(num_steps, strength):
  """How many of the DDIM steps img2img runs: the last int(strength x num_steps), as diffusers' img2img."""
  steps = min(int(num_steps * strength), num_steps)
  if steps < 1:
    raise ValueError(f'sampling.strength={strength} runs no step of sampling.num_steps={num_steps}; raise it (at most '
                     '1, which is the whole chain).')
  return steps


def ddim_sample(eps_fn, schedule, x_T, context, *, num_steps, rng=None, eta=0.0, spacing='uniform', mask=None,
                known=None, clip_x0=None, dynamic_percentile=None, return_trajectory=False, init=None, strength=1.0):
  """DDIM from x_T down to the reference's last step; returns x (and [S, ...] states after each step). With an
  `init` latent, img2img (SDEdit, Meng et al. 2022): init noised with x_T to the timestep of the last
  img2img_steps(num_steps, strength) steps, which then run."""
  timesteps = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  alphas, alphas_prev, sigmas = _ddim_coefficients(schedule, timesteps, eta)
  keys = image_keys(rng, x_T.shape[0])
  steps = len(timesteps)
  if init is not None:
    steps = img2img_steps(num_steps, strength)
    x_T = jnp.sqrt(alphas[steps - 1]) * init + jnp.sqrt(1 - alphas[steps - 1]) * x_T

  def step(x, i):
    t = jnp.asarray(timesteps)[i]
    x = _inpaint(x, schedule, t, keys, i, mask, known)
    eps = eps_fn(x, _batch_t(x, t), context)
    noise = _normal(keys, i, x.shape, x.dtype, stream=0)
    x, _ = _ddim_step(x, eps, alphas[i], alphas_prev[i], sigmas[i], noise, clip_x0, dynamic_percentile)
    return x, x if return_trajectory else None

  x, trajectory = jax.lax.scan(step, x_T, jnp.arange(steps)[::-1])
  return (x, trajectory) if return_trajectory else x


def ddpm_timesteps(num_timesteps, num_steps):
  """The ancestral sampler's timesteps, descending: every one (num_steps = T, the reference's p_sample_loop) or
  every (T // S)-th from 0 (diffusers' DDPMScheduler, leading spacing)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'sampling.num_steps={num_steps}: the DDPM sampler takes 1 to {num_timesteps} steps.')
  return (np.arange(num_steps) * (num_timesteps // num_steps))[::-1]


def ddpm_sample(eps_fn, schedule, x_T, context, *, num_steps, rng=None, mask=None, known=None, clip_x0=None,
                dynamic_percentile=None):
  """Ancestral sampling (Ho et al. 2020; the reference's p_sample_loop at num_steps = T): x_prev drawn from the
  posterior q(x_prev | x_t, x0-hat) between each timestep and the next one down (variance clamped at 1e-20, the
  reference's 'fixed small'), without noise at the last step. `clip_x0=1` is the reference's clip_denoised."""
  timesteps = ddpm_timesteps(schedule.num_timesteps, num_steps)
  alphas = schedule.alphas_cumprod[timesteps]
  alphas_prev = jnp.concatenate([schedule.alphas_cumprod[timesteps[1:]], jnp.ones(1)])
  betas = 1 - alphas / alphas_prev
  coef_x0 = jnp.sqrt(alphas_prev) * betas / (1 - alphas)
  coef_x = jnp.sqrt(1 - betas) * (1 - alphas_prev) / (1 - alphas)
  stds = jnp.sqrt(jnp.maximum((1 - alphas_prev) / (1 - alphas) * betas, 1e-20)).at[-1].set(0.0)
  keys = image_keys(rng, x_T.shape[0])

  def step(x, n):
    t = jnp.asarray(timesteps)[n]
    x = _inpaint(x, schedule, t, keys, n, mask, known)
    eps = eps_fn(x, _batch_t(x, t), context)
    x0 = _threshold(schedules.x0_from_eps(x, eps, alphas[n]), clip_x0, dynamic_percentile)
    return coef_x0[n] * x0 + coef_x[n] * x + stds[n] * _normal(keys, n, x.shape, x.dtype, stream=0), None

  x, _ = jax.lax.scan(step, x_T, jnp.arange(len(timesteps)))
  return x


def plms_sample(eps_fn, schedule, x_T, context, *, num_steps, rng=None, mask=None, known=None, clip_x0=None,
                dynamic_percentile=None):
  """The reference PLMS: a 2nd-order start (two model calls), then 2nd-, 3rd- and 4th-order Adams-Bashforth
  combinations of the previous eps, with DDIM (eta = 0) steps on the combined eps."""
  timesteps = ddim_timesteps(schedule.num_timesteps, num_steps)
  alphas, alphas_prev, _ = _ddim_coefficients(schedule, timesteps, 0.0)
  keys = image_keys(rng, x_T.shape[0])
  order = np.arange(len(timesteps))[::-1]
  ts = jnp.asarray(timesteps)

  def update(x, eps, i):
    return _ddim_step(x, eps, alphas[i], alphas_prev[i], 0.0, 0.0, clip_x0, dynamic_percentile)[0]

  # First step: the improved-Euler start of the reference (eps averaged with eps at the next timestep).
  first = int(order[0])
  x = _inpaint(x_T, schedule, ts[first], keys, first, mask, known)
  eps = eps_fn(x, _batch_t(x, ts[first]), context)
  following = int(order[1]) if len(order) > 1 else first
  eps_next = eps_fn(update(x, eps, first), _batch_t(x, ts[following]), context)
  x = update(x, (eps + eps_next) / 2, first)

  def step(carry, n):
    x, history = carry  # history[0] is the newest eps
    i = jnp.asarray(order)[n]
    x = _inpaint(x, schedule, ts[i], keys, i, mask, known)
    eps = eps_fn(x, _batch_t(x, ts[i]), context)
    second = (3 * eps - history[0]) / 2
    third = (23 * eps - 16 * history[0] + 5 * history[1]) / 12
    fourth = (55 * eps - 59 * history[0] + 37 * history[1] - 9 * history[2]) / 24
    combined = jnp.where(n == 1, second, jnp.where(n == 2, third, fourth))
    history = jnp.concatenate([eps[None], history[:-1]])
    return (update(x, combined, i), history), None

  history = jnp.stack([eps, jnp.zeros_like(eps), jnp.zeros_like(eps)])
  (x, _), _ = jax.lax.scan(step, (x, history), jnp.arange(1, len(order)))
  return x


def dpm_solver_pp_sample(eps_fn, schedule, x_T, context, *, num_steps, rng=None, mask=None, known=None,
                         clip_x0=None, dynamic_percentile=None):
  """DPM-Solver++(2M) on data predictions, first-order at the first step, the result being the data prediction
  at timestep 0. Timesteps are uniform in logSNR from T-1 down to 0, as Lu et al. recommend (at most S: nearby
  logSNRs may share a discrete timestep). On a Gaussian at 20 steps this keeps the std within 0.1%, where
  time-uniform steps ending at diffusers' (T-1)/S give a 9% too small std.

  The schedule must be concrete (a closure, not a traced argument): the timesteps are chosen on the host.
  """
  alphas_cumprod_np = np.asarray(schedule.alphas_cumprod, np.float64)
  log_snr = np.log(alphas_cumprod_np) - np.log1p(-alphas_cumprod_np)
  targets = np.linspace(log_snr[-1], log_snr[0], num_steps)
  timesteps = np.unique(np.abs(log_snr[None] - targets[:, None]).argmin(axis=1))[::-1]
  num_steps = len(timesteps)
  alphas_cumprod = schedule.alphas_cumprod[timesteps]
  alpha, sigma = jnp.sqrt(alphas_cumprod), jnp.sqrt(1 - alphas_cumprod)
  lambdas = jnp.log(alpha) - jnp.log(sigma)
  keys = image_keys(rng, x_T.shape[0])
  last = num_steps - 1

  def step(carry, i):
    x, x0_prev, h_prev = carry
    t = jnp.asarray(timesteps)[i]
    x = _inpaint(x, schedule, t, keys, i, mask, known)
    eps = eps_fn(x, _batch_t(x, t), context)
    x0 = _threshold(schedules.x0_from_eps(x, eps, alphas_cumprod[i]), clip_x0, dynamic_percentile)
    j = jnp.minimum(i + 1, last)
    h = lambdas[j] - lambdas[i]
    r = h_prev / h
    data = jnp.where(i == 0, x0, (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev)
    x_next = sigma[j] / sigma[i] * x - alpha[j] * jnp.expm1(-h) * data
    return (jnp.where(i == last, x0, x_next), x0, h), None

  (x, _, _), _ = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T), jnp.ones(())), jnp.arange(num_steps))
  return x
