"""Weight import: tiny random reference models (transformers' CLIPTextModel, diffusers' UNet2DConditionModel and
AutoencoderKL), saved as their packages save them, converted by `latent_diffusion.weights` and compared
numerically on random inputs, for two architecture variants each (Stable Diffusion 1.x-like and 2.x-like)."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from configs import sd_finetune
from configs import txt2img
from latent_diffusion import config_lib
from latent_diffusion import parallel
from latent_diffusion.data import latent_store
from latent_diffusion.training import ldm
from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.models import unet as unet_lib
from latent_diffusion.weights import autoencoder as weights_autoencoder
from latent_diffusion.weights import clip
from latent_diffusion.weights import conditioning as weights_conditioning
from latent_diffusion.weights import torch_convert
from latent_diffusion.weights import unet as weights_unet
from tests import torch_reference

ATOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIP_VARIANTS = {
    # SD 1.x: OpenAI CLIP ViT-L/14's text tower (quick_gelu, 64-wide heads), shrunk.
    'sd1': dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                hidden_act='quick_gelu'),
    # SD 2.x: OpenCLIP ViT-H/14's text tower (gelu), shrunk, with a different head width and MLP ratio.
    'sd2': dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                hidden_act='gelu'),
}


def _byte_symbols():
  """GPT-2's byte -> printable character table, which CLIP's BPE vocabulary is written in."""
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  codes, extra = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return [chr(c) for c in codes]


def save_tiny_clip(directory, variant, seed=0, prefixed=False, max_length=16):
  """A random CLIPTextModel and a small BPE tokenizer saved like a Stable Diffusion folder; the model."""
  torch = torch_reference.import_torch()
  import transformers  # pylint: disable=g-import-not-at-top
  symbols = _byte_symbols()
  merges = ['r e', 'c i', 're d</w>', 'ci r', 'cir c', 'l e</w>', 'circ le</w>']
  vocab = {s: i for i, s in enumerate(symbols + [s + '</w>' for s in symbols] + [
      m.replace(' ', '') for m in merges] + ['<|startoftext|>', '<|endoftext|>'])}
  (directory / 'tokenizer').mkdir(parents=True)  # the two files of every published SD tokenizer/ folder
  (directory / 'tokenizer' / 'vocab.json').write_text(json.dumps(vocab))
  (directory / 'tokenizer' / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory / 'tokenizer'))
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=max_length,
                                       bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
                                       **CLIP_VARIANTS[variant])
  model = transformers.CLIPTextModel(config).eval()
  model.save_pretrained(str(directory / 'text_encoder'))
  if prefixed:  # the key layout of checkpoints saved by transformers 4.x (every published SD folder)
    path = directory / 'text_encoder' / 'model.safetensors'
    save_file({f'text_model.{k}': v for k, v in load_file(str(path)).items()}, str(path))
  return model, tokenizer


@pytest.mark.parametrize('variant,prefixed', [('sd1', True), ('sd2', False)])
def test_clip_text_encoder_matches_transformers(tmp_path, variant, prefixed):
  torch = torch_reference.import_torch()
  reference, hf_tokenizer = save_tiny_clip(tmp_path, variant, prefixed=prefixed)
  model, params = clip.load_text_encoder(tmp_path)
  tokenizer = clip.CLIPTokenizer(tmp_path)
  texts = ['a red circle', 'circle', '']
  ids = tokenizer(texts, 16)
  expected_ids = hf_tokenizer(texts, padding='max_length', max_length=16, truncation=True)['input_ids']
  np.testing.assert_array_equal(ids, expected_ids)
  bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
  assert ids[0, 0] == bos and ids[2, 1] == eos and ids[1, 0] == bos  # <|startoftext|> ... <|endoftext|> pads
  random_ids = np.random.default_rng(0).integers(0, tokenizer.vocab_size, size=(2, 16)).astype(np.int32)
  for batch in (ids, random_ids):
    with torch.no_grad():
      expected = reference(torch.from_numpy(batch).long()).last_hidden_state.numpy()
    ours = np.asarray(model.apply({'params': params}, jnp.asarray(batch)))
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    assert np.abs(expected).max() > 0.5
  # Causal: changing the last token leaves every earlier position unchanged.
  changed = random_ids.copy()
  changed[:, -1] = (changed[:, -1] + 1) % tokenizer.vocab_size
  out = np.asarray(model.apply({'params': params}, jnp.asarray(changed)))
  np.testing.assert_allclose(out[:, :-1], np.asarray(model.apply({'params': params}, random_ids))[:, :-1],
                             atol=1e-6)


def test_clip_conversion_names_what_is_wrong(tmp_path):
  save_tiny_clip(tmp_path, 'sd1')
  config_path = tmp_path / 'text_encoder' / 'config.json'
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, 'num_hidden_layers': 2}))
  with pytest.raises(ValueError, match=r'tensors the configured model has no place for.*encoder\.layers\.2'):
    clip.load_text_encoder(tmp_path)
  config_path.write_text(json.dumps({**config, 'hidden_act': 'relu'}))
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    clip.load_text_encoder(tmp_path)
  with pytest.raises(FileNotFoundError, match='No config.json in .*missing/text_encoder'):
    clip.load_text_encoder(tmp_path / 'missing')
  config_path.write_text(json.dumps(config))
  (tmp_path / 'text_encoder' / 'model.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='expected model.safetensors'):
    clip.load_text_encoder(tmp_path)


UNET_VARIANTS = {
    # SD 1.x: 8 heads at every level, 1x1-conv projections, attention on the first levels.
    'sd1': dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=48,
                down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D')),
    # SD 2.x: fixed 16-wide heads (head counts per level), linear projections, upcast attention, and here
    # attention on the deeper levels, two transformer layers and class embeddings.
    'sd2': dict(block_out_channels=(32, 64, 96), layers_per_block=1, attention_head_dim=(2, 4, 6),
                cross_attention_dim=40, use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2, num_class_embeds=5,
                down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D')),
}


def save_tiny_unet(directory, variant, seed=0, **overrides):
  torch = torch_reference.import_torch()
  diffusers = torch_reference.import_diffusers()
  torch.manual_seed(seed)
  arch = {'in_channels': 4, 'out_channels': 4, **UNET_VARIANTS[variant], **overrides}
  model = diffusers.UNet2DConditionModel(sample_size=16, norm_num_groups=32, **arch).eval()
  model.save_pretrained(str(directory / 'unet'))
  return model


@pytest.mark.parametrize('variant', sorted(UNET_VARIANTS))
def test_unet_matches_diffusers(tmp_path, variant):
  torch = torch_reference.import_torch()
  reference = save_tiny_unet(tmp_path, variant)
  model, params, info = weights_unet.load_diffusers(tmp_path)
  arch = UNET_VARIANTS[variant]
  assert info['context_dim'] == arch['cross_attention_dim']
  if variant == 'sd2':
    assert (info['unet']['num_head_channels'], info['unet']['upcast_attention']) == (16, True)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
  t = np.array([10, 900])
  context = rng.normal(size=(2, 7, arch['cross_attention_dim'])).astype(np.float32)
  labels = np.array([1, 3])
  with torch.no_grad():
    expected = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                         class_labels=torch.from_numpy(labels) if 'num_class_embeds' in arch else None).sample.numpy()
  ours = model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
                     jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, atol=ATOL)
  assert np.abs(expected).std() > 0.05


AE_VARIANTS = {
    # SD's VAE (KL-f8) shrunk: 3 levels (f4), two blocks per level, 4 latent channels.
    'sd': dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4),
    # Another shape: f8 with one block per level and 8 latent channels; saved with the attention names of
    # diffusers < 0.14 (query/key/value/proj_attn), as older VAE folders are.
    'legacy_f8': dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=8),
    # The VQ first stage (the paper's VQ-f4 shape, small): diffusers' VQModel, codebook of 64.
    'vq_f4': dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=3, num_vq_embeddings=64),
}


def save_tiny_vae(directory, variant, seed=0):
  torch = torch_reference.import_torch()
  diffusers = torch_reference.import_diffusers()
  torch.manual_seed(seed)
  arch = AE_VARIANTS[variant]
  levels = len(arch['block_out_channels'])
  model_class = diffusers.VQModel if variant.startswith('vq') else diffusers.AutoencoderKL
  model = model_class(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * levels,
                      up_block_types=('UpDecoderBlock2D',) * levels, norm_num_groups=32, scaling_factor=0.3,
                      **arch).eval()
  if variant.startswith('vq'):  # codebook entries of the latents' scale, so that codes are used and distinct
    with torch.no_grad():
      model.quantize.embedding.weight.normal_()
  model.save_pretrained(str(directory / 'vae'))
  if variant == 'legacy_f8':
    path = directory / 'vae' / 'diffusion_pytorch_model.safetensors'
    legacy = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    renamed = {}
    for key, value in load_file(str(path)).items():
      for new, old in legacy.items():
        key = key.replace(f'.{new}.', f'.{old}.')
      renamed[key] = value
    assert any('.proj_attn.' in k for k in renamed)
    save_file(renamed, str(path))
  return model


@pytest.mark.parametrize('variant', sorted(AE_VARIANTS))
def test_autoencoder_matches_diffusers(tmp_path, variant):
  torch = torch_reference.import_torch()
  reference = save_tiny_vae(tmp_path, variant)
  model_config = config_lib.autoencoder('kl-f8').model
  with pytest.raises(ValueError, match='autoencoder.model.ch=128 should be 32.*Set these in the config'):
    weights_autoencoder.load_diffusers(tmp_path, model_config)
  info = weights_autoencoder.from_diffusers_config(json.loads((tmp_path / 'vae' / 'config.json').read_text()))
  model_config.update(info['model'])
  params, scale_factor = weights_autoencoder.load_diffusers(tmp_path, model_config)
  assert scale_factor == 0.3
  model = autoencoder_lib.create_autoencoder(model_config)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
  f = 2 ** (len(AE_VARIANTS[variant]['block_out_channels']) - 1)
  z = rng.normal(size=(2, AE_VARIANTS[variant]['latent_channels'], 32 // f, 32 // f)).astype(np.float32)
  encoded = np.asarray(model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method='encode'))
  image = model.apply({'params': params}, jnp.asarray(z.transpose(0, 2, 3, 1)), method='decode')
  with torch.no_grad():
    encoding = reference.encode(torch.from_numpy(x))
    expected_image = reference.decode(torch.from_numpy(z)).sample.numpy()
  if variant.startswith('vq'):  # the pre-quantisation latent, and the decoder after the codebook lookup
    np.testing.assert_allclose(encoded.transpose(0, 3, 1, 2), encoding.latents.numpy(), atol=ATOL)
    codes = np.asarray(model.apply({'params': params}, jnp.asarray(z.transpose(0, 2, 3, 1)), method=lambda m, h: (
        m.quantize(h)[1]['indices'])))
    assert len(np.unique(codes)) > 10
  else:
    gaussian = autoencoder_lib.DiagonalGaussian(encoded)
    np.testing.assert_allclose(np.asarray(gaussian.mean).transpose(0, 3, 1, 2), encoding.latent_dist.mean.numpy(),
                               atol=ATOL)
    np.testing.assert_allclose(np.asarray(gaussian.logvar).transpose(0, 3, 1, 2),
                               encoding.latent_dist.logvar.numpy(), atol=ATOL)
  np.testing.assert_allclose(np.asarray(image).transpose(0, 3, 1, 2), expected_image, atol=ATOL)
  assert min(np.abs(encoded).std(), np.abs(expected_image).std()) > 0.01


def _renamed(state_dict, abstract, from_key, to_key, conv_as_4d=False):
  """A state dict under another naming, built through our two name maps (leaf suffixes as torch writes them);
  `conv_as_4d`: 1x1 convolutions that diffusers keeps as Linear are written as CompVis' Conv2d [out, in, 1, 1]."""
  renamed = {}
  for path, target in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract))[0]:
    names = tuple(p.key for p in path)
    suffix = '.bias' if names[-1] == 'bias' else '.weight'
    tensor = state_dict[from_key(names) + suffix]
    if conv_as_4d and len(target.shape) == 4 and tensor.ndim == 2:
      tensor = tensor[:, :, None, None]
    renamed[to_key(names) + suffix] = tensor
  return renamed


