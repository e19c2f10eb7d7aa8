"""The one timing rule of the benchmarks: compile ahead of time, run once to warm up, then the median wall time
of `repeats` calls, each waited for."""

import statistics
import time

import jax


def median_seconds(fn, args, repeats):
  """Median seconds of `jax.jit(fn)(*args)` after compilation and one warm-up call."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)
