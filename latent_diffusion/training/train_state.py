"""Train state: step, params, optimizer state, and optional EMA params kept next to the params."""

from typing import Any

import flax
import jax
import optax


# After a linear warm-up from `warmup_from` x the peak, the learning rate stays ('constant') or follows a cosine
# to `decay_to` x the peak at `decay_steps` (0: the stage's total_steps) and stays there ('cosine'): the
# reference's LambdaLinearScheduler and LambdaWarmUpCosineScheduler, in fractions of the peak.
LR_DECAYS = ('constant', 'cosine')


def learning_rate(peak, *, warmup_steps, decay, total_steps, warmup_from=0.0, decay_steps=0, decay_to=0.0):
  """The optax schedule of a stage's optimizer config."""
  warmup = max(warmup_steps, 1)
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(warmup_from * peak, peak, warmup,
                                              max(decay_steps or total_steps, warmup + 1), decay_to * peak)
  return optax.linear_schedule(warmup_from * peak, peak, warmup) if warmup_steps else peak


def ema_decay(num_updates, max_decay):
  """The reference EMA decay with warm-up: min(decay, (1 + n) / (10 + n)) for the n-th update (n >= 1)."""
  return jax.numpy.minimum(max_decay, (1.0 + num_updates) / (10.0 + num_updates))


class TrainState(flax.struct.PyTreeNode):
  """Pure train state; `ema_params` is None when EMA is off. Sampling and evaluation read EMA params.
  `frozen`: params used but never trained (e.g. an imported CLIP text encoder), {name: tree} beside `params`."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_max_decay: float = flax.struct.field(pytree_node=False, default=0.0)
  frozen: Any = None
  ema_keys: tuple = flax.struct.field(pytree_node=False, default=())

  @classmethod
  def create(cls, params, tx, ema_max_decay=0.0, frozen=None, ema_keys=()):
    """`ema_max_decay` > 0 keeps an EMA of the params with the reference warm-up; of the entries `ema_keys` of a
    dict of params only, when given (the reference's EMA of the UNet beside a live text encoder)."""
    ema = {k: params[k] for k in ema_keys} if ema_keys else params
    return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
               ema_params=ema if ema_max_decay > 0 else None, tx=tx, ema_max_decay=ema_max_decay,
               frozen=frozen or None, ema_keys=tuple(ema_keys))

  def _tracked(self, params):
    return {k: params[k] for k in self.ema_keys} if self.ema_keys else params

  def apply_gradients(self, grads):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = self.ema_params
    if ema_params is not None:
      decay = ema_decay(self.step + 1, self.ema_max_decay)
      ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, self._tracked(params))
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)

  def with_frozen(self, params):
    """`params` (a dict of trees) together with the frozen ones, as the model reads them."""
    return {**params, **self.frozen} if self.frozen else params

  @property
  def eval_params(self):
    if self.ema_params is None:
      return self.with_frozen(self.params)
    return self.with_frozen({**self.params, **self.ema_params} if self.ema_keys else self.ema_params)
