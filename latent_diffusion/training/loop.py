"""The train loop both stages share: sharded state, jitted step with donation, resume, logging, checkpoints.

A stage describes itself as a `Task` (how to build its state, its pure train step, its batches, optional
evaluation) and calls `train`. The loop owns the rest, so a fix here reaches every stage.
"""

import dataclasses
import os
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import numpy as np

from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.training import checkpoint
from latent_diffusion.training import summaries


@dataclasses.dataclass
class Task:
  """What a stage supplies to the loop.

  init: rng -> train state, leaves possibly boxed with logical axis names (`nn.with_logical_partitioning`).
  train_step: (state, batch, rng) -> (state, {name: scalar}); pure, jitted and sharded by the loop.
  batches: start_step -> iterator of host-local numeric numpy batches, giving batch k first.
  evaluate: optional (state, step) -> ({name: scalar}, {name: [N, H, W, C] images in [-1, 1]}).
  """
  init: Callable[[jax.Array], Any]
  train_step: Callable[[Any, Any, jax.Array], Any]
  batches: Callable[[int], Iterator[dict]]
  evaluate: Optional[Callable[[Any, int], tuple]] = None


def train(task, *, workdir, mesh, seed, total_steps, log_every=50, checkpoint_every=1000, eval_every=0,
          keep_checkpoints=3):
  """Trains `task` until `total_steps`, resuming from the newest checkpoint in `workdir/checkpoints`.

  Per-step randomness is `fold_in(rng, step)` and the data restart at the resumed step, so a resumed run
  repeats the uninterrupted one. Returns the final state.
  """
  writer = summaries.create_writer(workdir)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  state, shardings = parallel.create_sharded(task.init, mesh, init_rng)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=keep_checkpoints)
  start_step = ckpt.latest_step() or 0
  if start_step:
    state, _ = ckpt.restore(start_step, state, shardings)
  logging.info('Training %s from step %d to %d.', workdir, start_step, total_steps)

  replicated = parallel.replicated(mesh)
  step_fn = jax.jit(task.train_step, in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
                    out_shardings=(shardings, replicated), donate_argnums=0)
  progress = summaries.create_progress(total_steps, writer)
  batches = task.batches(start_step)
  history = []
  for step in range(start_step, total_steps):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = input_pipeline.to_global(next(batches), mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(train_rng, step))
    history.append(metrics)
    done = step + 1
    progress(done)
    if done % log_every == 0 or done == total_steps:
      _write_train_metrics(writer, done, history, ckpt.latest_step())
      history = []
    if task.evaluate and eval_every and (done % eval_every == 0 or done == total_steps):
      scalars, images = task.evaluate(state, done)
      writer.write_scalars(done, {f'val/{k}': v for k, v in scalars.items()})
      summaries.write_grids(writer, done, images)
    if done % checkpoint_every == 0 or done == total_steps:
      ckpt.save(done, state, {'step': done, 'seed': seed})
  ckpt.wait()
  ckpt.close()
  writer.flush()
  return state


def _write_train_metrics(writer, step, history, last_checkpoint):
  """Averages the metrics since the last write; a non-finite value stops the run, keeping the checkpoints."""
  means = {k: float(np.mean([m[k] for m in jax.device_get(history)])) for k in history[0]}
  bad = sorted(k for k, v in means.items() if not np.isfinite(v))
  if bad:
    raise FloatingPointError(
        f'Non-finite {bad} before step {step}; stopping. The last checkpoint (step {last_checkpoint}) is kept: '
        'lower the learning rate or enable gradient clipping, then rerun the same command to resume.')
  writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
