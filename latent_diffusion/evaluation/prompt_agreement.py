"""Whether samples of `captioned_shapes` show what their prompts ask for, read from the pixels alone.

The domain metric of the built-in dataset: for every object a prompt names, is there an object of that colour
at that position (and of that shape, and size) in the sample? FID says whether samples look like the data; this
says whether they follow the text.
"""

import numpy as np

from latent_diffusion.data import captioned_shapes

# Pixels within this distance (per channel) of a palette colour count as that colour; the palette's colours
# are further apart than twice this, so no pixel counts twice.
TOLERANCE = 32


def prompt_agreement(images, prompts, *, tolerance=TOLERANCE):
  """images uint8 [N, H, W, 3], prompts N strings -> fractions of prompted objects whose colour was found
  (`colour`), found at the right position (`colour_position`), and among the latter of the right shape and
  size as well."""
  counts = dict(objects=0, colour=0, colour_position=0, shape=0, size=0)
  for image, prompt in zip(np.asarray(images), prompts):
    measured = {colour: rest for colour, *rest in captioned_shapes.measure_objects(image, tolerance=tolerance)}
    for colour, shape, size, position in captioned_shapes.parse_caption(prompt):
      counts['objects'] += 1
      counts['colour'] += colour in measured
      if colour in measured and measured[colour][2] == position:
        counts['colour_position'] += 1
        counts['shape'] += measured[colour][0] == shape
        counts['size'] += measured[colour][1] == size
  matched = max(counts['colour_position'], 1)
  objects = max(counts['objects'], 1)
  return {'colour': counts['colour'] / objects, 'colour_position': counts['colour_position'] / objects,
          'shape_given_colour_position': counts['shape'] / matched,
          'size_given_colour_position': counts['size'] / matched, 'objects': counts['objects']}
