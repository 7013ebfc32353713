"""Thresholding of the predicted x0 at each sampling step (Imagen sec. 2.3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS = ("dynamic", "static", "none")


def check_threshold(mode: str) -> None:
  """Raises ValueError unless `mode` is one of THRESHOLDS."""
  if mode not in THRESHOLDS:
    raise ValueError(f"unknown threshold {mode!r}; known: {list(THRESHOLDS)}")


def static_clip(x0: jax.Array) -> jax.Array:
  """Clips x0 to the data range [-1, 1]."""
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
  """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3).

  s = max(1, quantile(|x0|, percentile)) per example; x0 is clipped to [-s, s]
  and divided by s, so saturated pixels are pushed inwards instead of clipped.
  Inputs already in [-1, 1] come back unchanged (s = 1).

  Args:
    x0: predicted clean images [B, H, W, C].
    percentile: quantile in [0, 1] (Imagen: 0.995).

  Returns:
    [B, H, W, C] in [-1, 1].
  """
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(upper_quantile(flat, percentile), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


# Bit pattern of float32 +inf: every finite non-negative float32's pattern, read
# as an int32, lies in [0, INF_BITS] and orders as the float does.
INF_BITS = 0x7F800000


def _order_statistic_bits(bits: jax.Array, rank: int) -> jax.Array:
  """Bit pattern of each row's `rank`-th smallest value (0-based), by bisection
  on the patterns: the smallest b with count(bits <= b) > rank. 31 halvings of
  [0, INF_BITS] leave one pattern, so the value is exact."""
  rows = bits.shape[0]

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    enough = jnp.sum(bits <= mid[:, None], axis=1, dtype=jnp.int32) > rank
    return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

  bounds = (jnp.zeros((rows,), jnp.int32), jnp.full((rows,), INF_BITS, jnp.int32))
  return jax.lax.fori_loop(0, INF_BITS.bit_length(), halve, bounds)[1]


def upper_quantile(values: jax.Array, q: float) -> jax.Array:
  """`jnp.quantile(values, q, axis=1)` (linear interpolation) of non-negative
  values, exactly.

  The order statistics come from a bisection over the values' float32 bit
  patterns (31 compare-and-count passes over each row) rather than a sort or
  `lax.top_k`: XLA:CPU's top_k took 1.7 ms for 20 rows of 768 values and
  118 ms for 64 rows of 12,288 against 0.18 and 7.8 ms, and `lax.top_k`
  lowers to a StableHLO composite that TensorFlow's SavedModel runtime cannot
  load, which broke the serving export.

  Args:
    values: [B, N] non-negative, finite (dynamic thresholding's |x0|).
    q: quantile in [0, 1] (static).

  Returns:
    [B] float32.
  """
  values = values.astype(jnp.float32)
  n = values.shape[1]
  position = np.float32(q) * np.float32(n - 1)
  low, high = int(math.floor(position)), int(math.ceil(position))
  high_weight = np.float32(position - np.float32(low))
  bits = jax.lax.bitcast_convert_type(values, jnp.int32)
  low_bits = _order_statistic_bits(bits, low)
  at_low = jax.lax.bitcast_convert_type(low_bits, jnp.float32)
  if high == low:
    return at_low
  # The next order statistic: the same value when it repeats, else the
  # smallest value above it.
  repeats = jnp.sum(bits <= low_bits[:, None], axis=1) > high
  above = jnp.min(jnp.where(bits > low_bits[:, None], values, jnp.inf), axis=1)
  at_high = jnp.where(repeats, at_low, above)
  return at_low * (np.float32(1) - high_weight) + at_high * high_weight


def apply_threshold(x0: jax.Array, mode: str, percentile: float) -> jax.Array:
  """Applies 'dynamic', 'static' or 'none' thresholding to x0 [B, H, W, C]."""
  check_threshold(mode)
  if mode == "dynamic":
    return dynamic_threshold(x0, percentile)
  if mode == "static":
    return static_clip(x0)
  return x0
