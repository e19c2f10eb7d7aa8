"""Tokenizers (WordPiece against transformers' BertTokenizer), text and class encoders, condition dropout and
the diffusion objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.diffusion import objective
from latent_diffusion.diffusion import schedules
from latent_diffusion.models import conditioning
from tests import torch_reference

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a', 'large', 'red', 'circle', 'in', 'the', 'top', 'left', 'and',
         'small', 'blue', 'square', 'cafe', 'un', '##believ', '##able', ',', '.', '##s', 'tri', '##angle']


def test_byte_tokenizer_pads_and_truncates():
  ids = conditioning.ByteTokenizer()(['ab', b'\xc3\xa9', 'abcdef'], 4)
  np.testing.assert_array_equal(ids, [[98, 99, 0, 0], [196, 170, 0, 0], [98, 99, 100, 101]])


def test_wordpiece_matches_bert_tokenizer(tmp_path):
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(VOCAB) + '\n')
  torch_reference.import_diffusers()  # makes torchvision importable for transformers
  import transformers  # pylint: disable=g-import-not-at-top
  reference = transformers.BertTokenizer(str(vocab), do_lower_case=True)
  texts = ['A large red circle in the top left', 'Unbelievable, a small blue square.', 'Café triangles xyz']
  ours = conditioning.WordPieceTokenizer(str(vocab))(texts, 12)
  expected = reference(texts, padding='max_length', max_length=12, truncation=True)['input_ids']
  np.testing.assert_array_equal(ours, expected)
  with pytest.raises(FileNotFoundError, match="bert-base-uncased.*tokenizer='bytes'"):
    conditioning.WordPieceTokenizer(str(tmp_path / 'missing.txt'))


def test_text_transformer_is_causal_free_and_position_aware():
  model = conditioning.TextTransformer(vocab_size=257, max_length=8, width=32, depth=2, num_heads=4)
  ids = jnp.asarray(conditioning.ByteTokenizer()(['red circle', 'circle red'], 8))
  params = model.init(jax.random.PRNGKey(0), ids)
  out = model.apply(params, ids)
  assert out.shape == (2, 8, 32)
  np.testing.assert_allclose(np.asarray(out.mean(-1)), 0.0, atol=1e-5)  # final LayerNorm
  changed = model.apply(params, ids.at[0, 7].set(5))
  assert float(jnp.abs(changed - out)[0, 0].max()) > 1e-4  # bidirectional: the last token reaches the first
  assert float(jnp.abs(changed - out)[1].max()) == 0.0


def test_token_conv_mixes_neighbours_only():
  """Without transformer layers, `token_conv` k lets each token read the k // 2 tokens either side and no further."""
  model = conditioning.TextTransformer(vocab_size=257, max_length=12, width=16, depth=0, num_heads=1, token_conv=5)
  ids = jnp.asarray(conditioning.ByteTokenizer()(['a red circle', 'a blue square'], 12))
  params = model.init(jax.random.PRNGKey(0), ids)
  changed = np.asarray(jnp.abs(model.apply(params, ids.at[:, 6].set(7)) - model.apply(params, ids)).max(-1))
  np.testing.assert_array_equal(changed > 1e-6, np.repeat([[False] * 4 + [True] * 5 + [False] * 3], 2, axis=0))
  plain = conditioning.TextTransformer(vocab_size=257, max_length=12, width=16, depth=0, num_heads=1)
  plain_params = plain.init(jax.random.PRNGKey(0), ids)
  changed = np.asarray(jnp.abs(plain.apply(plain_params, ids.at[:, 6].set(7)) - plain.apply(plain_params, ids)).max(-1))
  np.testing.assert_array_equal(changed > 1e-6, np.repeat([[False] * 6 + [True] + [False] * 5], 2, axis=0))


def test_class_embedder_gives_one_token():
  model = conditioning.ClassEmbedder(num_classes=19, dim=8)
  params = model.init(jax.random.PRNGKey(0), jnp.array([0]))
  out = model.apply(params, jnp.array([3, 18, 3]))
  assert out.shape == (3, 1, 8)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[2]))


def test_condition_dropout_frequency():
  context = {'tokens': jnp.ones((20_000, 3)), 'label': jnp.ones((20_000,), jnp.int32)}
  null = {'tokens': jnp.zeros((1, 3)), 'label': jnp.full((1,), 18, jnp.int32)}
  dropped = objective.drop_condition(jax.random.PRNGKey(0), context, null, 0.1)
  is_null = np.asarray(dropped['tokens'][:, 0] == 0)
  assert is_null.mean() == pytest.approx(0.1, abs=0.006)
  np.testing.assert_array_equal(is_null, np.asarray(dropped['label'] == 18))  # the same examples drop every part
  assert objective.drop_condition(jax.random.PRNGKey(0), context, null, 0.0) is context


