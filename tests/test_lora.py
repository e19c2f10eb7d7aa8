"""LoRA: the ldm step trains adapters of a frozen UNet, and LoRA files as diffusers / PEFT, its older names and
kohya write them import exactly (a tiny random diffusers UNet with a PEFT adapter) and export back."""

import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from configs import sd_finetune
from configs import txt2img
from latent_diffusion import validate
from latent_diffusion.diffusion import schedules
from latent_diffusion.models import lora
from latent_diffusion.training import ldm
from latent_diffusion.weights import clip
from latent_diffusion.weights import lora as weights_lora
from latent_diffusion.weights import unet as weights_unet
import shipped_configs
import test_scale_out as scale_out
from test_scale_out import stage_1  # pylint: disable=unused-import  (the fixture)
import test_weights
import torch_reference

METADATA = {'shape': [8, 8, 6], 'kind': 'kl', 'scale_factor': 1.0}


def lora_config(**lora_fields):
  config = txt2img.get_config('smoke')
  config.ldm.unet.update(model_channels=32, channel_mult=(1,), attention_resolutions=(1,))
  config.ldm.conditioning.update(width=32, depth=1)
  config.ldm.optimizer.update(warmup_steps=0, learning_rate=1e-3)
  config.ldm.lora.update(rank=4, alpha=8.0, **lora_fields)
  return config


TEXT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')


def unbox(tree):
  return jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, tree, is_leaf=lambda x: hasattr(x, 'unbox'))


def test_the_ldm_step_trains_the_adapters_only_and_starts_at_the_base_model():
  config = lora_config(text_targets=TEXT_TARGETS)  # the UNet's and the text encoder's
  unet, conditioner, init = ldm.create(config, METADATA)
  state = unbox(jax.jit(init)(jax.random.PRNGKey(0)))
  assert set(state.params) == set(state.ema_params) == {'lora', 'lora_cond'} and set(state.frozen) == {'unet', 'cond'}
  # The text encoder (one layer, width 32): its fused q/k/v kernel gets one adapter per projection, and out one.
  text = lora.adapter_paths(state.params['lora_cond'])
  assert sorted(text) == [('layer_0_out',), ('layer_0_qkv',)]
  assert text[('layer_0_qkv',)]['down'].shape == (3, 32, 4) and text[('layer_0_qkv',)]['up'].shape == (3, 4, 32)
  adapted = sorted('/'.join(path) for path in lora.adapter_paths(state.params['lora']))
  assert adapted and all(path.split('/')[-1] in ('to_q', 'to_k', 'to_v', 'to_out') for path in adapted)
  # One res block a level: the transformers of down_0, middle and up_0 (2), each attn1 and attn2 x 4 projections.
  assert len(adapted) == 4 * 2 * 4 and len({path.split('/')[0] for path in adapted}) == 4
  q = lora.adapter_paths(state.params['lora'])[tuple(adapted[0].split('/'))]
  assert q['down'].shape == (32, 4) and not np.any(q['up'])
  # up = 0: the merged UNet is the base UNet exactly.
  merged = ldm.model_params(config, state.with_frozen(state.params))
  for a, b in zip(jax.tree.leaves({k: merged[k] for k in state.frozen}), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, b)
  # The optimizer holds the adapters only: a few thousand numbers against the UNet's hundreds of thousands.
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(state.opt_state) < 3 * count(state.params) + 10 and count(state.params) < 0.1 * count(
      state.frozen['unet'])

  step = jax.jit(ldm.make_train_step(config, unet, conditioner, schedules.Schedule.from_config(config.ldm.schedule),
                                     1.0, 'kl'))
  rng = np.random.default_rng(0)
  mean = np.repeat(np.repeat(rng.normal(size=(8, 2, 2, 3)), 4, axis=1), 4, axis=2)
  batch = {'latent': np.concatenate([mean, np.full_like(mean, -8.0)], -1).astype(np.float32),
           **conditioner.inputs({'caption': list(txt2img.SMOKE_PROMPTS)})}
  # A fresh UNet zeroes each transformer's proj_out, so no gradient would reach the projections: perturb the
  # base as training would have moved it.
  leaves, tree = jax.tree.flatten(state.frozen)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  state = state.replace(frozen=tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
  frozen = jax.tree.map(np.asarray, state.frozen)
  losses = []
  for i in range(3):
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)  # the base never moves
  q = lora.adapter_paths(state.params['lora'])[tuple(adapted[0].split('/'))]
  assert 0 < np.abs(q['up']).max() < 0.01  # three Adam steps of lr 1e-3 from zero
  merged = ldm.model_params(config, state.with_frozen(state.params))
  path = tuple(adapted[0].split('/')) + ('kernel',)
  flat = lambda tree: flax.traverse_util.flatten_dict(tree)
  np.testing.assert_allclose(flat(merged['unet'])[path] - flat(state.frozen['unet'])[path],
                             2.0 * q['down'] @ q['up'], atol=1e-6)  # scale alpha / rank = 2
  # The text encoder's adapters train too; the fused kernel moves by each projection's down @ up in its third.
  qkv = state.params['lora_cond']['layer_0_qkv']
  assert 0 < np.abs(qkv['up']).max() < 0.01
  moved = merged['cond']['layer_0_qkv']['kernel'] - state.frozen['cond']['layer_0_qkv']['kernel']
  for i in range(3):
    np.testing.assert_allclose(moved[:, 32 * i:32 * (i + 1)], 2.0 * qkv['down'][i] @ qkv['up'][i], atol=1e-6)


