"""Stable Diffusion's frozen CLIP text encoder: a Hugging Face `CLIPTextModel` folder (config.json + safetensors)
as our causal `TextTransformer`, and the CLIP BPE tokenizer from the folder's tokenizer files (no hub access).

A folder is either a Stable Diffusion pipeline folder (`text_encoder/`, `tokenizer/`) or the text encoder's own
folder holding the tokenizer files too.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models import conditioning
from latent_diffusion.weights import torch_convert


def text_transformer(config, attention='auto'):
  """Our `TextTransformer` with the architecture of a `CLIPTextConfig` (dict)."""
  if config.get('hidden_act') not in conditioning.ACTIVATIONS or config.get('layer_norm_eps', 1e-5) != 1e-5:
    raise ValueError(f"Unsupported CLIP text config: hidden_act={config.get('hidden_act')!r} (supported: "
                     f"{sorted(conditioning.ACTIVATIONS)}), layer_norm_eps={config.get('layer_norm_eps')} (1e-5).")
  return conditioning.TextTransformer(
      vocab_size=config['vocab_size'], max_length=config['max_position_embeddings'], width=config['hidden_size'],
      depth=config['num_hidden_layers'], num_heads=config['num_attention_heads'], attention=attention,
      causal=True, activation=config['hidden_act'], mlp_dim=config['intermediate_size'])


_LAYER_PARTS = {'norm1': 'layer_norm1', 'norm2': 'layer_norm2', 'out': 'self_attn.out_proj', 'ff1': 'mlp.fc1',
                'ff2': 'mlp.fc2'}


def torch_key(path):
  """Our TextTransformer param path -> the CLIPTextModel module (q, k and v fuse into our `qkv`)."""
  if path == ('pos_emb',):
    return 'embeddings.position_embedding.weight'
  name = path[0]
  if name in ('token_emb', 'final_norm'):
    return {'token_emb': 'embeddings.token_embedding', 'final_norm': 'final_layer_norm'}[name]
  index, part = re.fullmatch(r'layer_(\d+)_(\w+)', name).groups()
  layer = f'encoder.layers.{index}'
  if part == 'qkv':
    return tuple(f'{layer}.self_attn.{p}_proj' for p in 'qkv')
  return f'{layer}.{_LAYER_PARTS[part]}'


def convert_state_dict(state_dict, model, source):
  """Params of `model` from a CLIPTextModel state dict (with or without the `text_model.` prefix of older
  transformers releases and of CompVis checkpoints' `cond_stage_model.transformer.`)."""
  state_dict = {re.sub(r'^(cond_stage_model\.transformer\.)?(text_model\.)?', '', k): v for k, v in state_dict.items()}
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, model.max_length), jnp.int32))['params']
  return torch_convert.convert(state_dict, abstract, torch_key, source=source, ignore=('embeddings.position_ids',))


def text_encoder_config(folder):
  """The CLIPTextConfig (dict) of the text encoder saved in `folder`."""
  return torch_convert.read_json(torch_convert.find_model_dir(folder, 'text_encoder', 'config.json') / 'config.json')


def load_text_encoder(folder, attention='auto'):
  """(TextTransformer, params) of the CLIP text encoder saved in `folder`."""
  directory = torch_convert.find_model_dir(folder, 'text_encoder', 'config.json')
  model = text_transformer(torch_convert.read_json(directory / 'config.json'), attention)
  params = convert_state_dict(torch_convert.read_folder(directory, 'model'), model, str(directory))
  return model, params


class CLIPTokenizer:
  """CLIP's BPE tokenizer from the folder's vocab.json/merges.txt: <|startoftext|> tokens <|endoftext|>, padded
  to `max_length` with the folder's pad token (as Stable Diffusion pipelines tokenize prompts)."""

  def __init__(self, folder):
    directory = torch_convert.find_model_dir(folder, 'tokenizer', 'vocab.json')
    try:
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('The CLIP tokenizer needs transformers: pip install -e ".[weights]".') from e
    self._tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    self.vocab_size = len(self._tokenizer)

  def __call__(self, texts, max_length):
    texts = [t.decode('utf-8') if isinstance(t, bytes) else str(t) for t in texts]
    ids = self._tokenizer(texts, padding='max_length', max_length=max_length, truncation=True)['input_ids']
    return np.asarray(ids, np.int32)
