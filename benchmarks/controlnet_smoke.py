r"""A ControlNet against its own text-only base, on held-out scenes: each of the first N stored validation examples
drawn by both from its caption (same seed, guidance and sampler), the ControlNet also from its segmentation map;
prints the prompt agreement of each (objects found in the prompted colour, and at the prompted place, one of 5
regions) and how closely each object matches the held-out scene whose map steered it (the IoU of its pixels
with the real image's, its centre within 4 px), with the real images' own scores as the ceiling; writes a grid:
a row per scene with its map, the ControlNet's sample, the base's.

  python -m latent_diffusion.main --config=configs/txt2img.py:smoke --workdir=/tmp/ldm
  python -m latent_diffusion.main --config=configs/controlnet.py:smoke,base=/tmp/ldm --workdir=/tmp/controlnet
  python benchmarks/controlnet_smoke.py --controlnet=/tmp/controlnet --base=/tmp/ldm --out=docs/controlnet_smoke.png
"""

import argparse
import json

import numpy as np
from PIL import Image
from PIL import ImageDraw

from latent_diffusion import parallel
from latent_diffusion import workdir as workdir_lib
from latent_diffusion.data import captioned_shapes
from latent_diffusion.data import input_pipeline
from latent_diffusion.data import latent_store
from latent_diffusion.diffusion import generate
from latent_diffusion.evaluation import prompt_agreement
from latent_diffusion.models import controlnet as controlnet_lib
from latent_diffusion.training import ldm


def sampler(workdir, config):
  """A function requests -> uint8 images for the trained ldm of a workdir run with `config`."""
  mesh = parallel.create_mesh(config.mesh)
  metadata = latent_store.read_metadata(latent_store.split_dir(workdir, config.latents.splits[0]))
  unet, conditioner, params, _ = ldm.load_trained(config, workdir, mesh, metadata)
  generator, ae_params = ldm.make_generator(config, workdir, mesh, unet, conditioner, metadata)
  return lambda requests: generator(params, ae_params, requests)


def object_placement(samples, reals, captions, tolerance=prompt_agreement.TOLERANCE, near=4):
  """Where each prompted object is drawn against where the held-out scene (whose map is the control) has it:
  the mean IoU of the pixels in its colour in the sample and in the real image (0 when the sample lacks the
  colour), and the fraction whose centre in the sample is within `near` pixels of the real one."""
  ious, close = [], []
  for sample, real, caption in zip(samples, reals, captions):
    for colour, *_ in captioned_shapes.parse_caption(caption):
      rgb = np.array(captioned_shapes.COLOURS[colour])
      masks = [np.all(np.abs(image.astype(int) - rgb) <= tolerance, axis=-1) for image in (sample, real)]
      union = (masks[0] | masks[1]).sum()
      ious.append((masks[0] & masks[1]).sum() / max(union, 1))
      centres = [np.argwhere(m).mean(0) if m.sum() >= 4 else None for m in masks]
      close.append(centres[0] is not None and centres[1] is not None
                   and np.linalg.norm(centres[0] - centres[1]) <= near)
  return {'mean_iou': float(np.mean(ious)), f'centre_within_{near}px': float(np.mean(close)), 'objects': len(ious)}


def real_images(config, split, num):
  """The first `num` images of `split` as uint8 and their captions, in the order the latent store holds them."""
  images, captions = [], []
  for batch in input_pipeline.eval_iterator(config.data, 64, split=split, num_examples=num):
    keep = batch['mask']
    images.append(np.round((batch['image'][keep] + 1) * 127.5).astype(np.uint8))
    captions += [c.decode() for c in batch['caption'][keep]]
  return np.concatenate(images)[:num], captions[:num]


def grid(columns, titles, captions, scale=4):
  """Rows of images, one column per entry of `columns` (uint8 [rows, H, W, 3] each, under its title), upscaled
  `scale` times, each row's caption to its right."""
  cell = columns[0].shape[1] * scale
  canvas = Image.new('RGB', (len(columns) * cell + 600, len(captions) * cell + 20), 'white')
  draw = ImageDraw.Draw(canvas)
  for i, title in enumerate(titles):
    draw.text((i * cell + 4, 4), title, fill='black')
  for row, caption in enumerate(captions):
    for column, images in enumerate(columns):
      canvas.paste(Image.fromarray(images[row]).resize((cell, cell), Image.NEAREST), (column * cell, 20 + row * cell))
    draw.text((len(columns) * cell + 8, 20 + row * cell + cell // 2 - 6), caption, fill='black')
  return canvas


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--controlnet', required=True)
  parser.add_argument('--base', required=True)
  parser.add_argument('--num', type=int, default=256)
  parser.add_argument('--rows', type=int, default=8)
  parser.add_argument('--out', default='docs/controlnet_smoke.png')
  args = parser.parse_args()
  config = workdir_lib.load_config(args.controlnet)
  draw_controlled = sampler(args.controlnet, config)
  # The base as the ControlNet run read it (its architecture), from its own workdir's checkpoints.
  base_config = config.copy_and_resolve_references()
  base_config.autoencoder.pretrained, base_config.ldm.init_from, base_config.ldm.controlnet.kind = '', '', ''
  draw_base = sampler(args.base, base_config)
  store, _ = latent_store.load(latent_store.split_dir(args.controlnet, config.sampling.condition_split))
  captions = [c.decode() for c in store['caption'][:args.num]]
  seeds = np.arange(args.num, dtype=np.int32)
  scales = np.full(args.num, config.sampling.guidance_scales[0], np.float32)
  controlled = draw_controlled(generate.Requests(list(range(args.num)), seeds, scales))
  base = draw_base(generate.Requests(captions, seeds, scales))
  result = {'num_samples': args.num, 'guidance_scale': float(scales[0]), 'sampler': config.sampling.sampler,
            'num_steps': config.sampling.num_steps}
  reals, real_captions = real_images(config, config.sampling.condition_split, args.num)
  assert real_captions == captions, 'the latent store and the data disagree on the order of the examples'
  for name, images in (('controlnet', controlled), ('text_only', base), ('real', reals)):
    result[name] = {**prompt_agreement.prompt_agreement(images, captions),
                    **object_placement(images, reals, captions)}
  print(json.dumps(result, indent=1))
  first = {k: v[:args.rows] for k, v in store.items() if k in ('segmentation', 'control')}
  maps = np.asarray(controlnet_lib.control_image(first, config.ldm.controlnet.kind))
  grid([(maps * 255).astype(np.uint8), controlled[:args.rows], base[:args.rows]],
       ('control map', 'ControlNet', 'text only'), captions[:args.rows]).save(args.out)


if __name__ == '__main__':
  main()