def abstract_state(config):
  """The LoRA train state's shapes (no compute)."""
  return unbox(jax.eval_shape(ldm.create(config, METADATA)[2], jax.random.PRNGKey(0)))


def test_targets_that_name_no_layer_are_an_error_and_conv_adds_the_resblock_convs():
  with pytest.raises(ValueError, match=r"ldm.lora.targets=\('to_x',\) names no layer of the UNet"):
    abstract_state(lora_config(targets=('to_x',)))
  state = abstract_state(lora_config(conv=True))
  convs = {path: a for path, a in lora.adapter_paths(state.params['lora']).items() if path[-1] == 'in_conv'}
  assert convs and all(a['down'].shape[:2] == (3, 3) and a['up'].shape[0] == 4 for a in convs.values())


def _peft_reference(tmp_path):
  """A tiny SD-1-like diffusers UNet saved without LoRA, then given a random PEFT adapter (rank 4, alpha 8) on the
  attention projections and saved by diffusers' save_lora_weights: (the UNet, the LoRA file, its inputs)."""
  torch = torch_reference.import_torch()
  diffusers = torch_reference.import_diffusers()
  import peft  # pylint: disable=g-import-not-at-top
  reference = test_weights.save_tiny_unet(tmp_path, 'sd1')
  reference.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'],
                                        init_lora_weights=False))
  with torch.no_grad():  # PEFT's random init leaves B small: make the adapters change the output clearly
    for name, p in reference.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.05)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / 'peft'), unet_lora_layers=peft.get_peft_model_state_dict(reference),
      unet_lora_adapter_metadata=reference.peft_config['default'].to_dict())
  rng = np.random.default_rng(0)
  inputs = (rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([10, 900]),
            rng.normal(size=(2, 7, 48)).astype(np.float32))
  return reference, tmp_path / 'peft' / 'pytorch_lora_weights.safetensors', inputs


def _run_torch(model, inputs):
  torch = torch_reference.import_torch()
  with torch.no_grad():
    return model(*(torch.from_numpy(np.asarray(a)) for a in inputs)).sample.numpy()


