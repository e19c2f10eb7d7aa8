"""Test set-up: 8 simulated CPU devices (set before jax is imported) and one prepared copy of the built-in data."""

import fcntl
import os
import pathlib
import shutil

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # TPU compiles in parallel workers (compile-only)
# One persistent compilation cache for the whole run, workers and the subprocesses they start (which inherit the
# environment): the end-to-end tests compile the same stage programs in process after process. A size limit turns
# on JAX's file lock, so parallel writers do not interleave; the directory starts empty each run.
COMPILATION_CACHE = pathlib.Path(os.environ.get('LDM_TEST_COMPILATION_CACHE', '/tmp/ldm_test_compilation_cache'))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(COMPILATION_CACHE))
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 * 2**30))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA_DIR = pathlib.Path(os.environ.get('LDM_TEST_DATA_DIR', REPO / '.test_data'))


@pytest.fixture(scope='session')
def tfds_dir():
  """A TFDS data_dir holding captioned_shapes/32 and /64, generated once (under a lock for parallel workers)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from latent_diffusion.data import captioned_shapes  # pylint: disable=unused-import
  tf.config.set_visible_devices([], 'GPU')
  TEST_DATA_DIR.mkdir(parents=True, exist_ok=True)
  with open(TEST_DATA_DIR / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for name in ('captioned_shapes/32', 'captioned_shapes/64'):
      tfds.builder(name, data_dir=str(TEST_DATA_DIR)).download_and_prepare()
  return str(TEST_DATA_DIR)


@pytest.fixture(scope='session')
def shared_dir(tmp_path_factory):
  """`shared_dir(name, build)`: a directory that `build(path)` fills once per test run, shared by every parallel
  worker (built under a lock by the first worker that asks; the others wait, then read it)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base  # the run's directory above the workers'

  def get(name, build):
    path = root / f'shared_{name}'
    with open(root / f'shared_{name}.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not (path / '.built').exists():
        shutil.rmtree(path, ignore_errors=True)  # a build that failed half-way
        path.mkdir()
        build(path)
        (path / '.built').touch()
    return path

  return get


def pytest_configure(config):
  """The run's controller (not an xdist worker) empties the compilation cache, so each run is timed cold."""
  if not hasattr(config, 'workerinput') and os.environ['JAX_COMPILATION_CACHE_DIR'] == str(COMPILATION_CACHE):
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)
