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