def _run_ours(model, params, inputs):
  x, t, context = inputs
  out = model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context))
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_diffusers_peft_older_and_kohya_files_import_exactly_and_our_exports_load_into_diffusers(tmp_path):
  reference, peft_file, inputs = _peft_reference(tmp_path)
  expected = _run_torch(reference, inputs)
  model, base, _ = weights_unet.load_diffusers(tmp_path)  # the UNet saved before the adapter
  assert np.abs(_run_ours(model, base, inputs) - expected).max() > 0.05  # the adapters matter
  merged, _ = weights_lora.merge_files(base, [peft_file], [1.0], model)
  np.testing.assert_allclose(_run_ours(model, merged, inputs), expected, atol=test_weights.ATOL)

  # The same adapters under the older diffusers names (no alphas: the scale 2 folded into up) and kohya's.
  state = load_file(str(peft_file))
  modules = sorted({k[len('unet.'):-len('.lora_A.weight')] for k in state if k.endswith('.lora_A.weight')})
  index, _ = weights_lora.module_index(base, model)
  index = {name: path for name, (path, _) in index.items()}
  old, processor, kohya, kohya_compvis = {}, {}, {}, {}
  for m in modules:
    down, up = state[f'unet.{m}.lora_A.weight'], state[f'unet.{m}.lora_B.weight']
    old.update({f'{m}.lora.down.weight': down, f'{m}.lora.up.weight': 2 * up})
    attn, proj = m.rsplit('.to_', 1)
    proj = proj.replace('out.0', 'out')
    processor.update({f'{attn}.processor.to_{proj}_lora.down.weight': down,
                      f'{attn}.processor.to_{proj}_lora.up.weight': 2 * up})
    stem = 'lora_unet_' + m.replace('.', '_')
    kohya.update({f'{stem}.lora_down.weight': down, f'{stem}.lora_up.weight': up,
                  f'{stem}.alpha': np.array(8.0, np.float32)})
    stem = 'lora_unet_' + weights_unet.compvis_key(index[m] + ('kernel',), model).replace('.', '_')  # A1111-era
    kohya_compvis.update({f'{stem}.lora_down.weight': down, f'{stem}.lora_up.weight': up,
                          f'{stem}.alpha': np.array([8.0], np.float32)})
  assert any('input_blocks' in k for k in kohya_compvis)
  for name, tensors in (('old', old), ('processor', processor), ('kohya', kohya), ('kohya_compvis', kohya_compvis)):
    save_file(tensors, str(tmp_path / f'{name}.safetensors'))
    got = _run_ours(model, weights_lora.merge_files(base, [tmp_path / f'{name}.safetensors'], [1.0], model)[0],
                    inputs)
    np.testing.assert_allclose(got, expected, atol=test_weights.ATOL, err_msg=name)
  # Two files at weights 0.5 each add up to the one at weight 1 (the deltas are linear).
  half, _ = weights_lora.merge_files(base, [peft_file, tmp_path / 'kohya.safetensors'], [0.5, 0.5], model)
  np.testing.assert_allclose(_run_ours(model, half, inputs), expected, atol=test_weights.ATOL)

  # Our export, both formats, loads into a fresh diffusers UNet with the same output.
  adapters, text_adapters = weights_lora.read(peft_file, base, model)
  assert not text_adapters
  diffusers = torch_reference.import_diffusers()
  for fmt in weights_lora.FORMATS:
    out = tmp_path / f'export_{fmt}'
    weights_lora.write(out / 'pytorch_lora_weights.safetensors', adapters, 1.0, model, fmt)
    fresh = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / 'unet')).eval()
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(out))  # converts kohya's names
    fresh.load_lora_adapter(state_dict, network_alphas=alphas, prefix='unet')
    np.testing.assert_allclose(_run_torch(fresh, inputs), expected, atol=test_weights.ATOL, err_msg=fmt)


def _clip_reference(tmp_path):
  """A tiny CLIP text encoder saved without LoRA, then given a random PEFT adapter (rank 4, alpha 8) on q_proj,
  v_proj, out_proj and fc1 (k_proj left out: a fused kernel adapted in part) and saved by diffusers'
  save_lora_weights: (the encoder, the LoRA file, token ids)."""
  torch = torch_reference.import_torch()
  diffusers = torch_reference.import_diffusers()
  import peft  # pylint: disable=g-import-not-at-top
  reference, _ = test_weights.save_tiny_clip(tmp_path, 'sd1')
  reference.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'out_proj', 'fc1'],
                                        init_lora_weights=False))
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.1)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / 'peft'), text_encoder_lora_layers=peft.get_peft_model_state_dict(reference),
      text_encoder_lora_adapter_metadata=reference.peft_config['default'].to_dict())
  ids = np.random.default_rng(0).integers(0, reference.config.vocab_size, size=(2, 16))
  return reference, tmp_path / 'peft' / 'pytorch_lora_weights.safetensors', ids


