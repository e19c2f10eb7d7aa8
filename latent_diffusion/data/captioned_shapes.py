"""`captioned_shapes`: a built-in, offline, deterministic text-to-image dataset.

Each image shows one or two non-overlapping coloured shapes on a light tint, described by a caption from a
fixed vocabulary ("a large red circle in the top left and a small blue square in the bottom right"), with a
class label, per-object annotations (for layout-to-image) and a segmentation map (for semantic synthesis).
Scenes are sampled in normalised coordinates from a seed per (split, index), so every resolution shows the
same scenes and building the dataset twice gives identical examples.
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (40, 80, 220),
    'yellow': (230, 210, 40),
    'purple': (150, 60, 190),
    'orange': (240, 140, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {'small': 0.2, 'large': 0.4}  # Diameter as a fraction of the image side.
SIZE_NAMES = tuple(SIZES)
POSITIONS = ('in the top left', 'in the top right', 'in the bottom left', 'in the bottom right',
             'in the center')
NUM_CLASSES = len(SHAPES) * len(COLOURS)  # Label = shape x colour of the first object.
NULL_CLASS = NUM_CLASSES  # Reserved for classifier-free guidance.
RESOLUTIONS = (32, 64, 256)
SPLITS = {'train': 20_000, 'validation': 2_000, 'test': 2_000}

_SIZE_JITTER = 0.1  # Diameters vary by +-10%.
_MARGIN = 0.05  # Object centres keep this distance from position boundaries, so positions are unambiguous.
_GAP = 0.02  # Minimum gap between the bounding boxes of two objects.
_SUPERSAMPLE = 4  # Samples per pixel side when rasterising.
_SPLIT_SEEDS = {'train': 0, 'validation': 1, 'test': 2}


def position_of(cx, cy):
  """Names the position of a centre (x right, y down, both in [0, 1]): the 3x3 grid's middle cell, else a quadrant."""
  if 1 / 3 <= cx <= 2 / 3 and 1 / 3 <= cy <= 2 / 3:
    return 'in the center'
  return 'in the {} {}'.format('top' if cy < 0.5 else 'bottom', 'left' if cx < 0.5 else 'right')


def label_of(shape, colour):
  return SHAPES.index(shape) * len(COLOURS) + COLOUR_NAMES.index(colour)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object of a scene; `cx`, `cy`, `radius` are fractions of the image side."""
  shape: str
  colour: str
  size: str
  position: str
  cx: float
  cy: float
  radius: float

  @property
  def description(self):
    return f'a {self.size} {self.colour} {self.shape} {self.position}'

  @property
  def bbox(self):
    """(ymin, xmin, ymax, xmax), normalised."""
    r = self.radius
    return (self.cy - r, self.cx - r, self.cy + r, self.cx + r)


def caption_of(objects):
  return ' and '.join(o.description for o in objects)


def caption_of_layout(boxes, labels):
  """The caption of a layout (normalised (ymin, xmin, ymax, xmax) boxes and object labels; label -1 pads), read
  as the dataset reads scenes: the label names shape and colour, the box's side the size, its centre the
  position. So samples of a layout model can be scored like text samples."""
  parts = []
  for (y0, x0, y1, x1), label in zip(np.asarray(boxes, np.float64), np.asarray(labels)):
    if label < 0:
      continue
    shape, colour = SHAPES[label // len(COLOURS)], COLOUR_NAMES[label % len(COLOURS)]
    size = min(SIZES, key=lambda s: abs(SIZES[s] - (y1 - y0 + x1 - x0) / 2))
    parts.append(f'a {size} {colour} {shape} {position_of((x0 + x1) / 2, (y0 + y1) / 2)}')
  return ' and '.join(parts)


def vocabulary():
  """A BERT-format WordPiece vocabulary of every caption word (shipped as captioned_shapes_vocab.txt): with it
  the paper's WordPiece tokenizer reads a caption as one token per word."""
  words = {'a', 'and', 'in', 'the', *SIZES, *COLOURS, *SHAPES, *' '.join(POSITIONS).split()}
  return ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *sorted(words)]


VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'captioned_shapes_vocab.txt')


