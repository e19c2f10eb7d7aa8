"""ControlNet: the ldm step trains a copy of the frozen UNet's encoder that starts as a no-op, a diffusers
ControlNetModel imports exactly (its residuals into a diffusers UNet against ours), control images from class-id
maps or a folder, the config checks, and a run through the entry point on our own trained base."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import controlnet as controlnet_config
from latent_diffusion import config_lib
from latent_diffusion import validate
from latent_diffusion.data import input_pipeline
from latent_diffusion.diffusion import schedules
from latent_diffusion.models import controlnet as controlnet_lib
from latent_diffusion.training import evaluate
from latent_diffusion.training import ldm
from latent_diffusion.weights import controlnet as weights_controlnet
from latent_diffusion.weights import unet as weights_unet
import test_scale_out as scale_out
from test_scale_out import stage_1  # pylint: disable=unused-import  (the fixture)
import test_weights
import torch_reference

METADATA = {'shape': [8, 8, 6], 'kind': 'kl', 'scale_factor': 1.0}


def small_config(**fields):
  config = controlnet_config.get_config('smoke')
  config.ldm.unet.update(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,))
  config.ldm.conditioning.update(width=32, depth=1)
  config.ldm.optimizer.update(warmup_steps=0, learning_rate=1e-3)
  config.ldm.controlnet.update(fields)
  return config


def squares(n, size=32):
  """Class-id maps [n, size, size] (as stored): a square of class 1 + i % 3 at a place of its own in each."""
  maps = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    y, x = 2 + 3 * (i % 6), 4 + 2 * (i % 7)
    maps[i, y:y + 10, x:x + 10] = 1 + i % 3
  return maps


def test_control_images_colour_the_classes_or_draw_their_outlines():
  maps = squares(2)
  coloured = np.asarray(controlnet_lib.control_image({'segmentation': maps}, 'segmentation'))
  assert coloured.shape == (2, 32, 32, 3) and not coloured[0, 0, 0].any()  # background black
  np.testing.assert_array_equal(coloured[0, 2, 4] * 255, [128, 0, 0])  # class 1: VOC's first colour
  assert len({tuple(c) for c in controlnet_lib.palette(151)}) == 151  # every class its own colour
  edges = np.asarray(controlnet_lib.control_image({'segmentation': maps}, 'edges'))
  # A 10x10 square: the pixels whose right or lower neighbour has another class, 10 on each of its 4 sides, the
  # square's own lower right corner counted once.
  assert edges[0, ..., 0].sum() == 4 * 10 - 1 and edges.max() == 1.0
  with pytest.raises(ValueError, match="ldm.controlnet.kind='depth'"):
    controlnet_lib.control_image({'segmentation': maps}, 'depth')


def test_a_folder_of_control_images_pairs_each_with_its_image_by_name(tmp_path):
  """data.control_folder: each image's control image, cropped and resized as the image is, stored as uint8."""
  rng = np.random.default_rng(0)
  (tmp_path / 'images' / 'sub').mkdir(parents=True)
  (tmp_path / 'controls' / 'sub').mkdir(parents=True)
  names = ['a.png', 'b.png', 'sub/c.png']
  for name in names:
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / 'images' / name)
    control = np.zeros((40, 56, 3), np.uint8)
    control[:, 8 + rng.integers(0, 30):][:, :10] = 255  # a white bar somewhere in the centre crop
    Image.fromarray(control).save(tmp_path / 'controls' / name)
  config = config_lib.data('', 20, folder=str(tmp_path / 'images'), control_folder=str(tmp_path / 'controls'))
  batch = next(input_pipeline.eval_iterator(config, 3))
  for i, name in enumerate(names):  # the 40x40 centre crop, area-resized to 20x20
    expected = np.asarray(Image.open(tmp_path / 'controls' / name))[:, 8:48].reshape(20, 2, 20, 2, 3).mean((1, 3))
    np.testing.assert_allclose(batch['control'][i], expected, atol=0.51)
  assert batch['control'].dtype == np.uint8
  np.testing.assert_allclose(controlnet_lib.control_image(batch, 'image'), batch['control'] / 255.0, atol=1e-7)
  (tmp_path / 'controls' / 'sub' / 'c.png').unlink()
  with pytest.raises(ValueError, match=r"lacks the control images of 1 images of data.folder, e.g. .*sub/c.png"):
    next(input_pipeline.eval_iterator(config, 3))


