"""The `latents` stage: encodes every example of the configured splits once with the frozen first stage, with
its caption, label, layout, segmentation map or control image, and the concat conditions of
`ldm.conditioning.concat` (low-res image, or masked-image latent and mask)."""

import jax
import numpy as np

from latent_diffusion import parallel
from latent_diffusion.data import input_pipeline
from latent_diffusion.data import latent_store
from latent_diffusion.diffusion import concat as concat_lib
from latent_diffusion.models import autoencoder as autoencoder_lib
from latent_diffusion.models import tiling
from latent_diffusion.training import autoencoder as autoencoder_stage
from latent_diffusion.training import checkpoint


# What the store keeps of each example besides its latent, when the data has it.
CONDITIONING_KEYS = ('caption', 'label', 'boxes', 'object_labels', 'segmentation', 'control')


def is_done(config, workdir):
  """Every split is complete and made by the newest stage-1 checkpoint (a stale store is not done: `run`
  then refuses it rather than mixing latents of two autoencoders)."""
  ae_step = checkpoint.latest_saved_step(autoencoder_stage.checkpoint_dir(workdir))
  for split in config.latents.splits:
    directory = latent_store.split_dir(workdir, split)
    if not latent_store.is_complete(directory) or latent_store.read_metadata(directory)['autoencoder_step'] != ae_step:
      return False
  return True


def measure_scale(arrays, kind, seed=0):
  """Local (sum, sum of squares, count) of z: sampled from the KL posterior moments, or the VQ latent itself."""
  latent = arrays['latent'].astype(np.float64)
  if kind == 'kl':
    mean, logvar = np.split(latent, 2, axis=-1)
    latent = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * np.random.default_rng(seed).normal(size=mean.shape)
  return np.array([latent.sum(), (latent**2).sum(), latent.size])


def encode_mode(model, params, x, kind, tiles):
  """The first stage's latent of images x, its posterior mode: KL's mean, VQ's pre-quantisation latent."""
  encoded = tiling.encode(model, params, x, tiles)
  return autoencoder_lib.DiagonalGaussian(encoded).mode() if kind == 'kl' else encoded


def make_encode(model, kind, concat, tiles):
  """A jitted (params, images, masks) -> {'latent': ..., + the concat conditions} for the store; `tiles`: the
  autoencoder.tiling section."""
  concat_lib.check(concat)

  def encode(params, x, masks):
    out = {'latent': tiling.encode(model, params, x, tiles)}
    size = out['latent'].shape[1]
    if concat == 'low_res':
      out['low_res'] = concat_lib.area_downsample(x, size)
    elif concat == 'inpainting':
      out['masked_latent'] = encode_mode(model, params, x * (1 - masks), kind, tiles)
      out['inpaint_mask'] = concat_lib.area_downsample(masks, size)
    return out
  return jax.jit(encode)


def check_data(config):
  """Layout and semantic models need the data features their conditions are stored from."""
  if config.ldm.conditioning.kind == 'layout' and not (config.data.objects_key and config.data.max_objects > 0):
    raise ValueError("ldm.conditioning.kind='layout' stores object boxes: set data.objects_key (a sequence "
                     "feature with 'bbox' and 'label', e.g. 'objects') and data.max_objects > 0.")
  if config.ldm.conditioning.concat == 'segmentation' and not config.data.segmentation_key:
    raise ValueError("ldm.conditioning.concat='segmentation' stores segmentation maps: set data.segmentation_key "
                     "(a class-id image feature, e.g. 'segmentation').")


def run(config, workdir):
  """Writes WORKDIR/latents/<split>/ for each of `latents.splits`; restarts skip complete shards."""
  mesh = parallel.create_mesh(config.mesh)
  batch_size = config.latents.batch_size
  parallel.check_batch_size(batch_size, mesh)
  model, params, ae_step = autoencoder_stage.load_trained(config, workdir, mesh)
  kind = config.autoencoder.model.kind
  concat = config.ldm.conditioning.concat
  check_data(config)
  encode = make_encode(model, kind, concat, config.autoencoder.tiling)
  for split in config.latents.splits:
    directory = latent_store.split_dir(workdir, split)
    existing = latent_store.read_metadata(directory)
    if existing:
      latent_store.check_source(existing, ae_step, directory)

    skipped_before = input_pipeline.skipped_counts()
    plan = input_pipeline.store_shards(config.data, batch_size, split, config.latents.examples_per_shard)

    def encode_shard(index, plan=plan):
      position, batches = plan[index]
      for batch in batches():
        size = len(batch['image'])
        masks = np.zeros((size, 1, 1, 1), np.float32)
        if concat == 'inpainting':
          masks = concat_lib.box_masks(config.seed, jax.process_index(), np.arange(position, position + size),
                                       config.data.resolution)
        position += size
        inputs = input_pipeline.to_global({'image': batch['image'], 'masks': masks}, mesh)
        encoded = parallel.to_host_local(encode(params, inputs['image'], inputs['masks']), mesh)
        keep = batch['mask']
        conditioning = {k: batch[k][keep] for k in CONDITIONING_KEYS if k in batch}
        if concat == 'segmentation':
          concat_lib.check_segmentation(conditioning['segmentation'], config.ldm.conditioning.segmentation_classes)
        if 'caption' in conditioning:
          conditioning['caption'] = conditioning['caption'].astype(np.bytes_)  # npz stores no objects
        yield {**{k: v[keep] for k, v in encoded.items()}, **conditioning}

    names, sizes = latent_store.write_shards(directory, num_shards=len(plan), encode_shard=encode_shard,
                                             dtype=config.latents.dtype)
    first = latent_store.read_shard(directory, latent_store.shard_name(jax.process_index(), 0),
                                    config.latents.dtype)
    scale = config.latents.scale_factor
    if scale <= 0:  # scale_by_std: 1 / std(z) over the first shard of every host
      total, squares, count = parallel.to_host(measure_scale(first, kind)[None]).sum(0)
      scale = float(1.0 / np.sqrt(squares / count - (total / count) ** 2))
    latent_store.write_metadata(directory, {
        'split': split, 'kind': kind, 'autoencoder_step': ae_step, 'scale_factor': scale,
        'examples_per_shard': config.latents.examples_per_shard, 'shards': names, 'sizes': sizes,
        'count': sum(sizes), 'skipped': input_pipeline.skipped_counts(since=skipped_before, all_hosts=True),
        'shape': list(first['latent'].shape[1:]),
        'autoencoder': config.autoencoder.model.to_dict(), 'dtype': config.latents.dtype, 'concat': concat})