def parse_caption(caption):
  """The inverse of `caption_of` on the words: [(colour, shape, size, position)] of each described object.

  Raises ValueError for text outside the dataset's grammar, so a mistyped prompt is not scored silently.
  """
  parsed = []
  for part in caption.split(' and '):
    words = part.split()
    if len(words) < 5 or words[0] != 'a' or words[1] not in SIZES or words[2] not in COLOURS \
        or words[3] not in SHAPES or ' '.join(words[4:]) not in POSITIONS:
      raise ValueError(f"'{part}' in the caption '{caption}' is not 'a SIZE COLOUR SHAPE POSITION' with "
                       f'sizes {SIZE_NAMES}, colours {COLOUR_NAMES}, shapes {SHAPES}, positions {POSITIONS}.')
    parsed.append((words[2], words[3], words[1], ' '.join(words[4:])))
  return parsed


def _sample_centre(rng, position, radius):
  """A centre for `position` that keeps the object inside the image and away from position boundaries."""
  lo, hi = radius, 1 - radius
  if position == 'in the center':
    lo, hi = max(lo, 1 / 3 + _MARGIN), min(hi, 2 / 3 - _MARGIN)
    return rng.uniform(lo, hi), rng.uniform(lo, hi)
  x_lo, x_hi = (lo, 0.5 - _MARGIN) if position.endswith('left') else (0.5 + _MARGIN, hi)
  y_lo, y_hi = (lo, 0.5 - _MARGIN) if 'top' in position else (0.5 + _MARGIN, hi)
  while True:
    cx, cy = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
    if not (_near_middle(cx) and _near_middle(cy)):
      return cx, cy


def _near_middle(v):
  return 1 / 3 - _MARGIN < v < 2 / 3 + _MARGIN


def _overlap(a, b):
  ay0, ax0, ay1, ax1 = a.bbox
  by0, bx0, by1, bx1 = b.bbox
  return not (ax1 + _GAP < bx0 or bx1 + _GAP < ax0 or ay1 + _GAP < by0 or by1 + _GAP < ay0)


def sample_scene(split, index):
  """The scene of example `index` of `split`: (background RGB, list of ShapeObject)."""
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  background = tuple(int(v) for v in rng.integers(205, 256, size=3))
  num_objects = int(rng.integers(1, 3))
  while True:
    colours = rng.choice(COLOUR_NAMES, size=num_objects, replace=False)
    positions = rng.choice(POSITIONS, size=num_objects, replace=False)
    objects = []
    for colour, position in zip(colours, positions):
      shape, size = str(rng.choice(SHAPES)), str(rng.choice(SIZE_NAMES))
      radius = SIZES[size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER) / 2
      cx, cy = _sample_centre(rng, str(position), radius)
      objects.append(ShapeObject(shape, str(colour), size, str(position), cx, cy, radius))
    if num_objects == 1 or not _overlap(*objects):
      return background, objects


def _inside(shape, u, v):
  """Whether offsets (u, v), in units of the half-width and half-height, lie inside `shape`."""
  if shape == 'circle':
    return u**2 + v**2 <= 1
  if shape == 'square':
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)
  # Isosceles triangle pointing up, inscribed in the bounding box: half-width grows from 0 at the apex to 1.
  return (v <= 1) & (np.abs(u) <= (v + 1) / 2)


def _shape_mask(shape, cx, cy, rx, ry, resolution):
  """Pixels at least half covered by `shape` (4x4 samples per pixel), so small circles stay round at 32 px."""
  mask = np.zeros((resolution, resolution), bool)
  x0, x1, y0, y1 = (int(np.clip(np.floor(v * resolution) + d, 0, resolution)) for v, d in (
      (cx - rx, -1), (cx + rx, 2), (cy - ry, -1), (cy + ry, 2)))
  sub = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
  xs = ((np.arange(x0, x1)[:, None] + sub[None, :]) / resolution).reshape(-1)
  ys = ((np.arange(y0, y1)[:, None] + sub[None, :]) / resolution).reshape(-1)
  inside = _inside(shape, (xs[None, :] - cx) / rx, (ys[:, None] - cy) / ry)
  coverage = inside.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
  mask[y0:y1, x0:x1] = coverage >= 0.5
  return mask