def _run_clip(model, ids):
  torch = torch_reference.import_torch()
  with torch.no_grad():
    return model(torch.from_numpy(ids).long()).last_hidden_state.numpy()


def test_text_encoder_adapters_import_from_diffusers_older_and_kohya_names_and_export_back(tmp_path):
  """A CLIP text encoder's LoRA (`text_encoder.*`, `lora_te_*`) merges into our CLIP TextTransformer exactly, and
  our export loads into a fresh CLIPTextModel through diffusers with the same output."""
  reference, peft_file, ids = _clip_reference(tmp_path)
  expected = _run_clip(reference, ids)
  model, base = clip.load_text_encoder(tmp_path)  # the encoder saved before the adapter
  run = lambda params: np.asarray(model.apply({'params': params}, jnp.asarray(ids, jnp.int32)))
  assert np.abs(run(base) - expected).max() > 0.05  # the adapters matter
  config = lora_config()
  unet_params = abstract_state(config).frozen['unet']
  read = lambda path: weights_lora.read(path, unet_params, config.ldm.unet, base)
  unet_adapters, adapters = read(peft_file)
  assert not unet_adapters and sorted(lora.adapter_paths(adapters)) == [
      (f'layer_{i}_{part}',) for i in range(3) for part in ('ff1', 'out', 'qkv')]
  assert not np.any(adapters['layer_0_qkv']['up'][1])  # k_proj: no adapter in the file, zeros here
  np.testing.assert_allclose(run(lora.merge(base, adapters, 1.0)), expected, atol=test_weights.ATOL)

  # The same adapters under diffusers' older names (the scale 2 folded into up) and kohya's (with alphas).
  state = load_file(str(peft_file))
  modules = sorted({k[len('text_encoder.'):-len('.lora_A.weight')] for k in state if k.endswith('.lora_A.weight')})
  assert all(m.startswith('encoder.layers.') for m in modules)  # transformers 5 names: no text_model.
  linear_layer, processor, kohya = {}, {}, {}
  for module in modules:
    down, up = state[f'text_encoder.{module}.lora_A.weight'], state[f'text_encoder.{module}.lora_B.weight']
    m = f'text_model.{module}'  # as files written with transformers 4 (every published one) name them
    linear_layer.update({f'text_encoder.{m}.lora_linear_layer.down.weight': down,
                         f'text_encoder.{m}.lora_linear_layer.up.weight': 2 * up})
    attn = m.replace('self_attn.q_proj', 'self_attn.to_q').replace('self_attn.v_proj', 'self_attn.to_v').replace(
        'self_attn.out_proj', 'self_attn.to_out')
    suffix = '_lora' if 'self_attn' in m else '.lora'
    processor.update({f'text_encoder.{attn}{suffix}.down.weight': down,
                      f'text_encoder.{attn}{suffix}.up.weight': 2 * up})
    stem = 'lora_te_' + m.replace('.', '_')
    kohya.update({f'{stem}.lora_down.weight': down, f'{stem}.lora_up.weight': up,
                  f'{stem}.alpha': np.array(8.0, np.float32)})
  for name, tensors in (('linear_layer', linear_layer), ('processor', processor), ('kohya', kohya)):
    save_file(tensors, str(tmp_path / f'{name}.safetensors'))
    np.testing.assert_allclose(run(lora.merge(base, read(tmp_path / f'{name}.safetensors')[1], 1.0)), expected,
                               atol=test_weights.ATOL, err_msg=name)

  # Our export, both formats, loads into a fresh CLIPTextModel through diffusers with the same output.
  diffusers = torch_reference.import_diffusers()
  import transformers  # pylint: disable=g-import-not-at-top
  for fmt in weights_lora.FORMATS:
    out = tmp_path / f'export_{fmt}'
    weights_lora.write(out / 'pytorch_lora_weights.safetensors', {}, 1.0, config.ldm.unet, fmt, adapters)
    fresh = transformers.CLIPTextModel.from_pretrained(str(tmp_path / 'text_encoder')).eval()
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(out))
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas=alphas,
                                                                   text_encoder=fresh, prefix='text_encoder')
    np.testing.assert_allclose(_run_clip(fresh, ids), expected, atol=test_weights.ATOL, err_msg=fmt)


