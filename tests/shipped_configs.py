"""The shipped configs of `configs/`, loaded from their files as `config_flags` does."""

import importlib.util
import pathlib

DIRECTORY = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# Every reference-model config: the file and its argument (the smoke variants are `:smoke` of each).
NAMES = ('txt2img', 'class_cond', 'class_cond:f8', 'uncond', 'lsun_churches', 'super_res', 'inpainting',
         'layout2img', 'semantic')
VARIANTS = ('inpainting:text', 'controlnet', 'lora')  # ours, beside the reference models


def load(spec, extra=''):
  """`configs/NAME.py:ARG` as a ConfigDict; `extra` adds words to the argument (`smoke`)."""
  name, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(name, DIRECTORY / f'{name}.py')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(','.join(filter(None, (arg, extra))) or None)
