"""Conditioning encoders: tokenizers, the text transformer trained jointly with the UNet (the paper's
BERTEmbedder role), and the class embedder with a null class for classifier-free guidance."""

import collections
import math
import unicodedata

import flax.linen as nn
from etils import epath
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models import attention as attention_lib
from latent_diffusion.models import layers

TEXT_KINDS = ('text', 'clip')  # ldm.conditioning kinds whose condition is a caption
KINDS = TEXT_KINDS + ('class', 'layout', 'none')  # ldm.conditioning.kind
TOKENIZERS = ('bytes', 'wordpiece')  # ldm.conditioning.tokenizer of kind 'text'


class ByteTokenizer:
  """UTF-8 bytes + 1 (0 pads): works offline for any text; the default for configs that train from scratch."""
  vocab_size = 257

  def __call__(self, texts, max_length):
    ids = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      encoded = np.frombuffer(_as_bytes(text), np.uint8)[:max_length].astype(np.int32) + 1
      ids[row, :len(encoded)] = encoded
    return ids


def _as_bytes(text):
  return text if isinstance(text, bytes) else text.encode('utf-8')


class WordPieceTokenizer:
  """BERT's uncased WordPiece ([CLS] tokens [SEP], 0 = [PAD]) from a `vocab.txt`, as the paper's BERT tokenizer."""

  def __init__(self, vocab_file):
    path = epath.Path(vocab_file) if vocab_file else None
    if path is None or not path.exists():
      raise FileNotFoundError(
          f'WordPiece vocabulary {str(path)!r} not found (ldm.conditioning.vocab_file). Use the vocab.txt of '
          "bert-base-uncased (from its model folder), or set ldm.conditioning.tokenizer='bytes'.")
    self.vocab = collections.OrderedDict((line.rstrip('\n'), i) for i, line in enumerate(
        path.read_text().splitlines(keepends=True)))
    self.vocab_size = len(self.vocab)
    self.pad, self.cls, self.sep, self.unk = (self.vocab[t] for t in ('[PAD]', '[CLS]', '[SEP]', '[UNK]'))

  def _words(self, text):
    text = unicodedata.normalize('NFD', text.lower())
    text = ''.join(c for c in text if unicodedata.category(c) != 'Mn')
    words, current = [], ''
    for char in text:
      if char.isspace() or _is_punctuation(char):
        words += [current] if current else []
        words += [char] if not char.isspace() else []
        current = ''
      else:
        current += char
    return words + ([current] if current else [])

  def _word_pieces(self, word):
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start and (('##' if start else '') + word[start:end]) not in self.vocab:
        end -= 1
      if end == start:
        return [self.unk]
      pieces.append(self.vocab[('##' if start else '') + word[start:end]])
      start = end
    return pieces

  def __call__(self, texts, max_length):
    ids = np.full((len(texts), max_length), self.pad, np.int32)
    for row, text in enumerate(texts):
      text = text.decode('utf-8') if isinstance(text, bytes) else text
      tokens = [self.cls] + [p for w in self._words(text) for p in self._word_pieces(w)][:max_length - 2]
      tokens.append(self.sep)
      ids[row, :len(tokens)] = tokens
    return ids


def _is_punctuation(char):
  code = ord(char)
  return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or (
      unicodedata.category(char).startswith('P'))


def create_tokenizer(conditioning_config):
  if conditioning_config.tokenizer == 'bytes':
    return ByteTokenizer()
  if conditioning_config.tokenizer == 'wordpiece':
    return WordPieceTokenizer(conditioning_config.vocab_file)
  raise ValueError(f"ldm.conditioning.tokenizer='{conditioning_config.tokenizer}' is not one of {TOKENIZERS}.")