@pytest.mark.parametrize('variant', sorted(UNET_VARIANTS))
def test_unet_from_a_compvis_checkpoint(tmp_path, variant):
  """A CompVis-layout LDM checkpoint, which diffusers' own single-file converter maps back onto the original
  diffusers model tensor for tensor (an independent check of our CompVis names), converts to the same params."""
  torch = torch_reference.import_torch()
  from diffusers.loaders import single_file_utils  # pylint: disable=g-import-not-at-top
  reference = save_tiny_unet(tmp_path, variant)
  model, params, info = weights_unet.load_diffusers(tmp_path)
  abstract = weights_unet.abstract_params(model, info['in_channels'], info['context_dim'])
  levels = len(model.channel_mult)
  original = reference.state_dict()
  compvis = _renamed(original, abstract, lambda p: weights_unet.diffusers_key(p, levels),
                     lambda p: 'model.diffusion_model.' + weights_unet.compvis_key(p, model))
  back = single_file_utils.convert_ldm_unet_checkpoint(compvis, dict(reference.config))
  assert set(back) == set(original)
  for key, tensor in back.items():
    np.testing.assert_array_equal(tensor.numpy(), original[key].numpy(), err_msg=key)
  path = tmp_path / 'ldm.ckpt'
  torch.save({'state_dict': {**compvis, 'first_stage_model.decoder.conv_in.weight': torch.zeros(1)},
              'global_step': 7}, str(path))
  from_ckpt, _ = weights_unet.load(str(path), abstract, model)
  jax.tree.map(np.testing.assert_array_equal, from_ckpt, params)
  # A checkpoint that keeps EMA copies (LitEma's names: model_ema. + the name without dots) converts those.
  ema = {'model_ema.' + k[len('model.'):].replace('.', ''): 2 * v for k, v in compvis.items()}
  torch.save({'state_dict': {**compvis, **ema, 'model_ema.num_updates': torch.tensor(3)}}, str(path))
  from_ema, _ = weights_unet.load(str(path), abstract, model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-6), from_ema, params)


