"""Thresholding of the predicted x0 at each sampling step (Imagen sec. 2.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def apply_threshold(x0: jax.Array, mode: str, percentile: float) -> jax.Array:
  """Applies 'dynamic', 'static' or 'none' thresholding to x0 [B, H, W, C]."""
  check_threshold(mode)
  if mode == "dynamic":
    return dynamic_threshold(x0, percentile)
  if mode == "static":
    return static_clip(x0)
  return x0
