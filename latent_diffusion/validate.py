"""The whole config checked before any stage runs, so a typo in a late stage's field costs no compute.

`problems(config, mesh)` lists every problem found (choices, values that must divide, files, cross-field rules);
`check` raises one ValueError holding all of them. Each check reuses the constants of the code that reads the
field, so the two cannot drift apart.
"""

import math

from etils import epath
import jax
import numpy as np

from latent_diffusion import parallel
from latent_diffusion import programs
from latent_diffusion import stages
from latent_diffusion.data import captioned_shapes
from latent_diffusion.data import latent_store
from latent_diffusion.data import shards
from latent_diffusion.diffusion import concat as concat_lib
from latent_diffusion.diffusion import generate
from latent_diffusion.diffusion import objective
from latent_diffusion.diffusion import sampling
from latent_diffusion.diffusion import schedules
from latent_diffusion.evaluation import features
from latent_diffusion.evaluation import inception
from latent_diffusion.losses import autoencoder as autoencoder_losses
from latent_diffusion.models import attention
from latent_diffusion.models import autoencoder as autoencoder_models
from latent_diffusion.models import conditioning
from latent_diffusion.models import controlnet as controlnet_lib
from latent_diffusion.models import lora
from latent_diffusion.models import tiling
from latent_diffusion.models import unet as unet_lib
from latent_diffusion.training import evaluate
from latent_diffusion.training import ldm as ldm_stage
from latent_diffusion.training import loop
from latent_diffusion.training import train_state
from latent_diffusion.weights import inception as weights_inception