@pytest.mark.parametrize('variant', sorted(AE_VARIANTS))
def test_autoencoder_from_a_compvis_checkpoint(tmp_path, variant):
  """The same for the first stage: a CompVis zoo checkpoint (with its loss.* training modules) and the
  `first_stage_model.*` of an LDM checkpoint both give the params converted from the diffusers folder."""
  torch = torch_reference.import_torch()
  from diffusers.loaders import single_file_utils  # pylint: disable=g-import-not-at-top
  reference = save_tiny_vae(tmp_path, variant)
  info = weights_autoencoder.from_diffusers_config(dict(reference.config))
  model_config = config_lib.autoencoder('kl-f8').model
  model_config.update(info['model'])
  params, _ = weights_autoencoder.load_diffusers(tmp_path, model_config)
  model = autoencoder_lib.create_autoencoder(model_config)
  levels = len(model.ch_mult)
  original = reference.state_dict()
  compvis = _renamed(original, weights_autoencoder.abstract_params(model),
                     lambda p: weights_autoencoder.diffusers_key(p, levels), weights_autoencoder.compvis_key,
                     conv_as_4d=True)
  back = single_file_utils.convert_ldm_vae_checkpoint(compvis, dict(reference.config))
  # diffusers' converter is for KL VAEs; a VQ codebook is named quantize.embedding.weight in both layouts.
  assert set(back) == set(original) - {'quantize.embedding.weight'}
  assert set(original) - set(back) == ({'quantize.embedding.weight'} if variant.startswith('vq') else set())
  for key, tensor in back.items():
    np.testing.assert_array_equal(tensor.numpy(), original[key].numpy().reshape(tensor.shape), err_msg=key)
  zoo = {**compvis, 'loss.discriminator.main.0.weight': torch.zeros(3), 'loss.logvar': torch.zeros(())}
  for name, state in (('zoo.ckpt', zoo), ('ldm.ckpt', {f'first_stage_model.{k}': v for k, v in compvis.items()})):
    torch.save({'state_dict': state}, str(tmp_path / name))
    converted = weights_autoencoder.convert_compvis(
        torch_convert.read_state_dict(tmp_path / name), model_config, name)
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def save_tiny_stable_diffusion(directory, prediction_type='epsilon'):
  """A Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) of tiny random models."""
  diffusers = torch_reference.import_diffusers()
  save_tiny_clip(directory, 'sd1', max_length=77)
  save_tiny_unet(directory, 'sd1', cross_attention_dim=CLIP_VARIANTS['sd1']['hidden_size'])
  save_tiny_vae(directory, 'sd')
  diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                          prediction_type=prediction_type).save_pretrained(str(directory / 'scheduler'))