@pytest.mark.parametrize('parameterization', ['eps', 'v', 'x0'])
def test_a_perfect_denoiser_has_zero_loss_and_weights_follow_min_snr(parameterization):
  schedule = schedules.Schedule.create()
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4, 4, 3)), jnp.float32)
  rng = jax.random.PRNGKey(3)

  def oracle(x_t, t):  # knows x0, so it can produce every target exactly
    a = schedule.alphas_cumprod[t]
    eps = schedules.eps_from_x0(x_t, x0, a)
    return {'eps': eps, 'x0': x0, 'v': schedules.v_from_x0_eps(x0, eps, a)}[parameterization]

  loss, _ = objective.diffusion_loss(oracle, schedule, x0, rng, parameterization=parameterization)
  assert float(loss) < 1e-3
  zero_loss, t = objective.diffusion_loss(lambda x_t, t: jnp.zeros_like(x_t), schedule, x0, rng,
                                          parameterization=parameterization, loss_type='l1', min_snr_gamma=5.0)
  assert float(zero_loss) > 0
  snr = np.asarray(schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t]))
  weight = np.asarray(objective.snr_weight(schedule.alphas_cumprod[t], parameterization, 5.0))
  x0_weight = {'eps': weight * snr, 'v': weight * (snr + 1), 'x0': weight}[parameterization]
  np.testing.assert_allclose(x0_weight, np.minimum(snr, 5.0), rtol=1e-4)


def test_reference_layout_tokens_are_taming_s_bounding_box_builder_with_the_whole_image_as_crop():
  """By hand from taming-transformers' ObjectsBoundingBoxConditionalBuilder (8192 tokens: S = 90, none = 8191):
  a corner (x, y) is round(y * 89) * 90 + round(x * 89), an object (class, corner(x0, y0), corner(x0 + w, y0 + h)),
  and with encode_crop the crop's two corners close the sequence, here the whole image (0, 0, 1, 1)."""
  tokenizer = conditioning.ReferenceLayoutTokenizer(8192, 80)
  assert (tokenizer.grid, tokenizer.pad, tokenizer.vocab_size) == (90, 8191, 8192)
  boxes = np.array([[[0.25, 0.5, 0.75, 1.0], [0.1, 0.2, 0.3, 0.6]], [[0.0, 0.0, 1.0, 1.0]] * 2])  # ymin, xmin, ...
  ids = tokenizer(boxes, np.array([[3, 79], [-1, -1]]), 14)  # 4 object slots and the crop
  # x 0.5 -> round(44.5) = 44, y 0.25 -> 22, x 1 -> 89, y 0.75 -> 67; x 0.2 -> 18, y 0.1 -> 9, x 0.6 -> 53, y 0.3 -> 27.
  np.testing.assert_array_equal(ids[0], [3, 22 * 90 + 44, 67 * 90 + 89, 79, 9 * 90 + 18, 27 * 90 + 53] + [8191] * 6
                                + [0, 89 * 90 + 89])
  np.testing.assert_array_equal(ids[1], [8191] * 12 + [0, 8099])
  layout2img = tokenizer(np.zeros((1, 30, 4)), np.zeros((1, 30), np.int32), 92)  # the reference's 92 positions
  np.testing.assert_array_equal(layout2img[0, 90:], [0, 8099])
  with pytest.raises(ValueError,
                     match='5 objects and the crop take 17 tokens, more than ldm.conditioning.max_length=14'):
    tokenizer(np.zeros((1, 5, 4)), np.zeros((1, 5), np.int32), 14)
  with pytest.raises(ValueError, match='num_classes < vocab_size'):
    conditioning.ReferenceLayoutTokenizer(80, 80)


def test_layout_tokens_are_class_then_corners_on_the_grid_padded():
  tokenizer = conditioning.LayoutTokenizer(16, 18)
  assert (tokenizer.pad, tokenizer.vocab_size) == (16 * 16 + 18, 16 * 16 + 19)
  boxes = np.array([[[0.0, 0.0, 0.5, 1.0], [0.2, 0.34, 0.9, 0.6]], [[0.1, 0.1, 0.3, 0.3], [0, 0, 0, 0]]])
  ids = tokenizer(boxes, np.array([[5, 17], [0, -1]]), 8)
  # round(0.5 * 15) = 8 (row), round(1.0 * 15) = 15 (column): 8 * 16 + 15; 0.2 -> 3, 0.34 -> 5, 0.9 -> 14, 0.6 -> 9.
  np.testing.assert_array_equal(ids, [[256 + 5, 0, 8 * 16 + 15, 256 + 17, 3 * 16 + 5, 14 * 16 + 9, 274, 274],
                                      [256 + 0, 2 * 16 + 2, 4 * 16 + 4, 274, 274, 274, 274, 274]])
  with pytest.raises(ValueError, match='take 6 tokens, more than ldm.conditioning.max_length=5'):
    tokenizer(boxes, np.array([[5, 17], [0, -1]]), 5)
  with pytest.raises(ValueError, match='class 18, but ldm.conditioning.num_classes=18'):
    tokenizer(boxes, np.array([[18, 1], [0, -1]]), 6)
  with pytest.raises(ValueError, match='layout_grid >= 2'):
    conditioning.LayoutTokenizer(0, 18)
