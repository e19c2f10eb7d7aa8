"""Writing files so that readers never see a partial one: on a local disk write a temporary name, then rename; on
an object store (gs://) write the object itself, which appears only once its upload completes (a rename there
is a copy, not atomic)."""

import io

import numpy as np
import tensorflow as tf


# Filesystems whose objects appear whole when written (tests add ram:// to stand in for gs://).
OBJECT_STORES = ['gs://', 's3://']


def write_atomically(path, content):
  """Writes `content` (str or bytes) to `path`; the file appears under its name only when complete."""
  mode = 'wb' if isinstance(content, bytes) else 'w'
  if path.startswith(tuple(OBJECT_STORES)):
    with tf.io.gfile.GFile(path, mode) as f:
      f.write(content)
    return
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, mode) as f:
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