def test_sd_finetune_config_reads_the_folder(tmp_path):
  save_tiny_stable_diffusion(tmp_path, prediction_type='v_prediction')
  config = sd_finetune.get_config(f'folder={tmp_path},smoke')
  assert config.ldm.unet.model_channels == 32 and tuple(config.ldm.unet.channel_mult) == (1, 2, 2)
  assert tuple(config.ldm.unet.attention_resolutions) == (1, 2) and config.ldm.parameterization == 'v'
  assert tuple(config.autoencoder.model.ch_mult) == (1, 2, 2) and config.latents.scale_factor == 0.3
  assert config.ldm.conditioning.kind == 'clip' and config.ldm.init_from == str(tmp_path)
  with pytest.raises(FileNotFoundError, match='unet/unet/config.json not found.*needs a Stable Diffusion folder'):
    sd_finetune.get_config(f'folder={tmp_path / "unet"}')
  with pytest.raises(ValueError, match='needs the Stable Diffusion folder'):
    sd_finetune.get_config('smoke')


def test_warm_start_imports_the_unet_into_its_own_buffers(tmp_path):
  """`ldm.init_from` with a text encoder trained from scratch: the UNet and its EMA start at the imported weights,
  the rest stays as initialised, and no two leaves share a buffer (the train step donates the whole state)."""
  save_tiny_unet(tmp_path, 'sd1', block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=4,
                 cross_attention_dim=128, in_channels=3, out_channels=3,
                 down_block_types=('CrossAttnDownBlock2D',) * 2, up_block_types=('CrossAttnUpBlock2D',) * 2)
  config = txt2img.get_config('smoke')
  config.ldm.unet.attention_resolutions = (1, 2)  # cross-attention on both levels, as the saved UNet
  config.ldm.init_from = str(tmp_path)
  mesh = parallel.create_mesh(config.mesh)
  _, _, init = ldm.create(config, {'shape': [8, 8, 6], 'kind': 'kl', 'scale_factor': 1.0})
  state, shardings = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
  cond_before = jax.device_get(state.params['cond'])
  state = ldm.make_warm_start(config)(state, shardings)
  _, imported, _ = weights_unet.load_diffusers(tmp_path)
  for tree in (state.params['unet'], state.ema_params['unet']):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), imported)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params['cond']), cond_before)
  pointers = [(shard.device.id, shard.data.unsafe_buffer_pointer())
              for leaf in jax.tree.leaves((state.params, state.ema_params)) for shard in leaf.addressable_shards]
  assert len(pointers) == len(set(pointers))
  save_tiny_unet(tmp_path / 'other', 'sd1')  # another architecture than the config's
  config.ldm.init_from = str(tmp_path / 'other')
  with pytest.raises(ValueError, match='ldm.unet.model_channels=64 should be 32'):
    ldm.make_warm_start(config)(state, shardings)


