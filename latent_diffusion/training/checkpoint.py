"""Checkpoints of a train state plus JSON metadata with orbax: asynchronous, atomic, keeping the newest N."""

from absl import logging
from etils import epath
import jax
import flax.linen as nn
import orbax.checkpoint as ocp

from latent_diffusion import parallel


def latest_saved_step(directory):
  """The newest step saved under `directory` (orbax renames a checkpoint into place only when complete), or None."""
  path = epath.Path(directory)
  steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()] if path.exists() else []
  return max(steps) if steps else None


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

  def save(self, step, state, meta):
    """Starts writing in the background; the files appear under their final name only when complete."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step, state, shardings):
    """Restores the state at `step` into the given shardings (`state` only supplies shapes and dtypes)."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   meta=ocp.args.JsonRestore()))
    logging.info('Restored checkpoint %s/%d.', self.directory, step)
    return restored['state'], restored['meta']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def restore_newest(directory, init, mesh, stage):
  """(state, step) of the newest checkpoint under `directory`, restored straight into the shardings of
  `init(rng)`'s state without running `init`; `stage` names the stage to run when there is none."""
  ckpt = Checkpointer(directory)
  step = ckpt.latest_step()
  if step is None:
    raise ValueError(f'No {stage} checkpoint in {directory}; run the `{stage}` stage first.')
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state, _ = ckpt.restore(step, nn.meta.unbox(abstract), parallel.tree_shardings(abstract, mesh))
  ckpt.close()
  return state, step
