r"""First-stage encode / decode throughput: our `AutoencoderKL` vs diffusers' FlaxAutoencoderKL of the same
architecture (Stable Diffusion's VAE layout: 4 levels, 2 blocks per level, 4 latent channels), side by side.

Runs in the benchmark environment of benchmarks/unet_train_step.py (diffusers 0.39, the last with Flax):
  /tmp/bench/bin/python benchmarks/autoencoder_throughput.py [--width=64 --resolution=128]
`--width=128 --resolution=256` is the real SD VAE at 256 px (slow on a CPU).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.models import autoencoder as autoencoder_lib  # pylint: disable=wrong-import-position


def ours(width, resolution):
  model_config = config_lib.autoencoder('kl-f8').model
  model_config.ch = width
  model = autoencoder_lib.create_autoencoder(model_config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, resolution, resolution, 3)), jax.random.PRNGKey(1))
  encode = lambda p, x: model.apply(p, x, method='encode')
  decode = lambda p, z: model.apply(p, z, method='decode')
  return params, encode, decode, 'nhwc'


def diffusers_flax(width, resolution):
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  model = FlaxAutoencoderKL(block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
                            down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                            latent_channels=4, sample_size=resolution)
  params = {'params': model.init_weights(jax.random.PRNGKey(0))}
  encode = lambda p, x: model.apply(p, x, method=model.encode).latent_dist.mean
  decode = lambda p, z: model.apply(p, z, method=model.decode).sample
  return params, encode, decode, 'nchw'


def rate(fn, params, x, batch, repeats):
  return batch / timing.median_seconds(fn, (params, x), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--resolution', type=int, default=128)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind}; KL-f8 VAE, width {args.width}, {args.resolution} px, batch '
        f'{args.batch}, median of {args.repeats}')
  print('| implementation | encode img/s | decode img/s | params |\n|---|---|---|---|')
  results = {}
  rng = np.random.default_rng(0)
  for name, build in (('ours', ours), ('diffusers-flax', diffusers_flax)):
    params, encode, decode, layout = build(args.width, args.resolution)
    image, latent = (args.batch, args.resolution, args.resolution, 3), (args.batch, args.resolution // 8,
                                                                         args.resolution // 8, 4)
    if layout == 'nchw':
      image, latent = (image[0], image[3], image[1], image[2]), (latent[0], latent[3], latent[1], latent[2])
    x, z = jnp.asarray(rng.uniform(-1, 1, image), jnp.float32), jnp.asarray(rng.normal(size=latent), jnp.float32)
    results[name] = (rate(encode, params, x, args.batch, args.repeats), rate(decode, params, z, args.batch,
                                                                           args.repeats))
    count = sum(p.size for p in jax.tree.leaves(params))
    print(f'| {name} | {results[name][0]:.2f} | {results[name][1]:.2f} | {count} |', flush=True)
  (oe, od), (fe, fd) = results['ours'], results['diffusers-flax']
  print(f'| ours / diffusers-flax | {oe / fe:.2f}x | {od / fd:.2f}x | |')


if __name__ == '__main__':
  main()