def test_the_ldm_step_trains_a_controlnet_that_starts_as_a_copy_of_the_encoder_and_a_no_op():
  config = small_config()
  unet, conditioner, init = ldm.create(config, METADATA)
  state = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, jax.jit(init)(jax.random.PRNGKey(0)),
                       is_leaf=lambda x: hasattr(x, 'unbox'))
  assert set(state.params) == {'controlnet'} and set(state.frozen) == {'unet', 'cond'}
  control_params, unet_params = state.params['controlnet'], state.frozen['unet']
  shared = sorted(set(control_params) & set(unet_params))
  assert 'conv_in' in shared and 'middle_1' in shared and not any(k.startswith('up_') for k in control_params)
  for k in shared:
    jax.tree.map(np.testing.assert_array_equal, control_params[k], unet_params[k])
  # Smoke kl-f4: the control embedding downsamples 4x (three widths). The skips (conv_in, down_0_0, the
  # downsample, down_1_0) and the middle get zero convs.
  assert config.ldm.controlnet.embedding_channels == (16, 32, 96)
  assert sorted(k for k in control_params if 'zero_conv' in k) == ['middle_zero_conv'] + [
      f'zero_conv_{i}' for i in range(4)]

  rng = np.random.default_rng(0)
  mean = np.repeat(np.repeat(rng.normal(size=(8, 2, 2, 3)), 4, axis=1), 4, axis=2)
  batch = {'latent': np.concatenate([mean, np.full_like(mean, -8.0)], -1).astype(np.float32),
           'segmentation': squares(8), **conditioner.inputs({'caption': ['a large red square in the center'] * 8})}
  # A fresh UNet zeroes its out_conv and each block's last conv, so no gradient would reach the ControlNet:
  # perturb the base as training would have moved it.
  leaves, tree = jax.tree.flatten(state.frozen)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  state = state.replace(frozen=tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
  unet_params = state.frozen['unet']
  x, t = jnp.asarray(mean[:2], jnp.float32), jnp.array([10, 700])
  context = conditioner.encode(state.frozen['cond'], {'tokens': batch['tokens'][:2]})
  control = controlnet_lib.control_image({'segmentation': batch['segmentation'][:2]}, 'segmentation')
  controlnet = controlnet_lib.create(unet, config.ldm.controlnet)
  run = lambda params, scale: controlnet_lib.controlled(unet, controlnet, state.with_frozen(params), control,
                                                         scale)(x, t, context)
  plain = unet.apply({'params': unet_params}, x, t, context)
  np.testing.assert_array_equal(run(state.params, 1.0), plain)  # zero convs: the base exactly

  step = jax.jit(ldm.make_train_step(config, unet, conditioner, schedules.Schedule.from_config(config.ldm.schedule),
                                     1.0, 'kl'))
  frozen = jax.tree.map(np.asarray, state.frozen)
  losses = []
  for i in range(3):
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)  # the base never moves
  assert np.abs(state.params['controlnet']['zero_conv_0']['kernel']).max() > 1e-4
  steered = run(state.params, 1.0)
  assert np.abs(steered - plain).max() > 1e-4
  np.testing.assert_allclose(run(state.params, 0.0), plain, atol=1e-6)  # control_scale 0: the base


