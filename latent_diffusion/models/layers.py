"""Layers shared by every model, with logical axis names on their parameters so that `parallel.py` shards them."""

import functools

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion import parallel

# PyTorch's default conv/linear initialisation (kaiming_uniform with a=sqrt(5)), as the reference models use.
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class Conv(nn.Conv):
  """nn.Conv whose output stays split over the batch (`parallel.shard_batch`): on an fsdp mesh XLA then gathers
  the weights rather than the activations (it gathered the global batch of context projections otherwise)."""

  def __call__(self, inputs):
    return parallel.shard_batch(super().__call__(inputs))


class Dense(nn.Dense):
  """nn.Dense whose output stays split over the batch, as `Conv`."""

  def __call__(self, inputs):
    return parallel.shard_batch(super().__call__(inputs))


def conv(features, kernel_size=3, strides=1, padding=1, *, use_bias=True, kernel_init=torch_default_init,
         bias_init=nn.initializers.zeros, name=None, dtype=None, ndim=2):
  """An `ndim`-D convolution (channels last: NHWC, or NLC for ndim=1) with PyTorch-style integer or explicit
  padding ('SAME' too)."""
  if isinstance(padding, int):
    padding = ((padding, padding),) * ndim
  return Conv(
      features, (kernel_size,) * ndim, strides=(strides,) * ndim, padding=padding, use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(kernel_init, (None,) * ndim + ('conv_in', 'conv_out')),
      bias_init=nn.with_logical_partitioning(bias_init, ('conv_out',)), name=name, dtype=dtype)


def dense(features, logical_axes, *, use_bias=True, kernel_init=torch_default_init, name=None, dtype=None):
  """A Dense layer whose kernel [in, out] carries the given logical axis names (bias: the output's)."""
  return Dense(
      features, use_bias=use_bias, name=name, dtype=dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, logical_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, logical_axes[-1:]))


def layer_norm(epsilon=1e-5, name=None):
  """LayerNorm as torch's default (eps 1e-5), statistics in float32."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))


def group_norm(num_groups=32, epsilon=1e-6, name=None):
  """GroupNorm as in the reference (32 groups, eps 1e-6), statistics in float32."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))


swish = nn.swish
leaky_relu = functools.partial(nn.leaky_relu, negative_slope=0.2)