def test_a_stable_diffusion_lora_exports_its_clip_adapters_and_reads_them_back(tmp_path):
  """With a CLIP text encoder (an SD folder) the stage's export holds the UNet's and the text encoder's adapters
  under diffusers' and kohya's names, and they read back as the trained ones with their scale folded in."""
  test_weights.save_tiny_stable_diffusion(tmp_path / 'sd')
  shipped = shipped_configs.load('lora', f'folder={tmp_path / "sd"},smoke,text')  # configs/lora.py on SD
  assert shipped.ldm.init_from == str(tmp_path / 'sd') and shipped.ldm.conditioning.kind == 'clip'
  assert tuple(shipped.ldm.lora.text_targets) == TEXT_TARGETS and shipped.ldm.lora.rank == 4
  assert not validate.problems(shipped)
  config = sd_finetune.get_config(f'folder={tmp_path / "sd"},smoke')
  config.ldm.lora.update(rank=4, alpha=2.0, text_targets=TEXT_TARGETS + ('fc1', 'fc2'))
  _, _, init = ldm.create(config, {'shape': [4, 4, 8], 'kind': 'kl', 'scale_factor': 0.3})
  state = unbox(jax.jit(init)(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)  # trained adapters: up no longer zero
  state = state.replace(ema_params=jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                                state.ema_params))
  ldm.export_lora(config, str(tmp_path / 'workdir'), state)
  for name in ('pytorch_lora_weights.safetensors', 'lora_kohya.safetensors'):
    path = tmp_path / 'workdir' / 'ldm' / 'lora' / name
    keys = load_file(str(path))
    text_keys = [k for k in keys if k.startswith(('text_encoder.', 'lora_te_'))]
    # 3 layers x (q, k, v, out, fc1, fc2) x (down, up), and kohya's alphas.
    assert len(text_keys) == 3 * 6 * (2 if 'pytorch' in name else 3), name
    unet_adapters, text_adapters = weights_lora.read(path, state.frozen['unet'], config.ldm.unet, state.frozen['cond'])
    for ours, trained in ((unet_adapters, state.ema_params['lora']), (text_adapters, state.ema_params['lora_cond'])):
      got, want = lora.adapter_paths(ours), lora.adapter_paths(trained)
      assert sorted(got) == sorted(want)
      for module, adapter in want.items():
        np.testing.assert_allclose(got[module]['down'], adapter['down'], atol=1e-6)
        np.testing.assert_allclose(got[module]['up'], 0.5 * adapter['up'], atol=1e-6)  # alpha / rank


def test_a_file_for_another_model_is_refused_by_name(tmp_path):
  config = lora_config()
  state = abstract_state(config)
  save_file({'lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight': np.zeros((4, 32), np.float32)},
            str(tmp_path / 'te.safetensors'))
  with pytest.raises(ValueError, match="1 tensors are not adapters of this model.*kind='clip'"):
    weights_lora.read(tmp_path / 'te.safetensors', state.frozen['unet'], config.ldm.unet)  # no CLIP given
  save_file({'lora_te_text_model_encoder_layers_5_self_attn_q_proj.lora_down.weight': np.zeros((4, 32), np.float32)},
            str(tmp_path / 'te5.safetensors'))
  with pytest.raises(ValueError, match='1 tensors are not adapters of this model'):  # the encoder has 1 layer
    weights_lora.read(tmp_path / 'te5.safetensors', state.frozen['unet'], config.ldm.unet, state.frozen['cond'])
  name = weights_unet.diffusers_key(sorted(lora.adapter_paths(state.params['lora']))[0] + ('kernel',), 1)
  save_file({f'unet.{name}.lora_A.weight': np.zeros((4, 7), np.float32),
             f'unet.{name}.lora_B.weight': np.zeros((64, 4), np.float32)}, str(tmp_path / 'wrong.safetensors'))
  with pytest.raises(ValueError, match=f'the adapter of {name} makes a kernel of'):
    weights_lora.read(tmp_path / 'wrong.safetensors', state.frozen['unet'], config.ldm.unet)


