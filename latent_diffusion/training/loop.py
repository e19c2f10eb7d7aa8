"""The train loop both stages share: sharded state, jitted step with donation, resume, logging, checkpoints.

A stage describes itself as a `Task` (how to build its state, its pure train step, its batches, optional
evaluation) and calls `train`. The loop owns the rest, so a fix here reaches every stage.
"""

import dataclasses
import itertools
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion import flops
from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.training import checkpoint
from latent_diffusion.training import summaries

ON_NONFINITE = ('stop', 'skip')  # train_schedule.on_nonfinite: end the run, or skip the update


@dataclasses.dataclass
class Task:
  """What a stage supplies to the loop.

  init: rng -> train state, leaves possibly boxed with logical axis names (`nn.with_logical_partitioning`).
  train_step: (state, batch, rng) -> (state, {name: scalar}); pure, jitted and sharded by the loop.
  batches: start_step -> iterator of host-local numeric numpy batches, giving batch k first.
  evaluate: optional (state, step) -> ({name: scalar}, {name: [N, H, W, C] images in [-1, 1]}).
  warm_start: optional (state, shardings) -> state, applied to a fresh state (no checkpoint yet): imported
    weights replace the random init.
  load_frozen: optional (state, shardings) -> state with its frozen params imported (checkpoints do not hold
    them), applied on every start, before a resume.
  """
  init: Callable[[jax.Array], Any]
  train_step: Callable[[Any, Any, jax.Array], Any]
  batches: Callable[[int], Iterator[dict]]
  evaluate: Optional[Callable[[Any, int], tuple]] = None
  warm_start: Optional[Callable[[Any, Any], Any]] = None
  load_frozen: Optional[Callable[[Any, Any], Any]] = None


class Preempted(Exception):
  """Training stopped on SIGTERM or a preemption notice, after saving a checkpoint at the current step."""


class _PreemptionWatch:
  """Whether to stop now: the multi-host preemption sync point (JAX's service turns SIGTERM or the TPU
  maintenance notice into one step that every host agrees on), or with one process our own SIGTERM handler."""

  def __init__(self, ckpt):
    self._ckpt, self._signalled, self._previous = ckpt, False, None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after the current step, then stopping.')
    self._signalled = True

  def __call__(self, step):
    return self._signalled or self._ckpt.reached_preemption(step)

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _skip_nonfinite(train_step):
  """A step that keeps the old state when any metric (loss, gradient norm) is not finite, and counts it."""
  def step(state, batch, rng):
    new_state, metrics = train_step(state, batch, rng)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, {**metrics, 'skipped': 1.0 - finite.astype(jnp.float32)}
  return step


def init_rng(seed):
  """The rng `train` initialises a stage's state with (a restore that needs the random init re-creates it)."""
  return jax.random.split(jax.random.PRNGKey(seed))[0]