def render(background, objects, resolution):
  """Renders a scene: (uint8 image [R, R, 3], uint8 segmentation [R, R, 1] with 0 = background, 1 + shape id)."""
  image = np.empty((resolution, resolution, 3), np.uint8)
  image[:] = background
  segmentation = np.zeros((resolution, resolution, 1), np.uint8)
  for obj in objects:
    mask = _shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, obj.radius, resolution)
    image[mask] = COLOURS[obj.colour]
    segmentation[mask] = 1 + SHAPES.index(obj.shape)
  return image, segmentation


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with captions, labels, boxes and segmentation maps, generated offline."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'First release.', '1.1.0': "Objects carry their class ('label': shape x colour)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=str(r), description=f'{r}x{r} pixels.') for r in RESOLUTIONS
  ]

  @property
  def resolution(self):
    return int(self.builder_config.name)

  def _info(self):
    r = self.resolution
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(r, r, 3)),
            'caption': tfds.features.Text(),
            'label': tfds.features.ClassLabel(
                names=[f'{c} {s}' for s in SHAPES for c in COLOUR_NAMES] + ['null']),
            'objects': tfds.features.Sequence({
                'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                'shape': tfds.features.ClassLabel(names=SHAPES),
                'colour': tfds.features.ClassLabel(names=COLOUR_NAMES),
                'size': tfds.features.ClassLabel(names=SIZE_NAMES),
                'position': tfds.features.ClassLabel(names=POSITIONS),
                'bbox': tfds.features.BBoxFeature(),
            }),
            'segmentation': tfds.features.Image(shape=(r, r, 1), use_colormap=False),
        }),
        supervised_keys=('image', 'caption'),
        homepage='https://arxiv.org/abs/2112.10752',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: examples are generated.
    return {split: self._generate_examples(split, n) for split, n in SPLITS.items()}

  def _generate_examples(self, split, num_examples):
    for index in range(num_examples):
      yield index, self.example(split, index)

  def example(self, split, index):
    background, objects = sample_scene(split, index)
    image, segmentation = render(background, objects, self.resolution)
    return {
        'image': image,
        'caption': caption_of(objects),
        'label': label_of(objects[0].shape, objects[0].colour),
        'objects': [{
            'label': label_of(o.shape, o.colour),
            'shape': o.shape,
            'colour': o.colour,
            'size': o.size,
            'position': o.position,
            'bbox': tfds.features.BBox(*np.clip(o.bbox, 0.0, 1.0)),
        } for o in objects],
        'segmentation': segmentation,
    }


def classify_shape(mask):
  """Names the shape of a boolean object mask from its bounding-box fill ratio and vertical mass centre.

  Squares fill their box (> 0.91; circles reach 0.905 at 32 px); triangles, pointing up, carry their mass
  low (centre below 0.57 of the height; circles and squares sit near 0.5).
  """
  ys, xs = np.nonzero(mask)
  height = ys.max() + 1 - ys.min()
  fill = mask.sum() / (height * (xs.max() + 1 - xs.min()))
  centre = (ys.mean() + 0.5 - ys.min()) / height
  if centre > 0.57:
    return 'triangle'
  return 'square' if fill > 0.91 else 'circle'


def measure_objects(image, *, tolerance=0, min_pixels=4):
  """Reads the objects of an image from its pixels alone: [(colour, shape, size, position)], one per colour.

  A colour counts where at least `min_pixels` pixels lie within `tolerance` of it (per channel); size and
  position come from the bounding box of those pixels. Used to check the dataset and, with a tolerance,
  whether samples follow their prompts.
  """
  image = np.asarray(image).astype(np.int32)
  side = image.shape[0]
  found = []
  for colour, rgb in COLOURS.items():
    mask = np.all(np.abs(image - rgb) <= tolerance, axis=-1)
    if mask.sum() < min_pixels:
      continue
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    diameter = (x1 - x0 + y1 - y0) / 2 / side
    size = min(SIZES, key=lambda s: abs(SIZES[s] - diameter))
    found.append((colour, classify_shape(mask), size, position_of((x0 + x1) / 2 / side, (y0 + y1) / 2 / side)))
  return found
