"""Train-loop machinery: EMA warm-up, resume that repeats the uninterrupted run, summaries, NaN guard."""

import dataclasses
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from latent_diffusion import parallel
from latent_diffusion.training import checkpoint
from latent_diffusion.training import loop
from latent_diffusion.training import summaries
from latent_diffusion.training import train_state

W_TRUE = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def test_ema_decay_is_the_reference_warmup():
  np.testing.assert_allclose(train_state.ema_decay(1, 0.9999), 2 / 11)
  np.testing.assert_allclose(train_state.ema_decay(100, 0.9999), 101 / 110)
  np.testing.assert_allclose(train_state.ema_decay(10**6, 0.9999), 0.9999)


def test_learning_rate_warms_up_then_stays_or_anneals_to_zero():
  constant = train_state.learning_rate(2e-4, warmup_steps=10, decay='constant', total_steps=100)
  np.testing.assert_allclose([constant(s) for s in (0, 5, 10, 99)], [0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
  assert train_state.learning_rate(2e-4, warmup_steps=0, decay='constant', total_steps=100) == 2e-4
  cosine = train_state.learning_rate(2e-4, warmup_steps=10, decay='cosine', total_steps=110)
  # After the warm-up, half-way through the remaining 100 steps the cosine is at half the peak, and 0 at the end.
  np.testing.assert_allclose([cosine(s) for s in (5, 10, 60, 110)], [1e-4, 2e-4, 1e-4, 0], rtol=1e-5, atol=1e-12)


def test_apply_gradients_updates_params_and_ema():
  params = {'w': jnp.ones(3)}
  state = train_state.TrainState.create(params, optax.sgd(0.5), ema_max_decay=0.9)
  state = state.apply_gradients({'w': jnp.array([1.0, 2.0, 4.0])})
  np.testing.assert_allclose(state.params['w'], [0.5, 0.0, -1.0])
  decay = 2 / 11
  np.testing.assert_allclose(state.ema_params['w'], decay * 1 + (1 - decay) * np.array([0.5, 0.0, -1.0]), rtol=1e-6)
  assert int(state.step) == 1
  no_ema = train_state.TrainState.create(params, optax.sgd(0.5))
  assert no_ema.ema_params is None and no_ema.eval_params is params


def regression_task(lr=0.1, noise_rng=None):
  """Linear regression y = x W_TRUE, with dropout-like noise from the per-step rng to test its replay."""
  model = nn.Dense(3, use_bias=False, kernel_init=nn.with_logical_partitioning(
      nn.initializers.zeros, ('embed', 'mlp')))
  tx = optax.adam(lr)  # One object: the state's tree structure includes it.

  def init(rng):
    params = model.init(rng, jnp.ones((1, 4)))['params']
    return train_state.TrainState.create(params, tx, ema_max_decay=0.99)

  def train_step(state, batch, rng):
    def loss_fn(params):
      noise = 0.01 * jax.random.normal(rng, batch['y'].shape)
      pred = model.apply({'params': params}, batch['x'])
      return jnp.mean((pred - batch['y'] - noise) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {'loss': loss}

  def batches(start_step):
    step = start_step
    while True:
      x = np.random.default_rng(step).normal(size=(16, 4)).astype(np.float32)
      yield {'x': x, 'y': x @ W_TRUE}
      step += 1

  def evaluate(state, step):
    del step
    return {'error': float(jnp.abs(state.eval_params['kernel'] - W_TRUE).max())}, {
        'grid': np.zeros((2, 4, 4, 3))}

  return loop.Task(init=init, train_step=train_step, batches=batches, evaluate=evaluate)


def run(workdir, total_steps, mesh, task=None):
  return loop.train(task or regression_task(), workdir=str(workdir), mesh=mesh, seed=0, total_steps=total_steps,
                    log_every=5, checkpoint_every=10, eval_every=10)


def read_summaries(logdir):
  """{tag: sorted [(step, value)]} from TensorBoard event files; images give their array."""
  values = {}
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        array = tf.make_ndarray(v.tensor)
        values.setdefault(v.tag, []).append((event.step, float(array) if array.ndim == 0 else array))
  return {k: sorted(v, key=lambda sv: sv[0]) for k, v in values.items()}


def test_training_resumes_exactly_and_writes_summaries(tmp_path):
  mesh = parallel.create_mesh(dict(data=-1, fsdp=2, tensor=1))
  full = run(tmp_path / 'full', 30, mesh)
  run(tmp_path / 'resumed', 20, mesh)  # "killed" after the checkpoint at step 20
  assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints')) == ['10', '20']
  resumed = run(tmp_path / 'resumed', 30, mesh)
  assert int(resumed.step) == 30
  np.testing.assert_array_equal(np.asarray(full.params['kernel']), np.asarray(resumed.params['kernel']))
  np.testing.assert_array_equal(np.asarray(full.ema_params['kernel']), np.asarray(resumed.ema_params['kernel']))

  scalars = read_summaries(str(tmp_path / 'full'))
  losses = [v for _, v in scalars['train/loss']]
  assert [s for s, _ in scalars['train/loss']] == [5, 10, 15, 20, 25, 30]
  assert losses[-1] < 0.1 * losses[0]
  assert [s for s, _ in scalars['val/error']] == [10, 20, 30]
  resumed_losses = read_summaries(str(tmp_path / 'resumed'))['train/loss']
  assert [s for s, _ in resumed_losses] == [5, 10, 15, 20, 25, 30]  # steps 1-20 were not run again
  assert [v for s, v in resumed_losses if s > 20] == pytest.approx(losses[4:], rel=1e-6)
  assert [s for s, _ in scalars['grid']] == [10, 20, 30]
  assert 'steps_per_sec' in scalars
  # Throughput per logging window: 16 examples per step; the analytic FLOPs of the step (x W and the weight
  # gradient x^T dy: 2 matmuls of 2 x 16 x 4 x 3) times the rate, per device. No MFU: a CPU's peak is unknown.
  images = [v for _, v in scalars['perf/images_per_sec']]
  tflops = [v for _, v in scalars['perf/tflops_per_sec_per_device']]
  assert len(images) == 6 and min(images) > 0 and 'perf/mfu' not in scalars
  np.testing.assert_allclose(np.array(tflops) * 1e12, np.array(images) / 16 * 2 * 2 * 16 * 4 * 3 / 8, rtol=1e-6)


def test_a_checkpoint_of_another_state_structure_is_refused_and_left_in_place(tmp_path):
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  run(tmp_path, 10, mesh)
  # A learning-rate schedule adds a step count to the optimizer state: intact files of another config, not corrupt.
  with pytest.raises(ValueError, match=r'checkpoints/10 holds a train state of another structure .*opt_state'):
    run(tmp_path, 20, mesh, task=regression_task(lr=optax.constant_schedule(0.1)))
  assert os.listdir(tmp_path / 'checkpoints') == ['10']
  assert int(run(tmp_path, 20, mesh).step) == 20  # the original config resumes from it


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  message = r"Non-finite \['loss'\] before step 5; stopping, and no checkpoint was written yet"
  with pytest.raises(FloatingPointError, match=message):
    run(tmp_path, 30, mesh, task=regression_task(lr=1e30))


def test_non_finite_updates_are_skipped_when_configured(tmp_path):
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  task = regression_task()
  clean = task.batches

  def poisoned(start_step):  # steps 2 and 7 (0-based) see a NaN batch
    for step, batch in enumerate(clean(start_step), start_step):
      yield {**batch, 'x': batch['x'] * np.nan} if step in (2, 7) else batch

  task = dataclasses.replace(task, batches=poisoned)
  state = loop.train(task, workdir=str(tmp_path), mesh=mesh, seed=0, total_steps=30, log_every=5,
                     checkpoint_every=10, on_nonfinite='skip')
  assert np.all(np.isfinite(state.params['kernel']))
  scalars = read_summaries(tmp_path)
  assert dict(scalars['train/skipped']) == {5: 1.0, 10: 1.0, 15: 0.0, 20: 0.0, 25: 0.0, 30: 0.0}
  losses = [v for _, v in scalars['train/loss']]
  assert all(np.isfinite(losses)) and losses[-1] < 0.1 * losses[0]  # training went on past the bad batches
  with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
    loop.train(task, workdir=str(tmp_path), mesh=mesh, seed=0, total_steps=30, on_nonfinite='ignore')


def test_image_grid_places_images_row_major():
  images = np.stack([np.full((2, 3, 3), v) for v in (-1.0, 0.0, 1.0)])
  grid = summaries.image_grid(images, columns=2)
  assert grid.shape == (4, 6, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[:2, :3], 0)
  np.testing.assert_array_equal(grid[:2, 3:], 128)
  np.testing.assert_array_equal(grid[2:, :3], 255)
  np.testing.assert_array_equal(grid[2:, 3:], 0)  # empty cell


def test_checkpoints_leave_out_the_frozen_params_and_refuse_another_base(tmp_path):
  """A state's frozen params (an imported base) are not written; the restored state takes the caller's, and a
  resume on a base of another checksum is refused."""
  frozen = {'unet': {'kernel': jnp.arange(6.0).reshape(2, 3)}}
  state = train_state.TrainState.create({'lora': {'down': jnp.ones((3, 2))}}, optax.adam(1e-3), 0.9, frozen=frozen)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, state, {'step': 1})
  ckpt.wait()
  saved = ocp.StandardCheckpointer().restore(tmp_path / '1' / 'state')
  assert saved.get('frozen') is None  # only the trained params, their Adam moments, EMA and step
  assert sum(np.size(x) for x in jax.tree.leaves(saved)) == 4 * 6 + 2  # params, mu, nu, EMA; two counts
  shardings = jax.tree.map(lambda x: x.sharding, state)
  restored, step = ckpt.restore_latest_readable(state, shardings)
  assert step == 1 and restored.frozen is state.frozen
  other = state.replace(frozen={'unet': {'kernel': jnp.arange(6.0).reshape(2, 3) + 1}})
  with pytest.raises(ValueError, match=r'trained on another frozen base .*ldm.init_from'):
    ckpt.restore_latest_readable(other, shardings)
  assert (tmp_path / '1').is_dir()  # refused, not moved aside as corrupt
  ckpt.close()