class LayoutTokenizer:
  """Object layouts as token sequences for a transformer, ours (layout_tokens='grid'): as the reference's, per
  object its class token, then its top-left and bottom-right corners as cells of a `grid` x `grid` lattice, but
  each kind with ids of its own and no crop: corners 0 .. grid^2 - 1, classes grid^2 + label, the pad
  grid^2 + num_classes. The smoke config's tiny vocabulary (18 classes, 16 x 16 cells) needs no shared table."""

  def __init__(self, grid, num_classes):
    if grid < 2 or num_classes < 1:
      raise ValueError(f'A layout needs ldm.conditioning.layout_grid >= 2 (it is {grid}) and num_classes >= 1 '
                       f'(it is {num_classes}), the number of object classes.')
    self.grid, self.num_classes = grid, num_classes
    self.pad = grid * grid + num_classes
    self.vocab_size = self.pad + 1
    self.class_offset, self.trailer = grid * grid, np.zeros((0,), np.int32)  # no crop after the objects

  def corner(self, y, x):
    cell = lambda v: np.round(np.clip(np.asarray(v), 0, 1) * (self.grid - 1)).astype(np.int32)
    return cell(y) * self.grid + cell(x)

  def __call__(self, boxes, labels, max_length):
    """boxes [B, N, 4] normalised (ymin, xmin, ymax, xmax), labels [B, N] (-1 pads) -> ids [B, max_length]: the
    objects' triples, pad triples up to the slots that fit before the trailer, the trailer, pads."""
    boxes, labels = np.asarray(boxes, np.float32), np.asarray(labels, np.int32)
    slots = (max_length - len(self.trailer)) // 3
    if labels.shape[1] > slots:
      what = ' and the crop' if len(self.trailer) else ''
      raise ValueError(f'{labels.shape[1]} objects{what} take {3 * labels.shape[1] + len(self.trailer)} tokens, more '
                       f'than ldm.conditioning.max_length={max_length}; raise it or lower data.max_objects.')
    if labels.max(initial=-1) >= self.num_classes:
      raise ValueError(f'An object has class {labels.max()}, but ldm.conditioning.num_classes={self.num_classes}.')
    triples = np.stack([self.class_offset + labels, self.corner(boxes[..., 0], boxes[..., 1]),
                        self.corner(boxes[..., 2], boxes[..., 3])], axis=-1)
    objects = np.where(labels[..., None] >= 0, triples, self.pad).reshape(len(labels), -1)
    objects = np.pad(objects, ((0, 0), (0, 3 * (slots - labels.shape[1]))), constant_values=self.pad)
    tokens = np.concatenate([objects, np.broadcast_to(self.trailer, (len(labels), len(self.trailer)))], axis=1)
    return np.pad(tokens, ((0, 0), (0, max_length - tokens.shape[1])), constant_values=self.pad)


class ReferenceLayoutTokenizer(LayoutTokenizer):
  """The reference layout2img's layout tokens (taming-transformers' bounding-box builder, its crop encoded): per
  object its class, then its top-left and bottom-right corners as y * S + x on an S x S lattice (S the integer
  square root of `vocab_size`; classes and corners share the ids), empty object slots as triples of the pad id
  vocab_size - 1, and after the (max_length - 2) // 3 slots the crop's two corners: our boxes are relative to the
  image as cropped, so the crop is the whole image, 0 and S^2 - 1 (the reference keeps boxes in the uncropped
  image and encodes the crop)."""

  def __init__(self, vocab_size, num_classes):  # pylint: disable=super-init-not-called
    self.grid = math.isqrt(vocab_size)
    if self.grid < 2 or not 1 <= num_classes < vocab_size:
      raise ValueError(f'Reference layout tokens need ldm.conditioning.vocab_size >= 4 (it is {vocab_size}) and 1 <= '
                       f'num_classes < vocab_size (it is {num_classes}).')
    self.num_classes, self.pad, self.vocab_size = num_classes, vocab_size - 1, vocab_size
    self.class_offset, self.trailer = 0, np.array([0, self.grid**2 - 1], np.int32)


