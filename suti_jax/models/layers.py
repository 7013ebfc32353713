"""UNet building blocks: boxed-parameter layer factories, the log-SNR embedding,
FiLM ResBlocks and the resampling convolutions. Every parameter made here
carries logical axis names from `suti_jax.parallel.axes`."""

from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from suti_jax.parallel import axes

Array = jax.Array
IMAGE_AXES = (axes.ACT_BATCH, axes.ACT_HEIGHT, axes.ACT_WIDTH, axes.ACT_CHANNELS)
TOKEN_AXES = (axes.ACT_BATCH, axes.ACT_TOKENS, axes.ACT_CHANNELS)


def constrain_image(x: Array) -> Array:
  """Names the dimensions of an image activation [B, H, W, C] for sharding."""
  return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_tokens(x: Array) -> Array:
  """Names the dimensions of a token activation [B, N, C] for sharding."""
  return nn.with_logical_constraint(x, TOKEN_AXES)


def boxed(init: nn.initializers.Initializer, names: tuple[str, ...]):
  """An initializer whose output is boxed with logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, *, dtype: DTypeLike, param_dtype: DTypeLike,
          zero_init: bool = False, name: str | None = None) -> nn.Dense:
  """A Dense layer with kernel axes (EMBED, MLP) and bias axes (MLP,)."""
  kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype,
      kernel_init=boxed(kernel_init, (axes.EMBED, axes.MLP)),
      bias_init=boxed(nn.initializers.zeros, (axes.MLP,)), name=name)


def conv(features: int, kernel_size: int = 3, strides: int = 1, *,
         dtype: DTypeLike, param_dtype: DTypeLike,
         name: str | None = None) -> nn.Conv:
  """A 'SAME' conv with kernel axes (CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT)."""
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding="SAME", dtype=dtype, param_dtype=param_dtype,
      kernel_init=boxed(nn.initializers.lecun_normal(),
                        (axes.CONV_HEIGHT, axes.CONV_WIDTH, axes.CONV_IN, axes.CONV_OUT)),
      bias_init=boxed(nn.initializers.zeros, (axes.CONV_OUT,)), name=name)


def num_groups(channels: int, max_groups: int = 32) -> int:
  """The largest group count <= `max_groups` that divides `channels`."""
  return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class GroupNorm(nn.Module):
  """Group normalisation over [B, ..., C], as `nn.GroupNorm` (same parameters,
  epsilon and float32 statistics), with scale/bias axes (NORM,).

  The statistics average each channel over the positions first and then the
  channels of each group: reductions along contiguous channels, where flax's
  over a [..., groups, channels per group] view ran slowly on XLA:CPU (groups of
  2-3 channels at 64-96 channels).
  """

  num_groups: int
  epsilon: float = 1e-6
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, ..., C] -> [B, ..., C] in `dtype`."""
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {channels} channels")
    scale = self.param("scale", boxed(nn.initializers.ones, (axes.NORM,)), (channels,),
                       self.param_dtype)
    bias = self.param("bias", boxed(nn.initializers.zeros, (axes.NORM,)), (channels,),
                      self.param_dtype)
    x32 = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    positions = tuple(range(1, x.ndim - 1))
    moments = jnp.stack([jnp.mean(x32, positions), jnp.mean(jnp.square(x32), positions)])
    moments = einops.repeat(
        einops.reduce(moments, "m b (g k) -> m b g", "mean", g=self.num_groups),
        "m b g -> m b (g k)", k=channels // self.num_groups)
    mean, mean_square = moments
    # E[x^2] - E[x]^2 can round below zero.
    inv_std = jax.lax.rsqrt(jnp.maximum(0.0, mean_square - jnp.square(mean)) + self.epsilon)
    features = (x.shape[0],) + (1,) * len(positions) + (channels,)
    y = ((x32 - mean.reshape(features)) * (inv_std * scale).reshape(features)
         + bias.reshape((1,) * (x.ndim - 1) + (channels,)))
    return y.astype(self.dtype)


def group_norm(channels: int, *, dtype: DTypeLike, param_dtype: DTypeLike,
               name: str | None = None) -> GroupNorm:
  """GroupNorm with up to 32 groups."""
  return GroupNorm(num_groups(channels), dtype=dtype, param_dtype=param_dtype, name=name)


def layer_norm(*, dtype: DTypeLike, param_dtype: DTypeLike,
               name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis with scale/bias axes (NORM,)."""
  return nn.LayerNorm(
      dtype=dtype, param_dtype=param_dtype,
      scale_init=boxed(nn.initializers.ones, (axes.NORM,)),
      bias_init=boxed(nn.initializers.zeros, (axes.NORM,)), name=name)


def sinusoidal_embedding(log_snr: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Transformer-style sinusoidal features of the log-SNR.

  Args:
    log_snr: [B] noise levels (roughly in [-20, 20]).
    dim: even feature size.
    max_period: longest wavelength.

  Returns:
    [B, dim] float32 features (sin half, then cos half).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = log_snr.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class NoiseLevelEmbedding(nn.Module):
  """Sinusoidal log-SNR features -> 2-layer SiLU MLP (the timestep embedding)."""

  features: int
  sinusoid_dim: int
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, log_snr: Array) -> Array:
    """Embeds [B] log-SNRs as [B, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = sinusoidal_embedding(log_snr, self.sinusoid_dim)
    h = nn.silu(dense(self.features, name="dense_0", **kw)(h))
    return dense(self.features, name="dense_1", **kw)(h)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice; the embedding scales/shifts the 2nd norm (FiLM)."""

  out_channels: int
  dropout: float = 0.0
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] features.
      emb: [B, E] time (+ text, + noise-aug) embedding.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      [B, H, W, out_channels].
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(x.shape[-1], name="norm_0", **kw)(x))
    h = conv(self.out_channels, name="conv_0", **kw)(h)
    film = dense(2 * self.out_channels, name="film", **kw)(nn.silu(emb))
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = group_norm(self.out_channels, name="norm_1", **kw)(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_channels, name="conv_1", **kw)(h)
    skip = x
    if x.shape[-1] != self.out_channels:
      skip = conv(self.out_channels, kernel_size=1, name="skip", **kw)(x)
    return constrain_image(h + skip)


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 conv (channels unchanged)."""

  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C]."""
    y = conv(x.shape[-1], strides=2, dtype=self.dtype, param_dtype=self.param_dtype,
             name="conv")(x)
    return constrain_image(y)


def repeat_pixels(x: Array) -> Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2 x 2: the nearest-neighbour
  2x resize as a broadcast, whose gradient is a sum (`jax.image.resize` gathers, and
  its gradient is a scatter-add, slow on CPU)."""
  return einops.repeat(x, "b h w c -> b (h 2) (w 2) c")


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour resize, then a 3x3 conv."""

  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C]."""
    y = conv(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(
        repeat_pixels(x))
    return constrain_image(y)
