"""The CompVis zoo's trained conditioning encoders (an LDM checkpoint's `cond_stage_model.*`) as ours: the
BERTEmbedder / TransformerEmbedder (the reference's x_transformer.py TransformerWrapper over an Encoder: pre-norm
layers as `attn_layers.layers.{2i}` attention and `{2i+1}` feed-forward, each [norm, block, residual]) as our
`TextTransformer`, and the ClassEmbedder as ours."""

import re

from latent_diffusion.weights import torch_convert

PREFIX = 'cond_stage_model.'
# Our TextTransformer layer part -> (offset of its x-transformers layer, module inside it).
_LAYER_PARTS = {'norm1': (0, '0'), 'out': (0, '1.to_out'), 'norm2': (1, '0'), 'ff1': (1, '1.net.0.0'),
                'ff2': (1, '1.net.2')}


def x_transformer_key(path):
  """Our TextTransformer param path -> the TransformerWrapper module (to_q, to_k and to_v fuse into our `qkv`)."""
  if path == ('pos_emb',):
    return 'transformer.pos_emb.emb.weight'
  if path[0] in ('token_emb', 'final_norm'):
    return {'token_emb': 'transformer.token_emb', 'final_norm': 'transformer.norm'}[path[0]]
  index, part = re.fullmatch(r'layer_(\d+)_(\w+)', path[0]).groups()
  layers = 'transformer.attn_layers.layers'
  if part == 'qkv':
    return tuple(f'{layers}.{2 * int(index)}.1.to_{p}' for p in 'qkv')
  offset, module = _LAYER_PARTS[part]
  return f'{layers}.{2 * int(index) + offset}.{module}'


def convert(state_dict, kind, abstract, source):
  """Params shaped like `abstract` for our encoder of `ldm.conditioning.kind` ('text', 'layout': BERTEmbedder;
  'class': ClassEmbedder) from an LDM checkpoint's state dict. The logits layer the reference never calls
  (`transformer.to_logits`) is left out."""
  tensors = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
  key = (lambda path: path[0]) if kind == 'class' else x_transformer_key
  return torch_convert.convert(tensors, abstract, key, source=source, ignore=('transformer.to_logits.',))