def test_a_diffusers_controlnet_imports_exactly(tmp_path):
  """A tiny SD-1-like UNet and a ControlNetModel made from it (random zero convs and embedding output, so the
  residuals are not zero), saved by diffusers: our UNet with our ControlNet's residuals gives diffusers' output."""
  torch = torch_reference.import_torch()
  diffusers = torch_reference.import_diffusers()
  reference = test_weights.save_tiny_unet(tmp_path, 'sd1')
  torch.manual_seed(1)
  reference_cn = diffusers.ControlNetModel.from_unet(reference, conditioning_embedding_out_channels=(8, 16)).eval()
  with torch.no_grad():
    for name, p in reference_cn.named_parameters():
      if name.startswith(('controlnet_down_blocks', 'controlnet_mid_block', 'controlnet_cond_embedding.conv_out')):
        p.normal_(0, 0.1)
  reference_cn.save_pretrained(str(tmp_path / 'controlnet'))

  unet, unet_params, info = weights_unet.load_diffusers(tmp_path)
  unet_config = ml_collections.ConfigDict(info['unet'])
  cn_config = ml_collections.ConfigDict(dict(kind='segmentation', embedding_channels=(8, 16), init_from=''))
  controlnet = controlnet_lib.create(unet, cn_config)
  abstract = weights_controlnet.abstract_params(controlnet, 4, info['context_dim'])
  cn_params = weights_controlnet.load(tmp_path, abstract, unet_config, cn_config)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
  t = np.array([10, 900])
  context = rng.normal(size=(2, 7, 48)).astype(np.float32)
  image = rng.uniform(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    tensors = [torch.from_numpy(a) for a in (x, t, context)]
    down, mid = reference_cn(*tensors, controlnet_cond=torch.from_numpy(image), conditioning_scale=0.7,
                             return_dict=False)
    expected = reference(*tensors, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample.numpy()
    plain = reference(*tensors).sample.numpy()
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  ours = controlnet_lib.controlled(unet, controlnet, {'unet': unet_params, 'controlnet': cn_params}, nhwc(image),
                                   0.7)(nhwc(x), jnp.asarray(t), jnp.asarray(context))
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, atol=1e-4)
  assert np.abs(expected - plain).mean() > 0.05  # the control matters

  wrong = ml_collections.ConfigDict(dict(kind='segmentation', embedding_channels=(16, 32), init_from=''))
  with pytest.raises(ValueError, match=r'ldm.controlnet.embedding_channels=\(16, 32\) should be \(8, 16\)'):
    weights_controlnet.load(tmp_path, abstract, unet_config, wrong)


def test_the_config_checks_name_the_field():
  def problems(**overrides):
    config = small_config()
    config.update_from_flattened_dict(overrides)
    return validate.problems(config, batches=False)

  assert problems() == []
  assert any("ldm.controlnet.kind='depth'" in p for p in problems(**{'ldm.controlnet.kind': 'depth'}))
  assert any('set data.segmentation_key' in p for p in problems(**{'data.segmentation_key': ''}))
  assert any('downsamples the control image 8x, but the first stage\'s factor is 4' in p
             for p in problems(**{'ldm.controlnet.embedding_channels': (16, 32, 96, 256)}))
  assert any('train one at a time' in p for p in problems(**{'ldm.lora.rank': 4}))
  assert any('set data.control_folder' in p for p in problems(**{'ldm.controlnet.kind': 'image'}))


def test_the_eval_of_a_run_on_an_imported_first_stage_writes_its_metrics(tmp_path):
  """A run whose first stage is imported (autoencoder.pretrained) has no autoencoder step: its metrics are
  written at step 0."""
  evaluate._write(str(tmp_path), {'ldm_step': 3, 'fid': 12.5}, {'autoencoder_step': None, 'psnr': 24.5})
  assert json.loads((tmp_path / 'eval' / 'autoencoder.json').read_text())['psnr'] == 24.5
  assert json.loads((tmp_path / 'eval' / 'ldm.json').read_text())['fid'] == 12.5


@pytest.mark.slow
def test_a_controlnet_trains_on_our_own_base_and_steers_its_samples(stage_1, tmp_path, tfds_dir):
  """Through the entry point, on the scale-out tests' stage 1: the latent store re-encoded with its maps by the
  base's first stage, 3 ControlNet steps on the base's trained ldm, then samples with and without the control."""
  _, reference, _ = stage_1
  workdir = tmp_path / 'controlnet'
  args = [sys.executable, '-m', 'latent_diffusion.main', f'--config=configs/controlnet.py:smoke,base={reference}',
          *scale_out.command(workdir, tfds_dir)[1:], '--config.ldm.total_steps=3', '--config.sampling.num_steps=2',
          '--config.sampling.seeds=(0,)', '--config.sampling.condition_indices=(0, 1)',
          '--config.sampling.batch_size=8']
  run = lambda *extra: subprocess.run(args + list(extra), cwd=scale_out.REPO, env=scale_out.env(),
                                      capture_output=True, text=True, timeout=900)
  # Three steps move the zero convs little: amplified 1000 times their residuals change the image.
  result = run('--stage=autoencoder,latents,ldm,sample', '--config.sampling.control_scale=1000.0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Read the trained ldm of {reference} at step {scale_out.STEPS}' in result.stderr
  assert 'using the imported first stage, nothing to train' in result.stderr
  store = np.load(sorted((workdir / 'latents' / 'validation').glob('shard-*.npz'))[0])
  assert store['segmentation'].shape[1:] == (32, 32) and store['segmentation'].max() >= 1
  images = [np.load(workdir / 'samples' / 'samples.npz')['images'].astype(int)]
  shutil.rmtree(workdir / 'samples')
  result = run('--stage=sample', '--config.sampling.control_scale=0.0')
  assert result.returncode == 0, result.stderr[-3000:]
  images.append(np.load(workdir / 'samples' / 'samples.npz')['images'].astype(int))
  assert images[0].shape == (2, 32, 32, 3) and np.abs(images[0] - images[1]).mean() > 0.2
  # At control_scale 0 the samples are the base's own for the same captions and seeds: the frozen base intact.
  captions = tuple(c.decode() for c in store['caption'][:2])
  base = tmp_path / 'base'
  shutil.copytree(reference, base)
  result = scale_out.main(base, tfds_dir, '--stage=sample', '--config.sampling.num_steps=2',
                          '--config.sampling.seeds=(0,)', f'--config.sampling.prompts={captions}',
                          '--config.sampling.batch_size=8', '--config.sampling.guidance_scales=(3.0,)')
  assert result.returncode == 0, result.stderr[-3000:]
  own = np.load(base / 'samples' / 'samples.npz')['images'].astype(int)
  assert np.abs(own - images[1]).max() <= 1, np.abs(own - images[1]).max()