@pytest.mark.slow
def test_a_tiny_stable_diffusion_folder_fine_tunes_and_samples_through_the_pipeline(tmp_path, tfds_dir):
  """The round trip: converters -> autoencoder (imported) -> latents -> ldm (4 fine-tuning steps of the imported
  UNet with the frozen CLIP) -> sample; and the sample-only variant, whose step-0 checkpoint is the import."""
  folder = tmp_path / 'sd'
  save_tiny_stable_diffusion(folder)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  logs = {}
  for variant in ('smoke', 'smoke,sample'):  # each variant's four stages in one process
    workdir = tmp_path / variant
    result = subprocess.run(
        [sys.executable, '-m', 'latent_diffusion.main', f'--config=configs/sd_finetune.py:folder={folder},{variant}',
         f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}', '--stage=autoencoder,latents,ldm,sample'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs[variant] = result.stderr
    assert 'Loaded the frozen CLIP text encoder' in logs[variant]
    assert 'Initialised the UNet from' in logs[variant]
    assert 'stage eval' not in result.stdout and 'stage sample       ran' in result.stdout
    samples = np.load(workdir / 'samples' / 'samples.npz')
    assert samples['images'].shape == (4, 32, 32, 3) and samples['images'].std() > 1
    assert list(samples['prompts']) == ['a large red circle in the center'] * 2 + [
        'a small blue square in the top left'] * 2
  losses = [float(v) for v in re.findall(r'train/loss=([0-9.]+)', logs['smoke'])]
  assert len(losses) == 2 and all(np.isfinite(losses))

  _, unet_params, _ = weights_unet.load_diffusers(folder)
  _, clip_params = clip.load_text_encoder(folder)
  for variant, trained_steps in (('smoke,sample', 0), ('smoke', 4)):
    config = sd_finetune.get_config(f'folder={folder},{variant}')
    workdir = str(tmp_path / variant)
    metadata = latent_store.read_metadata(os.path.join(workdir, 'latents', 'validation'))
    assert metadata['scale_factor'] == 0.3 and metadata['autoencoder_step'] is None
    _, _, params, step = ldm.load_trained(config, workdir, parallel.create_mesh(config.mesh), metadata)
    assert step == trained_steps
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params['cond']), clip_params)  # frozen
    unet_change = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(jax.device_get(params['unet'])),
                                                          jax.tree.leaves(unet_params)))
    assert (unet_change == 0) if trained_steps == 0 else (unet_change > 0)


