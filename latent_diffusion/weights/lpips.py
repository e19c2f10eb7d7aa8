r"""Converts LPIPS-VGG weights to our params: torchvision's VGG16 `.pth` + the `lpips` package's lin layers.

Run once where torch is installed (pip install torch lpips), then train without torch:
  python -m latent_diffusion.weights.lpips --vgg16=vgg16-397923af.pth --out=lpips_vgg.msgpack
vgg16-397923af.pth is torchvision's ImageNet VGG16 (https://download.pytorch.org/models/vgg16-397923af.pth);
the lin layers are read from the installed `lpips` wheel (lpips/weights/v0.1/vgg.pth) unless --lin is given.
"""

from absl import app
from absl import flags
from etils import epath
import flax
import numpy as np

from latent_diffusion.losses import lpips

DOWNLOAD_HINT = (
    'Make it once with `python -m latent_diffusion.weights.lpips --vgg16=vgg16-397923af.pth --out=FILE` '
    '(pip install torch lpips; vgg16-397923af.pth from https://download.pytorch.org/models/vgg16-397923af.pth), '
    'or set autoencoder.loss.perceptual_weight=0 to train without LPIPS.')


def convert(vgg_state_dict, lin_state_dict):
  """torch state dicts (name -> array-like) -> our LPIPS params (HWIO conv kernels)."""
  def kernel(w):
    return np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))  # OIHW -> HWIO

  vgg = {}
  for index in lpips.vgg16_conv_indices():
    vgg[f'features_{index}'] = {'kernel': kernel(vgg_state_dict[f'features.{index}.weight']),
                                'bias': np.asarray(vgg_state_dict[f'features.{index}.bias'], np.float32)}
  params = {'vgg': vgg}
  for i in range(5):
    params[f'lin_{i}'] = {'kernel': kernel(lin_state_dict[f'lin{i}.model.1.weight'])}
  return params


def _torch_load(path):
  import torch  # pylint: disable=g-import-not-at-top  (only the one-time conversion needs torch)
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.numpy() for k, v in state.items()}


def default_lin_path():
  import lpips as lpips_package  # pylint: disable=g-import-not-at-top
  return str(epath.Path(lpips_package.__file__).parent / 'weights' / 'v0.1' / 'vgg.pth')


def save(params, path):
  epath.Path(path).write_bytes(flax.serialization.msgpack_serialize(params))


def load(path):
  """Our LPIPS params from a converted file, or a clear error naming the file and how to make it."""
  path = epath.Path(path) if path else None
  if path is None or not path.exists():
    raise FileNotFoundError(f'LPIPS weights file {str(path)!r} not found (autoencoder.loss.lpips_weights). '
                            + DOWNLOAD_HINT)
  params = flax.serialization.msgpack_restore(path.read_bytes())
  expected = {'vgg', 'lin_0', 'lin_1', 'lin_2', 'lin_3', 'lin_4'}
  if set(params) != expected:
    raise ValueError(f'{path} is not an LPIPS weights file (keys {sorted(params)}). ' + DOWNLOAD_HINT)
  return params


FLAGS = flags.FLAGS


def main(argv):
  del argv
  save(convert(_torch_load(FLAGS.vgg16), _torch_load(FLAGS.lin or default_lin_path())), FLAGS.out)
  print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  flags.DEFINE_string('vgg16', None, "torchvision VGG16 state dict (vgg16-397923af.pth).")
  flags.DEFINE_string('lin', None, "lpips lin-layer weights (default: the installed lpips package's vgg.pth).")
  flags.DEFINE_string('out', None, 'Output msgpack file.')
  flags.mark_flags_as_required(['vgg16', 'out'])
  app.run(main)
