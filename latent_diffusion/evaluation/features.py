"""Inception features of many images, batched and sharded over the mesh and all hosts.

Every source yields host-local batches (uint8 images and a mask of real rows); all hosts run the same number of
batches and get every image's features back, in order.
"""

import math

import jax
import numpy as np
import tensorflow as tf

from latent_diffusion import files
from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.evaluation import fid
from latent_diffusion.evaluation import inception
from latent_diffusion.weights import inception as inception_weights

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class Extractor:
  """uint8 image batches -> {'pool3': [N, 2048], 'logits': [N, 1008] when the weights carry them}."""

  def __init__(self, variables, mesh, mode='pytorch_fid'):
    self.mesh = mesh
    self.variables = jax.device_put(variables, parallel.replicated(mesh))
    self._apply = make_apply(inception.FIDInceptionV3(inception_weights.num_classes(variables)), mesh, mode)

  def __call__(self, local_batches):
    outputs = []
    for images, mask in local_batches:
      batch = input_pipeline.to_global({'images': np.asarray(images, np.uint8), 'mask': np.asarray(mask)},
                                       self.mesh)
      out, mask = parallel.to_host((self._apply(self.variables, batch['images']), batch['mask']))
      outputs.append({k: v[mask] for k, v in out.items()})
    if not outputs:
      raise ValueError('No images to compute Inception features of.')
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def make_apply(model, mesh, mode):
  """The jitted (variables, uint8 images) -> features, batch-sharded over the mesh."""
  return jax.jit(lambda v, x: model.apply(v, inception.preprocess(x, mode)),
                 out_shardings=parallel.batch_sharding(mesh))


def array_batches(images, global_batch_size, load=None):
  """This host's batches of rows of `images` (an array, or a list of paths with `load(path) -> uint8 image`)."""
  count, hosts, host = len(images), jax.process_count(), jax.process_index()
  local = global_batch_size // hosts
  for start in range(0, math.ceil(count / global_batch_size) * global_batch_size, global_batch_size):
    index = np.arange(start + host * local, start + (host + 1) * local)
    mask = index < count
    index = np.where(mask, index, index[0] if mask[0] else 0)  # padding repeats a real row
    rows = [images[i] if load is None else load(images[i]) for i in index]
    yield np.stack(rows), mask


def image_files(folder):
  """The sorted image files of a folder (as pytorch-fid lists them)."""
  if not tf.io.gfile.isdir(folder):
    raise FileNotFoundError(f'Image folder {folder!r} not found.')
  paths = sorted(tf.io.gfile.join(folder, name) for name in tf.io.gfile.listdir(folder)
                 if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {folder!r}.')
  return paths


def load_image(path):
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()


def dataset_batches(data_config, split, global_batch_size, num_images):
  """This host's batches of the first `num_images` of a split, preprocessed as training sees them, as uint8."""
  for batch in input_pipeline.eval_iterator(data_config, global_batch_size, split=split, num_examples=num_images):
    images = np.clip(np.round((batch['image'] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    yield images, batch['mask']


def statistics_of_path(path, extractor, global_batch_size):
  """{'mu', 'sigma'[, 'features']} of a pytorch-fid statistics `.npz`, an `.npz` of uint8 `images` (the `sample`
  stage's samples.npz) or a folder of images."""
  if path.endswith('.npz'):
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'{path!r} not found.')
    arrays = files.read_npz(path)
    if 'mu' in arrays and 'sigma' in arrays:
      return arrays
    if 'images' not in arrays:
      raise ValueError(f'{path} holds {sorted(arrays)}: neither FID statistics (mu, sigma) nor uint8 `images`.')
    batches = array_batches(arrays['images'], global_batch_size)
  else:
    batches = array_batches(image_files(path), global_batch_size, load=load_image)
  pool3 = extractor(batches)['pool3']
  mu, sigma = fid.statistics(pool3)
  return {'mu': mu, 'sigma': sigma, 'features': pool3}
