"""Train state: step, params, optimizer state, and optional EMA params kept next to the params."""

from typing import Any

import flax
import jax
import optax


# After a linear warm-up the learning rate stays ('constant', the reference's) or follows a cosine to 0 at the
# stage's total_steps ('cosine', an addition: short runs end better annealed).
LR_DECAYS = ('constant', 'cosine')


def learning_rate(peak, *, warmup_steps, decay, total_steps):
  """The optax schedule of a stage's optimizer config."""
  warmup = max(warmup_steps, 1)
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
  return optax.linear_schedule(0.0, peak, warmup) if warmup_steps else peak


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

  @classmethod
  def create(cls, params, tx, ema_max_decay=0.0, frozen=None):
    """`ema_max_decay` > 0 keeps an EMA of the params with the reference warm-up."""
    return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
               ema_params=params if ema_max_decay > 0 else None, tx=tx, ema_max_decay=ema_max_decay,
               frozen=frozen or None)

  def apply_gradients(self, grads):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = self.ema_params
    if ema_params is not None:
      decay = ema_decay(self.step + 1, self.ema_max_decay)
      ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)

  def with_frozen(self, params):
    """`params` (a dict of trees) together with the frozen ones, as the model reads them."""
    return {**params, **self.frozen} if self.frozen else params

  @property
  def eval_params(self):
    return self.with_frozen(self.params if self.ema_params is None else self.ema_params)
