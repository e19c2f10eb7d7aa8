"""Metric writers (TensorBoard + log lines), progress reports with steps/s and ETA, and image grids."""

from clu import metric_writers
from clu import periodic_actions
import numpy as np

from latent_diffusion import parallel


def create_writer(logdir):
  """TensorBoard events under `logdir` plus log lines; other hosts only log, so each event is written once."""
  return metric_writers.create_default_writer(logdir, just_logging=not parallel.is_main_process())


def create_progress(total_steps, writer):
  """Reports steps/s, uptime and ETA to the writer every minute (and every 100 steps)."""
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=60,
                                         every_steps=100)


def image_grid(images, columns=None):
  """[N, H, W, C] images in [-1, 1] -> one uint8 [rows*H, columns*W, C] grid (empty cells are black)."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  pixels = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
  grid = np.zeros((rows * columns, h, w, c), np.uint8)
  grid[:n] = pixels
  return grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def write_grids(writer, step, grids):
  """Writes {name: [N, H, W, C] images in [-1, 1]} as one grid image each."""
  writer.write_images(step, {name: image_grid(images)[None] for name, images in grids.items()})
