"""The PatchGAN discriminator of pix2pix (`NLayerDiscriminator`), as taming/LDM use it against blurry decodes."""

import flax.linen as nn

from latent_diffusion.models import layers

_normal_002 = nn.initializers.normal(0.02)


def _scale_init(key, shape, dtype):
  return 1.0 + _normal_002(key, shape, dtype)  # BatchNorm gamma ~ N(1, 0.02), as the reference's weights_init


class NLayerDiscriminator(nn.Module):
  """Per-patch real/fake logits [B, h, w, 1]: n_layers stride-2 4x4 convs (width ndf x min(2^n, 8)), one
  stride-1 conv, a 1-channel output conv; BatchNorm (batch statistics in training) and LeakyReLU(0.2)."""
  ndf: int = 64
  n_layers: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    def norm(name):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name,
                          scale_init=nn.with_logical_partitioning(_scale_init, ('norm',)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))

    h = layers.leaky_relu(layers.conv(self.ndf, 4, 2, 1, kernel_init=_normal_002, name='conv_0')(x))
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = layers.conv(self.ndf * min(2**n, 8), 4, stride, 1, use_bias=False, kernel_init=_normal_002,
                      name=f'conv_{n}')(h)
      h = layers.leaky_relu(norm(f'norm_{n}')(h))
    return layers.conv(1, 4, 1, 1, kernel_init=_normal_002, name='conv_out')(h)
