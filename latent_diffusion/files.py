"""Writing files so that readers never see a partial one: write a temporary name, then rename (local or gs://)."""

import io

import numpy as np
import tensorflow as tf


def write_atomically(path, content):
  """Writes `content` (str or bytes) to `path`; the file appears under its name only when complete."""
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'wb' if isinstance(content, bytes) else 'w') as f:
    f.write(content)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_npz(path, arrays):
  """`np.savez` of {name: array}, written atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_atomically(path, buffer.getvalue())


def read_npz(path):
  """{name: array} of an `.npz` file (local or gs://)."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    with np.load(io.BytesIO(f.read())) as data:
      return {k: data[k] for k in data.files}