class _Problems(list):
  """The problems found so far, with helpers that each add at most one line."""

  def choice(self, path, value, choices):
    if value not in choices:
      self.append(f'{path}={value!r} is not one of {", ".join(repr(c) for c in choices)}.')

  def number(self, path, value, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    """A finite number in [low, high] (open ends where asked); `integer` also requires an int."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      lo = '' if low is None else f'{"(" if low_open else "["}{low}'
      hi = '' if high is None else f'{high}{")" if high_open else "]"}'
      kind = 'an integer' if integer else 'a finite number'
      where = f' in {lo or "(-inf"}, {hi or "inf)"}' if low is not None or high is not None else ''
      self.append(f'{path}={value!r} must be {kind}{where}.')

  def divides(self, path, value, divisor, why):
    if divisor and value % divisor:
      self.append(f'{path}={value} is not divisible by {divisor} ({why}).')

  def file(self, path, value, *, directory=False, fix='fix the path or leave it empty.'):
    if value and not (epath.Path(value).is_dir() if directory else epath.Path(value).exists()):
      self.append(f'{path}={value!r}: no such {"directory" if directory else "file or folder"}; {fix}')

  def guard(self, fn):
    """Runs a check of the code that reads a field; its ValueError, FileNotFoundError or TypeError becomes a problem."""
    try:
      fn()
    except (ValueError, FileNotFoundError, TypeError) as e:
      self.append(str(e))


def _data(found, d):
  """Sharded files: they exist, their format is known, the filters are limits, held-out files for evaluation."""
  found.choice('data.files_format', d.files_format, ('',) + shards.FORMATS)
  for field in ('min_size', 'min_caption_length', 'max_caption_length'):
    found.number(f'data.filters.{field}', d.filters[field], low=0, integer=True)
  found.number('data.filters.max_aspect_ratio', d.filters.max_aspect_ratio, low=0)
  for field in ('files', 'eval_files'):
    if d[field]:
      found.guard(lambda field=field: shards.file_format(shards.list_files(d[field], f'data.{field}'),
                                                         d.files_format if d.files_format in shards.FORMATS else ''))
  if d.files and not d.eval_files:
    found.append(f"data.files='{d.files}' is set but data.eval_files is empty: the autoencoder's evaluation, the "
                 f"latents of data.eval_split='{d.eval_split}' and the eval stage read it; set data.eval_files to a "
                 'few held-out shards.')


def _autoencoder(found, c):
  a = c.autoencoder
  found.choice('autoencoder.model.kind', a.model.kind, autoencoder_models.KINDS)
  found.choice('autoencoder.loss.disc_loss', a.loss.disc_loss, tuple(autoencoder_losses.DISC_LOSSES))
  found.number('autoencoder.loss.disc_factor', a.loss.disc_factor, low=0)
  found.number('autoencoder.optimizer.learning_rate', a.optimizer.learning_rate, low=0, low_open=True)
  found.choice('autoencoder.optimizer.decay', a.optimizer.decay, train_state.LR_DECAYS)
  found.number('autoencoder.ema_decay', a.ema_decay, low=0, high=1, high_open=True)
  found.number('autoencoder.total_steps', a.total_steps, low=0, integer=True)
  found.file('autoencoder.pretrained', a.pretrained)
  found.file('autoencoder.loss.lpips_weights', a.loss.lpips_weights)
  found.number('autoencoder.model.norm_groups', a.model.norm_groups, low=1, integer=True)
  for width in sorted({a.model.ch * m for m in a.model.ch_mult}):
    found.divides('autoencoder.model.ch x ch_mult', width, a.model.norm_groups,
                  'the GroupNorm groups, autoencoder.model.norm_groups')
  levels = [a.model.resolution // 2**level for level in range(len(a.model.ch_mult))]
  unplaced = sorted(set(a.model.attn_resolutions) - set(levels))
  if unplaced:
    found.append(f'autoencoder.model.attn_resolutions={tuple(a.model.attn_resolutions)}: {unplaced} name no level '
                 f'of a first stage for autoencoder.model.resolution={a.model.resolution} (its feature sizes: '
                 f'{levels}); choose among those.')
  factor = autoencoder_models.downsampling_factor(a.model.ch_mult)
  found.divides('data.resolution', c.data.resolution, factor,
                f"the first stage downsamples by {factor}; use a multiple of {factor} or another autoencoder")
  return factor


def _tiling(found, t, latent_sizes):
  """The tiled first stage: crops that tile every latent it encodes or decodes."""
  found.number('autoencoder.tiling.size', t.size, low=0, integer=True)
  if t.size:
    found.number('autoencoder.tiling.stride', t.stride, low=1, high=t.size, integer=True)
    found.number('autoencoder.tiling.min_weight', t.min_weight, low=0, high=0.5, low_open=True)
    found.number('autoencoder.tiling.max_weight', t.max_weight, low=t.min_weight, high=0.5)
    if isinstance(t.stride, int) and 1 <= t.stride <= t.size:
      for side in filter(None, latent_sizes):
        found.guard(lambda side=side: tiling.crop_starts(side, t.size, t.stride))


def _ldm(found, c, latent_size):
  u, cond, opt = c.ldm.unet, c.ldm.conditioning, c.ldm.optimizer
  found.choice('ldm.unet.attention', u.attention, attention.IMPLEMENTATIONS)
  found.choice('ldm.unet.dtype', u.dtype, unet_lib.COMPUTE_DTYPES)
  for kind in filter(None, u.remat.split(',')) if u.remat != 'all' else ():
    found.choice('ldm.unet.remat', kind, ('', 'all') + tuple(sorted(unet_lib.REMAT_KINDS)))
  if not hasattr(jax.checkpoint_policies, u.remat_policy):
    found.append(f'ldm.unet.remat_policy={u.remat_policy!r} is not a jax.checkpoint_policies name (e.g. '
                 "'nothing_saveable', 'dots_saveable').")
  found.choice('ldm.parameterization', c.ldm.parameterization, objective.PARAMETERIZATIONS)
  found.choice('ldm.loss', c.ldm.loss, objective.LOSSES)
  found.choice('ldm.schedule.kind', c.ldm.schedule.kind, schedules.KINDS)
  found.choice('ldm.conditioning.kind', cond.kind, conditioning.KINDS)
  found.choice('ldm.conditioning.concat', cond.concat, concat_lib.KINDS)
  found.number('ldm.optimizer.learning_rate', opt.learning_rate, low=0, low_open=True)
  found.number('ldm.optimizer.warmup_steps', opt.warmup_steps, low=0, integer=True)
  found.choice('ldm.optimizer.decay', opt.decay, train_state.LR_DECAYS)
  found.number('ldm.optimizer.weight_decay', opt.weight_decay, low=0)
  found.number('ldm.optimizer.grad_clip', opt.grad_clip, low=0)
  found.number('ldm.optimizer.warmup_from', opt.warmup_from, low=0, high=1)
  found.number('ldm.optimizer.decay_steps', opt.decay_steps, low=0, integer=True)
  found.number('ldm.optimizer.decay_to', opt.decay_to, low=0, high=1)
  found.number('ldm.ema_decay', c.ldm.ema_decay, low=0, high=1, high_open=True)
  found.number('ldm.p_uncond', c.ldm.p_uncond, low=0, high=1, high_open=True)
  found.number('ldm.min_snr_gamma', c.ldm.min_snr_gamma, low=0)
  found.number('ldm.total_steps', c.ldm.total_steps, low=0, integer=True)
  found.number('ldm.schedule.num_timesteps', c.ldm.schedule.num_timesteps, low=1, integer=True)
  found.file('ldm.init_from', c.ldm.init_from)
  found.number('ldm.lora.rank', c.ldm.lora.rank, low=0, integer=True)
  found.number('ldm.lora.alpha', c.ldm.lora.alpha, low=0)
  _lora_text_targets(found, c)
  down = 2 ** (len(u.channel_mult) - 1)
  found.divides('the latent size (data.resolution / the first stage factor)', latent_size, down,
                f'the UNet downsamples {len(u.channel_mult) - 1} times; change data.resolution or '
                'ldm.unet.channel_mult')
  if c.sampling.latent_size:
    found.divides('sampling.latent_size', c.sampling.latent_size, down, 'the UNet downsamples by that much')
  field, heads = ('num_head_channels', u.num_head_channels) if u.num_head_channels > 0 else ('num_heads', u.num_heads)
  widths = sorted({u.model_channels * mult for mult in u.channel_mult})
  if heads < 1 or any(w % heads for w in widths):
    found.append(f'ldm.unet.{field}={heads} does not divide the UNet\'s widths {widths} (ldm.unet.model_channels '
                 'x channel_mult); choose a divisor of them.')
  _conditioning(found, c)
  _controlnet(found, c)


def _controlnet(found, c):
  """ldm.controlnet: a known kind with its class-id maps or control images in the data, an embedding that downsamples by the first
  stage's factor, not combined with LoRA, and a ControlNetModel folder to start from if one is named."""
  cn = c.ldm.controlnet
  found.choice('ldm.controlnet.kind', cn.kind, controlnet_lib.KINDS)
  found.file('ldm.controlnet.init_from', cn.init_from, directory=True)
  if not cn.kind:
    return
  if cn.kind == 'image' and not c.data.control_folder:
    found.append("ldm.controlnet.kind='image' reads each image's control image: set data.control_folder (with "
                 'data.folder).')
  elif cn.kind in ('segmentation', 'edges') and not c.data.segmentation_key:
    found.append(f"ldm.controlnet.kind='{cn.kind}' draws its control images from class-id maps: set "
                 "data.segmentation_key (e.g. 'segmentation').")
  factor = autoencoder_models.downsampling_factor(c.autoencoder.model.ch_mult)
  if 2 ** (len(cn.embedding_channels) - 1) != factor:
    found.append(f'ldm.controlnet.embedding_channels={tuple(cn.embedding_channels)} downsamples the control image '
                 f'{2 ** (len(cn.embedding_channels) - 1)}x, but the first stage\'s factor is {factor}; give '
                 f'{factor.bit_length()} widths (e.g. {(16, 32, 96, 256)[:factor.bit_length()]}).')
  if c.ldm.lora.rank:
    found.append('ldm.controlnet and ldm.lora both adapt the frozen UNet; train one at a time (set ldm.lora.rank=0 '
                 "or ldm.controlnet.kind='').")


def _conditioning(found, c):
  cond = c.ldm.conditioning
  if cond.kind in ('text', 'layout'):
    found.number('ldm.conditioning.max_length', cond.max_length, low=1, integer=True)
    found.number('ldm.conditioning.vocab_size', cond.vocab_size, low=0, integer=True)
    found.number('ldm.conditioning.head_dim', cond.head_dim, low=0, integer=True)
    found.number('ldm.conditioning.token_conv', cond.token_conv, low=0, high=cond.max_length, integer=True)
    if cond.depth:
      found.number('ldm.conditioning.num_heads', cond.num_heads, low=1, integer=True)
      if not cond.head_dim:
        found.divides('ldm.conditioning.width', cond.width, cond.num_heads, 'ldm.conditioning.num_heads, or set '
                      'ldm.conditioning.head_dim')
  if cond.kind == 'text':
    found.choice('ldm.conditioning.tokenizer', cond.tokenizer, conditioning.TOKENIZERS)
    if cond.tokenizer == 'wordpiece' and not cond.vocab_file:
      found.append("ldm.conditioning.tokenizer='wordpiece' needs ldm.conditioning.vocab_file (one token per line).")
    found.file('ldm.conditioning.vocab_file', cond.vocab_file)
  if cond.kind == 'clip':
    if not cond.pretrained:
      found.append("ldm.conditioning.kind='clip' needs ldm.conditioning.pretrained (a Stable Diffusion or "
                   'CLIPTextModel folder).')
    found.file('ldm.conditioning.pretrained', cond.pretrained, directory=True)
  if cond.kind == 'class' and cond.num_classes < 1:
    found.append("ldm.conditioning.kind='class' needs ldm.conditioning.num_classes >= 1 (with the null class).")
  if cond.kind == 'layout' and not c.data.objects_key:
    found.append("ldm.conditioning.kind='layout' needs data.objects_key (the feature holding boxes and labels).")
  if cond.kind == 'layout':
    found.choice('ldm.conditioning.layout_tokens', cond.layout_tokens, conditioning.LAYOUT_TOKENS)
    if cond.layout_tokens in conditioning.LAYOUT_TOKENS:
      found.guard(lambda: conditioning.layout_tokenizer(cond))
  if cond.concat == 'segmentation' and not c.data.segmentation_key:
    found.append("ldm.conditioning.concat='segmentation' needs data.segmentation_key (the class-id map).")
  if cond.concat in concat_lib.KINDS:
    found.guard(lambda: concat_lib.num_channels(cond.concat, 0, cond.segmentation_classes))
  found.number('ldm.conditioning.segmentation_map_channels', cond.segmentation_map_channels, low=0, integer=True)
  if cond.segmentation_map_channels and cond.concat != 'segmentation':
    found.append(f'ldm.conditioning.segmentation_map_channels={cond.segmentation_map_channels} maps a segmentation '
                 "map, but ldm.conditioning.concat is not 'segmentation'; set it to 0.")
  if not c.ldm.unet.use_spatial_transformer and cond.kind != 'none':
    found.append(f"ldm.unet.use_spatial_transformer=False has no cross-attention for ldm.conditioning.kind="
                 f"'{cond.kind}'; set it to True or the kind to 'none'.")


def _sampling(found, c):
  s = c.sampling
  found.choice('sampling.sampler', s.sampler, tuple(sorted(generate.SAMPLERS)))
  found.number('sampling.eta', s.eta, low=0)
  for scale in s.guidance_scales:
    found.number('sampling.guidance_scales', scale)
  init, masks = _img2img(found, s)
  for path in s.loras:
    found.file('sampling.loras', path)
  if s.lora_weights and len(s.lora_weights) != len(s.loras):
    found.append(f'sampling.lora_weights has {len(s.lora_weights)} entries for {len(s.loras)} sampling.loras; give '
                 'one per file, or none (1 each).')
  cond = c.ldm.conditioning
  if cond.kind in conditioning.KINDS and cond.concat in concat_lib.KINDS:
    found.guard(lambda: _scored_prompts(c, generate.requests_from_config(s, cond.kind, cond.concat, init, masks,
                                                                        c.ldm.controlnet.kind)))
  _num_steps(found, c, 'sampling.num_steps', s.num_steps, low=1, sampler=s.sampler, steps=s.num_steps)


def _num_steps(found, c, field, value, *, low, sampler, steps):
  """`field` within the schedule's timesteps, and DDIM's timesteps buildable for the `steps` that `sampler` will
  take (what `field` resolves to)."""
  num_timesteps = c.ldm.schedule.num_timesteps
  if not (isinstance(num_timesteps, int) and num_timesteps > 0):
    return
  found.number(field, value, low=low, high=num_timesteps, integer=True)
  if sampler == 'ddim' and isinstance(steps, int) and 0 < steps <= num_timesteps:
    found.guard(lambda: sampling.ddim_timesteps(num_timesteps, steps))


def _lora_text_targets(found, c):
  """ldm.lora.text_targets: CLIP's module names, q/k/v together (our text encoder fuses them), a transformer."""
  targets, kind = tuple(c.ldm.lora.text_targets), c.ldm.conditioning.kind
  if not targets:
    return
  unknown = [t for t in targets if t not in lora.TEXT]
  qkv = {t for t in targets if lora.TEXT.get(t) == 'qkv'}
  if unknown:
    found.append(f'ldm.lora.text_targets has {unknown}; name layers of the text encoder as CLIP does: '
                 f'{tuple(lora.TEXT)}.')
  elif qkv and len(qkv) != 3:
    found.append(f'ldm.lora.text_targets has {sorted(qkv)} alone; our text encoder fuses q, k and v into one '
                 "kernel, so adapt all three ('q_proj', 'k_proj', 'v_proj') or none.")
  elif kind not in conditioning.TEXT_KINDS + ('layout',) or (kind != 'clip' and not c.ldm.conditioning.depth):
    found.append(f"ldm.lora.text_targets needs a text encoder, but ldm.conditioning.kind='{kind}' (depth "
                 f'{c.ldm.conditioning.depth}) has no transformer layers; set ldm.lora.text_targets=().')
  elif not c.ldm.lora.rank:
    found.append('ldm.lora.text_targets is set but ldm.lora.rank=0 (LoRA off); give a rank.')


def _lora_targets(c):
  """ldm.lora.targets name layers of the configured UNet: the LoRA train state's shapes, traced (no compute)."""
  jax.eval_shape(ldm_stage.create(c, programs.latent_metadata(c))[2], jax.random.PRNGKey(0))


def _scored_prompts(c, requests):
  """Text prompts for a `captioned_shapes` model are scored after sampling (prompt agreement): each must be in
  the dataset's grammar, checked here rather than after the sampling compute."""
  cond = c.ldm.conditioning
  if (c.data.name.startswith('captioned_shapes') and cond.kind in conditioning.TEXT_KINDS
      and not generate.conditions_are_stored(cond.kind, cond.concat, c.ldm.controlnet.kind)):
    for prompt in sorted(set(requests.conditions)):
      captioned_shapes.parse_caption(prompt)


def _img2img(found, s):
  """sampling.init_images, strength and mask_images; placeholders of the folders' images for the count check
  (None: unset)."""
  if s.mask_images and not s.init_images:
    found.append('sampling.mask_images needs sampling.init_images, the images whose masked regions are repainted.')
  if not s.init_images:
    return None, None
  found.number('sampling.strength', s.strength, low=0, high=1, low_open=True)
  if s.sampler != 'ddim':
    found.append(f"sampling.init_images (img2img) runs the DDIM sampler, not sampling.sampler='{s.sampler}'; set "
                 "it to 'ddim'.")
  elif isinstance(s.num_steps, int) and isinstance(s.strength, (int, float)) and 0 < s.strength <= 1:
    found.guard(lambda: sampling.img2img_steps(s.num_steps, s.strength))
  return tuple(_placeholders(found, field, s[field]) for field in ('init_images', 'mask_images'))


def _placeholders(found, field, folder):
  if not folder:
    return None
  try:
    return np.zeros((len(features.image_files(folder)), 1, 1, 1), np.float32)
  except (FileNotFoundError, ValueError) as e:
    found.append(f'sampling.{field}: {e}')
    return None


def _eval(found, c):
  e = c.eval
  found.choice('eval.source', e.source, evaluate.SOURCES)
  found.choice('eval.preprocessing', e.preprocessing, inception.PREPROCESSING)
  found.number('eval.num_samples', e.num_samples, low=1, integer=True)
  found.number('eval.precision_recall_k', e.precision_recall_k, low=1, integer=True)
  found.choice('eval.sampler', e.sampler, ('',) + tuple(sorted(generate.SAMPLERS)))
  _num_steps(found, c, 'eval.num_steps', e.num_steps, low=0, sampler=e.sampler or c.sampling.sampler,
             steps=e.num_steps or c.sampling.num_steps)
  found.file('eval.reference_stats', e.reference_stats)
  found.file('eval.inception_weights', e.inception_weights, fix=weights_inception.HINT)


def _kernel_platform(found, implementation, platform):
  needs = 'tpu' if implementation in attention.TPU_KERNELS else 'gpu' if implementation == 'cudnn' else platform
  if needs != platform:
    found.append(f"ldm.unet.attention={implementation!r} runs on {needs.upper()}s only, and this run's devices are "
                 f"{platform.upper()}s; use 'auto' (it picks the fastest that applies) or 'xla'.")


# The batch sizes each stage splits over the mesh's batch shards.
STAGE_BATCHES = {'autoencoder': ('autoencoder.batch_size',), 'latents': ('latents.batch_size',),
                 'ldm': ('ldm.batch_size', 'sampling.batch_size'), 'sample': ('sampling.batch_size',),
                 'eval': ('eval.batch_size', 'sampling.batch_size')}


def _batches(found, c, mesh, run):
  paths = dict.fromkeys(p for stage in run for p in STAGE_BATCHES[stage])
  for path in paths:
    section, field = path.split('.')
    value = c[section][field]
    found.number(path, value, low=1, integer=True)
    if isinstance(value, int) and value > 0:
      found.guard(lambda v=value, p=path: parallel.check_batch_size(v, mesh, p))


def problems(config, mesh=None, stage='all', batches=True):
  """Every problem of `config` (a whole pipeline config) found without compute, as one line each. Batch sizes
  are checked against `mesh` (default: config.mesh over this host's devices) for the stages `stage` runs,
  unless `batches` is False (the planner sets its own)."""
  found = _Problems()
  c = config
  if mesh is None:
    try:
      mesh = parallel.create_mesh(c.mesh)
    except ValueError as e:
      found.append(str(e))
  found.file('data.folder', c.data.folder, directory=True)
  found.file('data.control_folder', c.data.control_folder, directory=True)
  found.number('data.resolution', c.data.resolution, low=1, integer=True)
  _data(found, c.data)
  found.choice('latents.dtype', c.latents.dtype, tuple(latent_store.DTYPES))
  for section in ('autoencoder', 'ldm'):
    found.choice(f'{section}.train_schedule.on_nonfinite', c[section].train_schedule.on_nonfinite,
                 loop.ON_NONFINITE)
    for field in ('log_every', 'checkpoint_every'):
      found.number(f'{section}.train_schedule.{field}', c[section].train_schedule[field], low=1, integer=True)
    found.number(f'{section}.train_schedule.eval_every', c[section].train_schedule.eval_every, low=0,
                 integer=True)  # 0: no periodic evaluation
  factor = _autoencoder(found, c)
  resolution = c.data.resolution
  latent_size = resolution // factor if isinstance(resolution, int) and resolution % factor == 0 else 0
  _tiling(found, c.autoencoder.tiling, (latent_size, c.sampling.latent_size))
  _ldm(found, c, latent_size)
  _sampling(found, c)
  _eval(found, c)
  if not found and isinstance(c.ldm.lora.rank, int) and c.ldm.lora.rank > 0:
    found.guard(lambda: _lora_targets(c))
  if mesh is not None:
    _kernel_platform(found, c.ldm.unet.attention, mesh.devices.flat[0].platform)
    run = stages.selected(stage)
    if c.autoencoder.pretrained:  # imported weights: the autoencoder stage trains nothing
      run = tuple(s for s in run if s != 'autoencoder')
    if batches:
      _batches(found, c, mesh, run)
  return list(dict.fromkeys(found))  # one line per distinct problem, in the order found


def check(config, mesh=None, stage='all', batches=True):
  """Raises one ValueError listing every problem of `config`, before any stage spends compute."""
  found = problems(config, mesh, stage, batches)
  if len(found) == 1:
    raise ValueError(found[0])
  if found:
    raise ValueError(f'{len(found)} problems in the config:\n' + '\n'.join(f'  {p}' for p in found))