@pytest.mark.parametrize('new_order', [False, True])
def test_attention_block_is_the_reference_one(new_order):
  """ADM's AttentionBlock written in torch from the reference's definition (GroupNorm32, a kernel-1 Conv1d to
  q/k/v, QKVAttentionLegacy's heads-then-q/k/v split or QKVAttention's q/k/v-then-heads, a Conv1d out), its state
  dict converted under the reference's names, gives our output."""
  torch = torch_reference.import_torch()
  channels, heads, size = 64, 4, 4
  torch.manual_seed(0)
  modules = torch.nn.ModuleDict(dict(norm=torch.nn.GroupNorm(32, channels),
                                     qkv=torch.nn.Conv1d(channels, 3 * channels, 1),
                                     proj_out=torch.nn.Conv1d(channels, channels, 1)))
  for p in modules.parameters():
    torch.nn.init.normal_(p, 0.0, 0.3)
  x = torch.randn(2, channels, size, size)
  with torch.no_grad():
    flat = x.reshape(2, channels, -1)
    qkv = modules['qkv'](modules['norm'](flat))
    d = channels // heads
    if new_order:
      q, k, v = (a.reshape(2 * heads, d, -1) for a in qkv.chunk(3, dim=1))
    else:
      q, k, v = qkv.reshape(2 * heads, 3 * d, -1).split(d, dim=1)
    weights = torch.softmax(torch.einsum('bct,bcs->bts', q, k) / d ** 0.5, dim=-1)
    expected = (flat + modules['proj_out'](torch.einsum('bts,bcs->bct', weights, v).reshape(2, channels, -1)))
    expected = expected.reshape(x.shape).numpy()
  block = unet_lib.AttentionBlock(heads, d, new_order=new_order, attention='reference')
  ours_x = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  abstract = jax.eval_shape(block.init, jax.random.key(0), ours_x)['params']
  params = torch_convert.convert({k: v.numpy() for k, v in modules.state_dict().items()}, abstract,
                                 lambda path: path[0], source='AttentionBlock')
  out = block.apply({'params': params}, ours_x)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, atol=ATOL)
  assert np.abs(expected - x.numpy()).mean() > 0.1  # the attention contributes


