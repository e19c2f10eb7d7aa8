r"""img2img, inpainting and negative prompts on the README's smoke model, measured on held-out scenes.

- img2img (SDEdit): each held-out validation image, re-captioned with every object's colour changed to the next
  palette colour, drawn from the image noised to each `strength`: the edit prompt's agreement (colour, and colour
  at the prompted place) against the image's mean distance to the original, in grey levels.
- inpainting: the held-out images with no object in the centre, the centre square (the middle third) repainted
  to 'a large COLOUR SHAPE in the center': the prompt's agreement, and the kept pixels' distance to the
  original (against the first stage's own reconstruction error there: the floor).
- negative prompts: 'a large SHAPE POSITION', a caption without a colour, drawn with and without the negative
  prompt 'a large red SHAPE POSITION': the fraction of samples with red in them.

  python -m latent_diffusion.main --config=configs/txt2img.py:smoke --workdir=/tmp/ldm
  python benchmarks/editing_smoke.py --workdir=/tmp/ldm [--num=256] [--out=docs/editing_smoke.png]

The grid: a row per held-out scene, the original, its img2img edits at strength 0.5 and 0.75 (to the recoloured
caption on the right), and, for the scenes with an empty centre, the centre inpainted.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import controlnet_smoke  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.data import captioned_shapes  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.diffusion import generate  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.evaluation import prompt_agreement  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.training import autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position

COLOURS = captioned_shapes.COLOUR_NAMES


def recoloured(caption):
  """The caption with every object's colour changed to the next colour of the palette."""
  words = caption.split()
  return ' '.join(COLOURS[(COLOURS.index(w) + 1) % len(COLOURS)] if w in COLOURS else w for w in words)


def agreement(images, prompts):
  scores = prompt_agreement.prompt_agreement(images, prompts)
  return {k: round(scores[k], 3) for k in ('colour', 'colour_position')}


def distance(a, b, where=None):
  """Mean absolute difference in grey levels (0-255), over the pixels where `where` [N, H, W] is true."""
  diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1)
  return round(float(diff.mean() if where is None else diff[where].mean()), 2)


def draw(workdir, config, requests, **sampling):
  """Samples of the trained model with `sampling` fields set (a generator per setting, as the sample stage)."""
  config = config.copy_and_resolve_references()
  config.sampling.update(sampling)
  return controlnet_smoke.sampler(workdir, config)(requests)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num', type=int, default=256)
  parser.add_argument('--strengths', default='0.25,0.5,0.75,1.0')
  parser.add_argument('--rows', type=int, default=8)
  parser.add_argument('--out', default='docs/editing_smoke.png')
  args = parser.parse_args()
  config = workdir_lib.load_config(args.workdir)
  reals, captions = controlnet_smoke.real_images(config, 'validation', args.num)
  init = reals.astype(np.float32) / 127.5 - 1
  seeds = np.arange(args.num, dtype=np.int32)
  scales = np.full(args.num, config.sampling.guidance_scales[0], np.float32)
  result = {'num': args.num, 'sampler': 'ddim', 'num_steps': config.sampling.num_steps,
            'guidance_scale': float(scales[0])}

  edits = [recoloured(c) for c in captions]
  result['img2img'] = {'original': {'edit_prompt': agreement(reals, edits), 'caption': agreement(reals, captions)}}
  edited = {}
  for strength in map(float, args.strengths.split(',')):
    images = edited[strength] = draw(args.workdir, config, generate.Requests(edits, seeds, scales, init_images=init),
                  strength=strength, sampler='ddim')
    result['img2img'][f'strength_{strength}'] = {'edit_prompt': agreement(images, edits),
                                                 'caption': agreement(images, captions),
                                                 'levels_from_original': distance(images, reals)}

  # Inpainting: the centre square of the images whose objects all lie off-centre.
  keep = [i for i, c in enumerate(captions)
          if all(position != 'in the center' for *_, position in captioned_shapes.parse_caption(c))]
  side = reals.shape[1]
  mask = np.zeros((len(keep), side, side, 1), np.float32)
  mask[:, side // 3:2 * side // 3, side // 3:2 * side // 3] = 1
  inpaint_prompts = [f'a large {COLOURS[i % len(COLOURS)]} {captioned_shapes.SHAPES[i % 3]} in the center'
                     for i in range(len(keep))]
  inpainted = draw(args.workdir, config, generate.Requests(inpaint_prompts, seeds[keep], scales[keep],
                                                           init_images=init[keep], masks=mask),
                   strength=1.0, sampler='ddim')
  from_noise = draw(args.workdir, config, generate.Requests(inpaint_prompts, seeds[keep], scales[keep]))
  reconstructed = reconstruct(args.workdir, config, init[keep])
  kept = mask[..., 0] == 0
  result['inpainting'] = {'num': len(keep), 'prompt': agreement(inpainted, inpaint_prompts),
                          'prompt_from_noise': agreement(from_noise, inpaint_prompts),
                          'kept_levels_from_original': distance(inpainted, reals[keep], kept),
                          'kept_levels_first_stage_floor': distance(reconstructed, reals[keep], kept)}

  # Negative prompts: a caption without a colour, with and without 'red' as the negative.
  places = [(shape, position) for shape in captioned_shapes.SHAPES for position in captioned_shapes.POSITIONS]
  places = [places[i % len(places)] for i in range(args.num)]
  prompts = [f'a large {shape} {position}' for shape, position in places]
  negatives = [f'a large red {shape} {position}' for shape, position in places]
  red = lambda images: round(float(np.mean([any(c == 'red' for c, *_ in captioned_shapes.measure_objects(
      image, tolerance=prompt_agreement.TOLERANCE)) for image in images])), 3)
  plain = draw(args.workdir, config, generate.Requests(prompts, seeds, scales))
  negative = draw(args.workdir, config, generate.Requests(prompts, seeds, scales, negative_prompts=negatives))
  result['negative_prompt'] = {'red_without_negative': red(plain), 'red_with_negative_red': red(negative),
                               'chance': round(1 / len(COLOURS), 3)}
  print(json.dumps(result, indent=1))
  rows = keep[:args.rows]
  columns = [reals[rows]] + [edited[s][rows] for s in (0.5, 0.75) if s in edited] + [inpainted[:args.rows]]
  titles = ['original'] + [f'img2img {s}' for s in (0.5, 0.75) if s in edited] + ['centre inpainted']
  captions = [f'{edits[i]}  |  {inpaint_prompts[j]}' for j, i in enumerate(rows)]
  controlnet_smoke.grid(columns, titles, captions).save(args.out)


def reconstruct(workdir, config, images):
  """The first stage's decoding of its encoding (posterior mode) of images in [-1, 1], as uint8."""
  mesh = parallel.create_mesh(config.mesh)
  model, params, _ = autoencoder.load_trained(config, workdir, mesh)
  out = np.concatenate([np.asarray(model.apply({'params': params}, images[i:i + 64], None,
                                               sample_posterior=False)[0]) for i in range(0, len(images), 64)])
  return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)


if __name__ == '__main__':
  main()
