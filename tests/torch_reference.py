"""Imports of the PyTorch reference packages used by parity tests (test-only requirements).

torchvision's wheel cannot register its C++ ops beside torch's CPU build ('operator torchvision::nms does not
exist'); the references only need torchvision's pure-Python parts, so the op registrations are skipped.
"""

import sys
import types


def _skip_torchvision_ops():
  sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))


def import_lpips():
  _skip_torchvision_ops()
  import lpips  # pylint: disable=g-import-not-at-top
  return lpips


def import_diffusers():
  _skip_torchvision_ops()
  import diffusers  # pylint: disable=g-import-not-at-top
  return diffusers


def import_pytorch_fid_score():
  """pytorch-fid's `fid_score` module (the reference FID computation)."""
  _skip_torchvision_ops()
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  return fid_score


def random_pytorch_fid_inception(monkeypatch, seed=0):
  """pytorch-fid's `InceptionV3` built over random weights instead of its download: (model, state_dict).

  The random network is torchvision's Inception3 with pytorch-fid's FID blocks (as `fid_inception_v3` builds
  it); its BatchNorm statistics are set from one batch of noise so that activations stay O(1) to pool3.
  """
  _skip_torchvision_ops()
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
  net.Mixed_5b, net.Mixed_5c = inception.FIDInceptionA(192, 32), inception.FIDInceptionA(256, 64)
  net.Mixed_5d = inception.FIDInceptionA(288, 64)
  for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
    setattr(net, name, inception.FIDInceptionC(768, channels))
  net.Mixed_7b, net.Mixed_7c = inception.FIDInceptionE_1(1280), inception.FIDInceptionE_2(2048)
  for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = None  # the running statistics become those of the one calibration batch
      torch.nn.init.uniform_(module.weight, 0.5, 1.5)
      torch.nn.init.uniform_(module.bias, -0.2, 0.2)
  net.train()
  with torch.no_grad():
    net(torch.rand(6, 3, 299, 299) * 2 - 1)
  state_dict = {k: v for k, v in net.state_dict().items() if 'num_batches_tracked' not in k}
  monkeypatch.setattr(inception, 'load_state_dict_from_url', lambda *args, **kwargs: state_dict)
  return inception.InceptionV3().eval(), {k: v.numpy() for k, v in state_dict.items()}


def import_torch():
  """torch, with torchvision importable by transformers and diffusers."""
  _skip_torchvision_ops()
  import torch  # pylint: disable=g-import-not-at-top
  return torch
