"""Text -> image generation shared by the `sample` stage and periodic sampling, and the prompt-agreement metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import txt2img
from latent_diffusion import flops
from latent_diffusion import parallel
from latent_diffusion.data import captioned_shapes as cs
from latent_diffusion.diffusion import generate
from latent_diffusion.diffusion import schedules
from latent_diffusion.evaluation import prompt_agreement
from latent_diffusion.training import ldm
from test_captioned_shapes import parse_caption as reference_parse

PROMPTS = ('a large red circle in the center', 'a small blue square in the top left',
           'a small green triangle in the bottom right and a large yellow circle in the top left')


def tiny_config(**sampling):
  config = txt2img.get_config('smoke')
  config.ldm.unet.update(model_channels=32, channel_mult=(1,), attention_resolutions=(1,))
  config.ldm.conditioning.update(width=32, depth=1)
  config.sampling.update(num_steps=4, batch_size=8, prompts=PROMPTS, seeds=(5, 6), guidance_scales=(1.0, 4.0))
  config.sampling.update(sampling)
  return config


_PARAMS = {}  # the perturbed params of each ldm section (initialising one compiles for ~20 s)


def encode(params, images):
  """A stand-in first stage for img2img: 8 x 8 block means of the images, [B, 4, 4, 3] for 32 px."""
  del params
  return images.reshape(images.shape[0], 4, 8, 4, 8, 3).mean(axis=(2, 4))


def make_generator(config, mesh, condition_source=None):
  metadata = {'shape': [4, 4, 6], 'kind': 'kl', 'scale_factor': 0.5}
  unet, conditioner, init = ldm.create(config, metadata)
  generator = generate.Generator(
      unet=unet, conditioner=conditioner, schedule=schedules.Schedule.from_config(config.ldm.schedule),
      parameterization='eps', decoder=lambda params, z: jnp.tanh(params * jnp.tile(z, (1, 8, 8, 1))),
      latent_shape=ldm.sample_latent_shape(config, metadata), scale_factor=0.5, sampling_config=config.sampling,
      mesh=mesh, concat=config.ldm.conditioning.concat, condition_source=condition_source, encoder=encode)
  key = (config.ldm.to_json(), mesh.shape_tuple)
  if key not in _PARAMS:
    state, _ = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
    # Fresh params zero the SpatialTransformer's output projection (the context would not matter): perturb all.
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    _PARAMS[key] = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return generator, _PARAMS[key]


def test_requests_put_each_prompt_s_seeds_together_in_config_order():
  requests = generate.requests_from_config(tiny_config().sampling, 'text')
  assert requests.conditions == [p for _ in range(2) for p in PROMPTS for _ in range(2)]
  np.testing.assert_array_equal(requests.seeds, [5, 6] * 6)
  np.testing.assert_array_equal(requests.guidance_scales, [1.0] * 6 + [4.0] * 6)
  classes = generate.requests_from_config(tiny_config(class_ids=(3, 1), guidance_scales=(2.0,)).sampling, 'class')
  assert classes.conditions == [3, 3, 1, 1]


def test_negative_prompts_are_one_for_all_or_one_per_prompt_of_a_text_model():
  one = generate.requests_from_config(tiny_config(negative_prompts=('blurry',)).sampling, 'text')
  assert one.negative_prompts == ['blurry'] * 12
  each = generate.requests_from_config(tiny_config(negative_prompts=('a', 'b', 'c'), guidance_scales=(2.0,)).sampling,
                                       'text')
  assert each.negative_prompts == ['a', 'a', 'b', 'b', 'c', 'c']  # with its prompt's seeds
  assert generate.requests_from_config(tiny_config().sampling, 'text').negative_prompts is None
  with pytest.raises(ValueError, match='sampling.negative_prompts has 2 entries for 3 conditions'):
    generate.requests_from_config(tiny_config(negative_prompts=('a', 'b')).sampling, 'text')
  with pytest.raises(ValueError, match="sampling.negative_prompts needs a text model; ldm.conditioning.kind='class'"):
    generate.requests_from_config(tiny_config(negative_prompts=('a',), class_ids=(1,)).sampling, 'class')


def test_a_negative_prompt_replaces_the_null_prompt_in_guidance():
  config = tiny_config(guidance_scales=(4.0,), seeds=(5,))
  generator, params = make_generator(config, parallel.create_mesh(config.mesh))
  # The empty negative prompt is the null prompt.
  np.testing.assert_array_equal(generator.conditioner.inputs({'caption': np.array([''])})['tokens'],
                                generator.conditioner.null['tokens'])
  draw = lambda negatives, scale=4.0: generator(params, 0.3, generate.Requests(
      list(PROMPTS), np.array([5, 5, 5], np.int32), np.full(3, scale, np.float32), negatives))
  red = ['a large red circle in the center'] * 3
  assert np.abs(draw(red).astype(int) - draw([''] * 3)).mean(axis=(1, 2, 3)).min() > 0.5
  # At scale 1 guidance is the conditional half alone: the negative prompt has no say.
  assert np.abs(draw(red, 1.0).astype(int) - draw([''] * 3, 1.0)).max() <= 1
  assert generator.jitted._cache_size() == 1  # negative prompts and scales: one program


def test_prompt_file_replaces_prompts_and_a_missing_one_is_named(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('a small red circle in the center\n\n a large blue square in the top left \n')
  requests = generate.requests_from_config(tiny_config(prompt_file=str(path)).sampling, 'text')
  assert requests.conditions[:4] == (['a small red circle in the center'] * 2 +
                                     ['a large blue square in the top left'] * 2)
  with pytest.raises(FileNotFoundError, match='sampling.prompt_file=.*missing.txt does not exist'):
    generate.requests_from_config(tiny_config(prompt_file=str(tmp_path / 'missing.txt')).sampling, 'text')


@pytest.mark.parametrize('eta', [0.0, 1.0])  # 1: fresh noise every step, from each image's seed
def test_each_image_depends_on_its_own_seed_and_prompt_only_and_scales_share_one_program(eta):
  config = tiny_config(eta=eta)
  mesh = parallel.create_mesh(config.mesh)
  generator, params = make_generator(config, mesh)
  requests = generate.requests_from_config(config.sampling, 'text')
  images = generator(params, 0.3, requests)
  assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
  assert generator.jitted._cache_size() == 1  # two guidance scales, one compiled program

  # One image drawn alone (in a batch padded with copies of it) equals the same request drawn among others.
  alone = generate.Requests([PROMPTS[1]], np.array([6], np.int32), np.array([4.0], np.float32))
  np.testing.assert_array_equal(generator(params, 0.3, alone)[0], images[9])
  # Seeds, prompts and guidance scales all change the image.
  assert np.abs(images[2].astype(int) - images[3]).mean() > 5  # seed 5 vs 6
  assert np.abs(images[6].astype(int) - images[8]).mean() > 0.5  # prompt 0 vs 1, scale 4
  assert np.abs(images[0].astype(int) - images[6]).mean() > 0.5  # scale 1 vs 4


def test_a_hybrid_model_draws_each_stored_example_with_its_caption_and_its_concat_condition():
  config = tiny_config(condition_indices=(0, 2), seeds=(5,), guidance_scales=(3.0,))
  config.ldm.conditioning.concat = 'inpainting'
  rng = np.random.default_rng(0)
  source = {'caption': np.array([p.encode() for p in PROMPTS]), 'inpaint_mask': np.ones((3, 4, 4, 1), np.float32),
            'masked_latent': rng.normal(size=(3, 4, 4, 3)).astype(np.float32)}
  mesh = parallel.create_mesh(config.mesh)
  requests = generate.requests_from_config(config.sampling, 'text', 'inpainting')
  assert requests.conditions == [0, 2]  # stored example indices, as for concat models
  generator, params = make_generator(config, mesh, source)
  images = generator(params, 0.3, requests)
  # Each image is its example's: drawn alone it is the same, and it changes with the caption or the concat input.
  alone = generate.Requests([2], np.array([5], np.int32), np.array([3.0], np.float32))
  np.testing.assert_array_equal(generator(params, 0.3, alone)[0], images[1])
  generator.condition_source = dict(source, caption=source['caption'][::-1])  # read on the host, per batch
  assert np.abs(generator(params, 0.3, requests)[1].astype(int) - images[1]).mean() > 0.5
  generator.condition_source = dict(source, masked_latent=-source['masked_latent'])
  assert np.abs(generator(params, 0.3, requests)[1].astype(int) - images[1]).mean() > 0.5
  # Prompt agreement reads each image against its stored caption.
  assert ldm.sample_scalars(config, requests, images, source) == {
      f'prompt_agreement/{k}': v for k, v in prompt_agreement.prompt_agreement(images, [PROMPTS[0], PROMPTS[2]]).items()
      if k != 'objects'}


def test_img2img_starts_each_image_from_its_own_init_image_noised_to_the_strength():
  rng = np.random.default_rng(0)
  init = (rng.uniform(-1, 1, size=(3, 1, 1, 3)) + 0.1 * rng.normal(size=(3, 32, 32, 3))).astype(np.float32)  # tints
  requests = generate.requests_from_config(tiny_config(seeds=(5,), guidance_scales=(3.0,)).sampling, 'text',
                                           init_images=init)
  np.testing.assert_array_equal(requests.init_images, init)  # one per prompt, with its prompt's seeds
  assert generate.requests_from_config(tiny_config().sampling, 'text', init_images=init[:1]).init_images.shape == (
      12, 32, 32, 3)
  with pytest.raises(ValueError, match='sampling.init_images holds 2 images for 3 conditions'):
    generate.requests_from_config(tiny_config().sampling, 'text', init_images=init[:2])
  mesh = parallel.create_mesh(tiny_config().mesh)
  images = {}
  for strength in (0.25, 1.0):
    generator, params = make_generator(tiny_config(num_steps=8, strength=strength), mesh)
    images[strength] = generator(params, 0.3, requests)
    # An image drawn alone equals the same request among others (its init image travels with it).
    np.testing.assert_array_equal(generator(params, 0.3, requests.rows(np.array([2])))[0], images[strength][2])
  # Less strength stays closer to the init image's own decoding (decoder params 0.3); each image follows its own.
  target = np.round((np.tanh(0.3 * np.tile(encode(None, init), (1, 8, 8, 1))) + 1) * 127.5)
  assert np.abs(images[0.25] - target).mean() < 0.5 * np.abs(images[1.0] - target).mean()
  assert np.abs(images[0.25][0].astype(int) - images[0.25][1]).mean() > 5


def test_a_mask_keeps_the_init_image_outside_it_and_repaints_inside():
  rng = np.random.default_rng(1)
  init = (rng.uniform(-1, 1, size=(3, 1, 1, 3)) + 0.3 * rng.normal(size=(3, 32, 32, 3))).astype(np.float32)
  masks = np.zeros((3, 32, 32, 1), np.float32)
  masks[:, :, 16:] = 1  # repaint the right half: latent columns 2 and 3 of 4
  config = tiny_config(seeds=(5,), guidance_scales=(3.0,), num_steps=8, strength=1.0)
  mesh = parallel.create_mesh(config.mesh)
  generator, params = make_generator(config, mesh)
  plain = generator(params, 0.3, generate.requests_from_config(config.sampling, 'text', init_images=init))
  requests = generate.requests_from_config(config.sampling, 'text', init_images=init, masks=masks)
  np.testing.assert_array_equal(requests.masks, masks)
  images = generator(params, 0.3, requests).astype(int)
  np.testing.assert_array_equal(generator(params, 0.3, requests.rows(np.array([1])))[0], images[1])
  # The stand-in decoder tiles the 4 x 4 latent: pixel column j shows latent column j % 4.
  target = np.round((np.tanh(0.3 * np.tile(encode(None, init), (1, 8, 8, 1))) + 1) * 127.5)
  kept = (np.arange(32) % 4) < 2
  error = np.abs(images - target)
  assert error[:, :, kept].max() <= 1 and np.abs(plain - target)[:, :, kept].mean() > 10  # kept: the init's own
  assert error[:, :, ~kept].mean() > 10  # drawn anew (strength 1: from noise)
  np.testing.assert_array_equal(generate.requests_from_config(config.sampling, 'text', init_images=init,
                                                              masks=masks[:1]).masks, masks)
  with pytest.raises(ValueError, match='sampling.mask_images holds 2 images for 3 conditions'):
    generate.requests_from_config(config.sampling, 'text', init_images=init, masks=masks[:2])


def test_init_images_are_read_in_file_name_order_cropped_and_resized_as_training_data(tmp_path):
  wide = np.zeros((48, 64, 3), np.uint8)
  wide[:, 8:56] = 200  # the centre square, 48 x 48 of 200, resized to 32 x 32
  for name, image in (('b.png', wide), ('a.png', np.full((32, 32, 3), 10, np.uint8))):
    (tmp_path / name).write_bytes(tf.io.encode_png(image).numpy())
  images = generate.read_init_images(tiny_config(init_images=str(tmp_path)).sampling, 32)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
  np.testing.assert_allclose(images[0], 10 / 127.5 - 1, atol=1e-6)  # a.png first
  np.testing.assert_allclose(images[1], 200 / 127.5 - 1, atol=1e-5)
  assert generate.read_init_images(tiny_config().sampling, 32) is None
  masks = generate.read_masks(tiny_config(mask_images=str(tmp_path)).sampling, 32)  # white (200 > 127.5) repaints
  assert masks.shape == (2, 32, 32, 1)
  np.testing.assert_array_equal(masks[:, :, :, 0], np.stack([np.zeros((32, 32)), np.ones((32, 32))]))


def test_sampling_flops_grow_by_one_guided_unet_pass_per_step():
  mesh = parallel.create_mesh(txt2img.get_config('smoke').mesh)
  counts = {}
  for steps in (2, 4):
    config = tiny_config(num_steps=steps)
    generator, params = make_generator(config, mesh)
    generator(params, 0.3, generate.Requests([PROMPTS[0]], np.array([0], np.int32), np.array([2.0], np.float32)))
    counts[steps] = generator.flops_per_image
  config = tiny_config()
  unet, _, _ = ldm.create(config, {'shape': [4, 4, 6], 'kind': 'kl', 'scale_factor': 0.5})
  x, t, context = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 24, 32))  # cond + uncond
  unet_pass = flops.count(lambda p: unet.apply({'params': p}, x, t, context), params['unet'])
  assert counts[4] - counts[2] == 2 * unet_pass  # 2 more DDIM steps, each one UNet pass on the doubled batch


def test_a_larger_latent_size_draws_larger_images():
  config = tiny_config(latent_size=8, guidance_scales=(2.0,), seeds=(0,))
  generator, params = make_generator(config, parallel.create_mesh(config.mesh))
  images = generator(params, 0.3, generate.requests_from_config(config.sampling, 'text'))
  assert images.shape == (3, 64, 64, 3) and images.std() > 10


def test_parse_caption_agrees_with_the_test_parser_and_rejects_other_text():
  for index in range(200):
    caption = cs.caption_of(cs.sample_scene('train', index)[1])
    assert cs.parse_caption(caption) == [(c, shape, size, pos) for size, c, shape, pos in reference_parse(caption)]
  with pytest.raises(ValueError, match="'a huge red circle in the center' .* not 'a SIZE COLOUR SHAPE POSITION'"):
    cs.parse_caption('a small blue square in the top left and a huge red circle in the center')


def scenes(indices, resolution=32):
  rendered = [(cs.render(*cs.sample_scene('validation', i), resolution)[0], cs.caption_of(cs.sample_scene(
      'validation', i)[1])) for i in indices]
  return np.stack([image for image, _ in rendered]), [caption for _, caption in rendered]


def test_prompt_agreement_is_one_for_the_data_and_low_for_mismatched_prompts():
  images, captions = scenes(range(100))
  exact = prompt_agreement.prompt_agreement(images, captions)
  assert exact['colour'] == exact['colour_position'] == exact['shape_given_colour_position'] == 1.0
  assert exact['size_given_colour_position'] == 1.0 and exact['objects'] == sum(c.count(' and ') + 1 for c in captions)
  # Noise within the tolerance keeps every object; other scenes' captions mostly do not match.
  noisy = np.clip(images + np.random.default_rng(0).integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
  assert prompt_agreement.prompt_agreement(noisy, captions)['colour_position'] == 1.0
  shuffled = prompt_agreement.prompt_agreement(images, captions[1:] + captions[:1])
  assert shuffled['colour_position'] < 0.2 and shuffled['colour'] < 0.4
  # Flipping the images left-right keeps every colour and moves every object out of its named quadrant.
  flipped = prompt_agreement.prompt_agreement(images[:, :, ::-1], captions)
  centred = sum(c.count('center') for c in captions) / exact['objects']
  assert flipped['colour'] == 1.0 and abs(flipped['colour_position'] - centred) < 1e-9
  blank = prompt_agreement.prompt_agreement(np.full_like(images, 240), captions)
  assert blank['colour'] == blank['colour_position'] == 0.0


@pytest.mark.slow  # 70-120 s in the full run: CI and the README command run it
def test_sampling_loads_ema_params_and_falls_back_to_raw_params_with_a_warning(tmp_path, caplog):
  from latent_diffusion.training import checkpoint  # pylint: disable=g-import-not-at-top
  metadata = {'shape': [4, 4, 6], 'kind': 'kl', 'scale_factor': 0.5}
  mesh = parallel.create_mesh(tiny_config().mesh)
  for ema_decay in (0.999, 0.0):
    config = tiny_config()
    config.ldm.ema_decay = ema_decay
    _, _, init = ldm.create(config, metadata)
    state, _ = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
    state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))  # raw params != EMA params
    workdir = tmp_path / str(ema_decay)
    ckpt = checkpoint.Checkpointer(ldm.checkpoint_dir(str(workdir)))
    ckpt.save(7, state, {'step': 7})
    ckpt.wait()
    ckpt.close()
    caplog.clear()
    _, _, params, step = ldm.load_trained(config, str(workdir), mesh, metadata)
    expected = state.params if ema_decay == 0 else state.ema_params
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert ('keeps no EMA params' in caplog.text) == (ema_decay == 0)