@pytest.mark.slow
def test_the_ldm_stage_trains_a_lora_writes_both_files_and_the_sample_stage_merges_one(stage_1, tmp_path, tfds_dir):
  """Through the entry point, on the scale-out tests' stage 1: 3 LoRA steps on the reference run's trained ldm
  (`ldm.init_from` a workdir of ours), then that model sampled with and without the exported file."""
  base, reference, _ = stage_1
  workdir = tmp_path / 'lora'
  shutil.copytree(base, workdir)
  result = scale_out.main(workdir, tfds_dir, '--stage=ldm', '--config.ldm.total_steps=3', '--config.ldm.lora.rank=4',
                          '--config.ldm.lora.alpha=4', f'--config.ldm.init_from={reference}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Read the trained ldm of {reference} at step {scale_out.STEPS}' in result.stderr
  assert 'Initialised the conditioning encoder from' in result.stderr  # the base: its UNet and text encoder
  files = {name: load_file(str(workdir / 'ldm' / 'lora' / name))
           for name in ('pytorch_lora_weights.safetensors', 'lora_kohya.safetensors')}
  diffusers_keys = [k for k in files['pytorch_lora_weights.safetensors'] if k.endswith('.lora_A.weight')]
  assert diffusers_keys and all(k.startswith('unet.') and '.attn' in k for k in diffusers_keys)
  alphas = [v for k, v in files['lora_kohya.safetensors'].items() if k.endswith('.alpha')]
  assert len(alphas) == len(diffusers_keys) and all(a.shape == () and a == 4 for a in alphas)
  assert any(np.any(v) for k, v in files['pytorch_lora_weights.safetensors'].items() if 'lora_B' in k)  # trained
  # The checkpoint holds the adapters only (with their two Adam moments and EMA; the step, Adam's count and the
  # schedule's), not the frozen base.
  saved = ocp.StandardCheckpointer().restore(workdir / 'ldm' / 'checkpoints' / '3' / 'state')
  adapters = sum(v.size for v in files['pytorch_lora_weights.safetensors'].values())
  assert saved.get('frozen') is None and sum(np.size(x) for x in jax.tree.leaves(saved)) == 4 * adapters + 3
  # A resume imports the frozen base again and carries on.
  result = scale_out.main(workdir, tfds_dir, '--stage=ldm', '--config.ldm.total_steps=4', '--config.ldm.lora.rank=4',
                          '--config.ldm.lora.alpha=4', f'--config.ldm.init_from={reference}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'from step 3 to 4' in result.stderr and 'Initialised the UNet from' in result.stderr

  sample = ('--stage=sample', '--config.sampling.num_steps=2', '--config.sampling.seeds=(0,)',
            "--config.sampling.prompts=('a large red circle in the center',)", '--config.sampling.batch_size=8')
  lora_file = workdir / 'ldm' / 'lora' / 'lora_kohya.safetensors'
  images = []
  for extra in ((), (f"--config.sampling.loras=('{lora_file}',)", '--config.sampling.lora_weights=(3000.0,)')):
    out = tmp_path / f'sample_{len(images)}'
    shutil.copytree(reference, out)
    result = scale_out.main(out, tfds_dir, *sample, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    images.append(np.load(out / 'samples' / 'samples.npz')['images'].astype(int))
  assert 'Merged the LoRA files' in result.stderr
  # Three steps move the adapters little: amplified 3000 times they change the image (measured 0.55 levels).
  assert np.abs(images[0] - images[1]).mean() > 0.2