LAYOUT_TOKENS = ('reference', 'grid')  # ldm.conditioning.layout_tokens


def layout_tokenizer(cond_config):
  """ldm.conditioning.layout_tokens: 'reference' (ReferenceLayoutTokenizer) or 'grid' (LayoutTokenizer)."""
  if cond_config.layout_tokens == 'reference':
    return ReferenceLayoutTokenizer(cond_config.vocab_size, cond_config.num_classes)
  if cond_config.layout_tokens == 'grid':
    return LayoutTokenizer(cond_config.layout_grid, cond_config.num_classes)
  raise ValueError(f"ldm.conditioning.layout_tokens='{cond_config.layout_tokens}' is not one of {LAYOUT_TOKENS}.")


ACTIVATIONS = {'gelu': lambda x: nn.gelu(x, approximate=False), 'quick_gelu': lambda x: x * nn.sigmoid(1.702 * x)}


class TextTransformer(nn.Module):
  """Token + learned position embeddings -> depth pre-LN transformer layers -> LayerNorm: [B, L] ids -> [B, L, width].

  Trained with the UNet it is the paper's BERTEmbedder role; with `causal` attention and CLIP's `quick_gelu` (or
  `gelu`) it is the CLIP text encoder of Stable Diffusion (`weights/clip.py` converts its weights); with `head_dim`
  64 and no q/k/v bias, the paper's BERTEmbedder (an x-transformers Encoder: 8 heads of 64 whatever the width).
  """
  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int
  attention: str = 'auto'
  causal: bool = False
  activation: str = 'gelu'
  mlp_dim: int = 0  # 0: 4 x width
  head_dim: int = 0  # 0: width // num_heads
  qkv_bias: bool = True
  token_conv: int = 0  # an addition (0: off, the reference): a residual convolution over this many tokens

  @nn.compact
  def __call__(self, ids):
    embed_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed'))
    x = nn.Embed(self.vocab_size, self.width, embedding_init=embed_init, name='token_emb')(ids)
    x = x + self.param('pos_emb', nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'embed')),
                       (self.max_length, self.width))[None, :ids.shape[1]]
    if self.token_conv:  # each word mixed with its neighbours: binds a phrase's words without attention layers
      x = x + layers.conv(self.width, self.token_conv, padding='SAME', ndim=1, name='token_conv')(x)
    head_dim = self.head_dim or self.width // self.num_heads
    inner = self.num_heads * head_dim
    for i in range(self.depth):
      h = layers.layer_norm(name=f'layer_{i}_norm1')(x)
      qkv = layers.dense(3 * inner, ('embed', 'heads'), use_bias=self.qkv_bias, name=f'layer_{i}_qkv')(h)
      q, k, v = (a.reshape(a.shape[:2] + (self.num_heads, head_dim)) for a in jnp.split(qkv, 3, axis=-1))
      h = attention_lib.attention(q, k, v, self.attention, causal=self.causal).reshape(x.shape[:2] + (inner,))
      x = x + layers.dense(self.width, ('heads', 'embed'), name=f'layer_{i}_out')(h)
      h = layers.dense(self.mlp_dim or 4 * self.width, ('embed', 'mlp'), name=f'layer_{i}_ff1')(
          layers.layer_norm(name=f'layer_{i}_norm2')(x))
      x = x + layers.dense(self.width, ('mlp', 'embed'), name=f'layer_{i}_ff2')(ACTIVATIONS[self.activation](h))
    return layers.layer_norm(name='final_norm')(x)


class ClassEmbedder(nn.Module):
  """Class ids [B] -> a one-token context [B, 1, dim]; the last id (num_classes - 1) is the null class."""
  num_classes: int
  dim: int

  @nn.compact
  def __call__(self, labels):
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ('vocab', 'embed'))
    return nn.Embed(self.num_classes, self.dim, embedding_init=init, name='embedding')(labels)[:, None]