def test_compvis_names_of_a_unet_with_attention_blocks():
  """Where the reference UNetModel puts its AttentionBlocks (slot 1 after a level's ResBlocks, the middle block's
  second module) and the upsampler after them (slot 2), for 2 levels with attention at ds 2."""
  model = unet_lib.UNet(model_channels=32, out_channels=4, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_head_channels=16, use_spatial_transformer=False)
  abstract = weights_unet.abstract_params(model, 4, 0)
  names = {weights_unet.compvis_key(tuple(p.key for p in path), model)
           for path, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract))[0]}
  attention = {n.rsplit('.', 1)[0] for n in names if n.endswith(('.qkv', '.proj_out'))}
  assert attention == {'input_blocks.3.1', 'middle_block.1', 'output_blocks.0.1', 'output_blocks.1.1'}
  assert 'output_blocks.1.2.conv' in names and 'input_blocks.2.0.op' in names
  assert not any('transformer_blocks' in n for n in names)


def test_bert_embedder_from_the_reference_x_transformers():
  """The reference's BERTEmbedder network (x-transformers 0.8.2's TransformerWrapper over an Encoder, the release
  the reference copied), random, converted from its LDM-checkpoint names, gives our text encoder's output."""
  torch = torch_reference.import_torch()
  import x_transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  reference = x_transformers.TransformerWrapper(num_tokens=50, max_seq_len=12,
                                                attn_layers=x_transformers.Encoder(dim=48, depth=2)).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():  # LayerNorms and biases away from their 1 and 0
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.3)
  tokens = torch.randint(0, 50, (3, 12))
  with torch.no_grad():
    expected = reference(tokens, return_embeddings=True).numpy()
  cond = config_lib.ldm(unet={}, conditioning=dict(kind='text', width=48, depth=2, num_heads=8, head_dim=64,
                                                  qkv_bias=False, vocab_size=50, max_length=12),
                        learning_rate=1e-4, batch_size=1, total_steps=1).conditioning
  model = ldm.text_encoder(cond, tokenizer_vocab=40)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 12), jnp.int32))['params']
  state = {f'cond_stage_model.transformer.{k}': v.numpy() for k, v in reference.state_dict().items()}  # BERTEmbedder's
  params = weights_conditioning.convert(state, 'text', abstract, 'BERTEmbedder')
  out = np.asarray(model.apply({'params': params}, jnp.asarray(tokens.numpy())))
  np.testing.assert_allclose(out, expected, atol=ATOL)
  assert expected.std() > 0.1
  cond.qkv_bias = True  # a config that is not the checkpoint's architecture is refused, naming the tensor
  biased = ldm.text_encoder(cond, tokenizer_vocab=40)
  with pytest.raises(ValueError, match='missing transformer.attn_layers.layers.0.1.to_q.bias'):
    weights_conditioning.convert(state, 'text', jax.eval_shape(biased.init, jax.random.key(0), jnp.zeros(
        (1, 12), jnp.int32))['params'], 'BERTEmbedder')


def test_class_embedder_from_a_compvis_checkpoint():
  """The reference ClassEmbedder is one nn.Embedding named `embedding` under cond_stage_model."""
  table = np.random.default_rng(0).normal(size=(11, 8)).astype(np.float32)
  model = ldm.Conditioner(config_lib.ldm(unet={}, conditioning=dict(kind='class', num_classes=11, width=8),
                                         learning_rate=1e-4, batch_size=1, total_steps=1).conditioning).model
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,), jnp.int32))['params']
  params = weights_conditioning.convert({'cond_stage_model.embedding.weight': table, 'model.other': table}, 'class',
                                        abstract, 'ClassEmbedder')
  labels = np.array([3, 10, 0])
  np.testing.assert_array_equal(np.asarray(model.apply({'params': params}, jnp.asarray(labels)))[:, 0], table[labels])
