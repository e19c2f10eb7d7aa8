"""Checkpoints of a train state plus JSON metadata with orbax: asynchronous, atomic, keeping the newest N.

A state's `frozen` params (an imported base: the UNet under LoRA or a ControlNet, a CLIP text encoder) are not
written: they come from where they were imported on every start, and the metadata keeps their checksum so a
resume on another base is refused."""

from absl import logging
from etils import epath
import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from latent_diffusion import parallel


def saved_steps(directory):
  """The steps saved under `directory`, ascending (orbax renames a checkpoint into place only when complete)."""
  path = epath.Path(directory)
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def latest_saved_step(directory):
  """The newest step saved under `directory`, or None."""
  steps = saved_steps(directory)
  return steps[-1] if steps else None


class Checkpointer:
  """Saves and restores `(state, meta)` under `directory/<step>/`; orbax writes to a temporary name first."""

  def __init__(self, directory, *, keep=3):
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True),
        item_names=('state', 'meta'))

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def reached_preemption(self, step):
    """Whether every host has reached the preemption sync point (always False without jax.distributed)."""
    return self._manager.reached_preemption(step)

  def save(self, step, state, meta):
    """Starts writing in the background; the files appear under their final name only when complete."""
    if _frozen(state):
      meta = {**meta, 'frozen_checksum': checksum(state.frozen)}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_trained(state)),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step, state, shardings):
    """Restores the state at `step` into the given shardings (`state` only supplies shapes and dtypes, and
    its frozen params, which checkpoints do not hold)."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _trained(state),
                          _trained(shardings))
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   meta=ocp.args.JsonRestore()))
    logging.info('Restored checkpoint %s/%d.', self.directory, step)
    restored_state = restored['state'].replace(frozen=state.frozen) if _frozen(state) else restored['state']
    return restored_state, restored['meta']

  def restore_latest_readable(self, state, shardings):
    """(state, step) of the newest checkpoint that reads back, or (state, None) when there is none. A checkpoint
    that fails to read (truncated or corrupt files) is reported and moved aside to `<step>.corrupt`, never
    deleted, and the one before it is used."""
    for step in reversed(self.all_steps()):
      try:
        restored, meta = self.restore(step, state, shardings)
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        if _is_structure_mismatch(e):  # intact files of another config: refuse, and leave them in place
          difference = ' '.join(line.strip() for line in str(e).splitlines()[1:4])
          raise ValueError(
              f'Checkpoint {self.directory}/{step} holds a train state of another structure than this config '
              f'builds ({difference}): a field that shapes the state changed (an optimizer\'s '
              'decay, EMA on or off, the discriminator switched on by total_steps > disc_start). Use the config '
              'the run was made with (WORKDIR/config.json) or a new workdir.') from e
        aside = epath.Path(self.directory) / f'{step}.corrupt'
        logging.warning('Checkpoint %s/%d cannot be read (%s: %s); moving it to %s and using the previous one.',
                        self.directory, step, type(e).__name__, str(e)[:300], aside)
        parallel.sync(f'checkpoint.corrupt.{step}')
        if parallel.is_main_process():
          (epath.Path(self.directory) / str(step)).rename(aside)
        parallel.sync(f'checkpoint.aside.{step}')
        self._manager.reload()
        continue
      _check_base(meta, state, f'{self.directory}/{step}')
      return restored, step
    return state, None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def _frozen(state):
  return getattr(state, 'frozen', None) is not None


def _trained(state):
  """What a checkpoint holds: the state without its frozen params."""
  return state.replace(frozen=None) if _frozen(state) else state


def checksum(tree):
  """A number that tells two sets of frozen params apart: the sum over leaves of their mean and mean square."""
  leaves = [jax.device_get(jnp.stack([jnp.mean(x), jnp.mean(jnp.square(x))])) for x in jax.tree.leaves(tree)]
  return float(np.sum(leaves, dtype=np.float64))


def _check_base(meta, state, where):
  """Refuses a resume whose frozen base differs from the one the checkpoint was trained on."""
  saved = meta.get('frozen_checksum')
  if saved is None or not _frozen(state):
    return
  current = checksum(state.frozen)
  if not np.isclose(saved, current, rtol=1e-6, atol=0):
    raise ValueError(f'Checkpoint {where} was trained on another frozen base (checksum {saved:.8g}, this run\'s '
                     f'{current:.8g}): ldm.init_from or the conditioning encoder changed. Use the base the run '
                     'was made with, or a new workdir.')


def _is_structure_mismatch(error):
  """Whether orbax refused a restore because the checkpoint's tree differs from the target's, not for bad files."""
  return isinstance(error, ValueError) and 'tree structures do not match' in str(error)


def restore_newest(directory, init, mesh, stage, step=None, frozen=None):
  """(state, step) of the newest checkpoint under `directory` (or the one at `step`), restored straight into the
  shardings of `init(rng)`'s state without running `init`; `stage` names the stage to run when there is none.
  A state with frozen params gets them from `frozen(abstract state, shardings)` (a state with them filled in)."""
  ckpt = Checkpointer(directory)
  if ckpt.latest_step() is None:
    raise ValueError(f'No {stage} checkpoint in {directory}; run the `{stage}` stage first.')
  if step is not None and step not in ckpt.all_steps():
    raise ValueError(f'No {stage} checkpoint at step {step} in {directory}; it holds {ckpt.all_steps()}.')
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  target, shardings = nn.meta.unbox(abstract), parallel.tree_shardings(abstract, mesh)
  if _frozen(target):
    if frozen is None:
      raise ValueError(f'The {stage} state has frozen params, which its checkpoints do not hold; restore_newest '
                       'needs `frozen` to supply them.')
    target = frozen(target, shardings)
  if step is None:
    state, step = ckpt.restore_latest_readable(target, shardings)
    if step is None:
      raise ValueError(f'No readable {stage} checkpoint in {directory}; run the `{stage}` stage again.')
  else:
    state, _ = ckpt.restore(step, target, shardings)
  ckpt.close()
  return state, step