def train(task, *, workdir, mesh, seed, total_steps, log_every=50, checkpoint_every=1000, eval_every=0,
          keep_checkpoints=3, on_nonfinite='stop'):
  """Trains `task` until `total_steps`, resuming from the newest readable checkpoint in `workdir/checkpoints`.

  Per-step randomness is `fold_in(rng, step)` and the data restart at the resumed step, so a resumed run
  repeats the uninterrupted one. On SIGTERM or a preemption notice it saves the current step and raises
  `Preempted`. A non-finite loss or gradient norm stops the run (`on_nonfinite='stop'`) or skips the update
  (`'skip'`). Returns the final state.
  """
  writer = summaries.create_writer(workdir)
  train_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
  state, shardings = parallel.create_sharded(task.init, mesh, init_rng(seed))
  if task.load_frozen:
    state = task.load_frozen(state, shardings)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=keep_checkpoints)
  state, start_step = ckpt.restore_latest_readable(state, shardings)
  if start_step is None:  # a fresh run
    start_step = 0
    if task.warm_start:
      state = task.warm_start(state, shardings)
    if total_steps == 0:  # nothing to train: keep the (imported) initial state for the later stages
      ckpt.save(0, state, {'step': 0, 'seed': seed})
  logging.info('Training %s from step %d to %d.', workdir, start_step, total_steps)

  train_step, step_fn = jit_train_step(task.train_step, shardings, mesh, on_nonfinite)
  progress = summaries.create_progress(total_steps, writer)
  batches = (input_pipeline.to_global(b, mesh) for b in task.batches(start_step))
  if start_step < total_steps:  # compiled ahead of time, once, on the first batch's shapes
    first = next(batches)
    batches = itertools.chain([first], batches)
    step_fn, throughput = _compile(step_fn, train_step, state, first, train_rng)
    throughput.restart(start_step)
  preempted = _PreemptionWatch(ckpt)
  history = []
  try:
    for step in range(start_step, total_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = step_fn(state, next(batches), jax.random.fold_in(train_rng, step))
      history.append(metrics)
      done = step + 1
      progress(done)
      logged = done % log_every == 0 or done == total_steps
      if logged:
        _write_train_metrics(writer, done, history, ckpt.latest_step())
        writer.write_scalars(done, {f'perf/{k}': v for k, v in throughput.scalars(done).items()})
        if input_pipeline.SKIPPED:  # examples the input pipeline could not use (sharded files)
          writer.write_scalars(done, {'data/skipped': sum(input_pipeline.SKIPPED.values())})
        history = []
      if preempted(done):
        ckpt.save(done, state, {'step': done, 'seed': seed})
        ckpt.wait()
        raise Preempted(f'Stopped at step {done} after saving its checkpoint in {workdir}/checkpoints; rerun '
                        'the same command to resume.')
      if task.evaluate and eval_every and (done % eval_every == 0 or done == total_steps):
        scalars, images = task.evaluate(state, done)
        writer.write_scalars(done, {f'val/{k}': v for k, v in scalars.items()})
        summaries.write_grids(writer, done, images)
      if done % checkpoint_every == 0 or done == total_steps:
        ckpt.save(done, state, {'step': done, 'seed': seed})
      if logged:
        throughput.restart(done)
  finally:
    preempted.close()
    ckpt.wait()
    ckpt.close()
    writer.flush()
  return state


def jit_train_step(train_step, shardings, mesh, on_nonfinite='stop'):
  """(the step as run, the same jitted with the state's `shardings`, the batch split over the mesh's batch axes
  and the state donated): what `train` runs and what `plan.py` compiles for other devices."""
  if on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"train_schedule.on_nonfinite='{on_nonfinite}': choose 'stop' or 'skip'.")
  train_step = _skip_nonfinite(train_step) if on_nonfinite == 'skip' else train_step
  replicated = parallel.replicated(mesh)
  return train_step, jax.jit(train_step, in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
                             out_shardings=(shardings, replicated), donate_argnums=0)


def _compile(step_fn, train_step, state, batch, rng):
  """The jitted step lowered and compiled once (compile time logged), and its throughput meter (analytic FLOPs
  of one step over the global batch)."""
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  seconds = time.perf_counter() - start
  step_flops = flops.count(train_step, state, batch, rng)
  batch_size = jax.tree.leaves(batch)[0].shape[0]
  logging.info('Compiled the train step in %.1f s: %.3g FLOPs per step of %d examples (%.3g per example).',
               seconds, step_flops, batch_size, step_flops / batch_size)
  return compiled, flops.Throughput(step_flops, batch_size)


def _write_train_metrics(writer, step, history, last_checkpoint):
  """Averages the metrics since the last write (over the applied updates when some were skipped); a
  non-finite value, or a window in which every update was skipped, stops the run, keeping the checkpoints."""
  history = jax.device_get(history)
  if 'skipped' in history[0]:
    skipped = int(sum(m['skipped'] for m in history))
    if skipped:
      logging.warning('Skipped %d of the last %d updates: non-finite loss or gradients.', skipped, len(history))
    history = [{**m, 'skipped': skipped} for m in history if not m['skipped']] or history
  means = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
  bad = sorted(k for k, v in means.items() if not np.isfinite(v))
  if bad:
    kept = 'no checkpoint was written yet' if last_checkpoint is None else (
        f'the last checkpoint (step {last_checkpoint}) is kept')
    raise FloatingPointError(
        f'Non-finite {bad} before step {step}; stopping, and {kept}: lower the learning rate or enable gradient '
        "clipping, or set the stage's train_schedule.on_nonfinite='skip', then rerun the same command.")
  writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
