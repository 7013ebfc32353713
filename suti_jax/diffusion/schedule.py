"""Continuous-time noise schedules: t in [0, 1] -> log_snr, and (alpha, sigma).

Variants register by name with `register_schedule`; `make_schedule` builds one
from a `DiffusionConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from suti_jax.config import DiffusionConfig

# (t, log_snr_min, log_snr_max) -> log_snr, elementwise over t.
LogSnrFn = Callable[[jax.Array, float, float], jax.Array]

_SCHEDULES: dict[str, LogSnrFn] = {}


def register_schedule(name: str) -> Callable[[LogSnrFn], LogSnrFn]:
  """Decorator adding a log-SNR function to the registry under `name`."""

  def decorator(fn: LogSnrFn) -> LogSnrFn:
    if name in _SCHEDULES:
      raise ValueError(f"schedule {name!r} is already registered")
    _SCHEDULES[name] = fn
    return fn

  return decorator


def schedule_names() -> list[str]:
  """The registered schedule names, sorted."""
  return sorted(_SCHEDULES)


@register_schedule("cosine")
def cosine_log_snr(t: jax.Array, log_snr_min: float,
                   log_snr_max: float) -> jax.Array:
  """Cosine schedule, log_snr = -2 log tan(pi t / 2) (Nichol & Dhariwal 2021).

  The continuous form of Kingma et al. 2021 (VDM) / Hoogeboom et al. 2023: the
  angle range is shifted so that t=0 gives exactly `log_snr_max` and t=1
  exactly `log_snr_min`, instead of clipping the (infinite) endpoints.

  Args:
    t: times in [0, 1], any shape.
    log_snr_min: log_snr at t=1.
    log_snr_max: log_snr at t=0.

  Returns:
    log_snr, same shape as `t`, strictly decreasing in t.
  """
  angle_min = math.atan(math.exp(-0.5 * log_snr_max))
  angle_max = math.atan(math.exp(-0.5 * log_snr_min))
  return -2.0 * jnp.log(jnp.tan(angle_min + t * (angle_max - angle_min)))


@register_schedule("linear")
def linear_log_snr(t: jax.Array, log_snr_min: float,
                   log_snr_max: float) -> jax.Array:
  """log_snr linear in t, from `log_snr_max` at t=0 to `log_snr_min` at t=1.

  This is linear in log-SNR, not Ho et al.'s linear-beta schedule; that one is
  `linear_beta`.

  Args:
    t: times in [0, 1], any shape.
    log_snr_min: log_snr at t=1.
    log_snr_max: log_snr at t=0.

  Returns:
    log_snr, same shape as `t`.
  """
  return log_snr_max + t * (log_snr_min - log_snr_max)


@register_schedule("linear_beta")
def linear_beta_log_snr(t: jax.Array, log_snr_min: float,
                        log_snr_max: float) -> jax.Array:
  """Continuous limit of DDPM's linear betas (1e-4 to 0.02 over 1000 steps).

  log_snr = -log(expm1(1e-4 + 10 t^2)), the form used by Imagen's public
  reimplementation (imagen-pytorch `beta_linear_log_snr`). Its natural range
  is about [-10, 9.2]; it is clipped into [log_snr_min, log_snr_max].

  Args:
    t: times in [0, 1], any shape.
    log_snr_min: lower clip.
    log_snr_max: upper clip.

  Returns:
    log_snr, same shape as `t`, non-increasing in t.
  """
  log_snr = -jnp.log(jnp.expm1(1e-4 + 10.0 * jnp.square(t)))
  return jnp.clip(log_snr, log_snr_min, log_snr_max)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A named log-SNR schedule with its range; hashable, so usable as static.

  Attributes:
    name: a registered schedule name.
    log_snr_min: log_snr at t=1 (most noise).
    log_snr_max: log_snr at t=0 (least noise).
  """

  name: str = "cosine"
  log_snr_min: float = -20.0
  log_snr_max: float = 20.0

  def __post_init__(self):
    if self.name not in _SCHEDULES:
      raise ValueError(
          f"unknown schedule {self.name!r}; known: {schedule_names()}")
    if not self.log_snr_min < self.log_snr_max:
      raise ValueError(
          f"need log_snr_min < log_snr_max, got {self.log_snr_min} and "
          f"{self.log_snr_max}")

  def __call__(self, t: jax.Array) -> jax.Array:
    """log_snr at times `t` in [0, 1] (any shape), as float32."""
    t = jnp.asarray(t, jnp.float32)
    return _SCHEDULES[self.name](t, self.log_snr_min, self.log_snr_max)


def make_schedule(cfg: DiffusionConfig) -> Schedule:
  """The schedule named by `cfg.schedule` over [cfg.log_snr_min, cfg.log_snr_max]."""
  return Schedule(cfg.schedule, cfg.log_snr_min, cfg.log_snr_max)


def alpha_sigma(log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Signal and noise scales of x_t = alpha x0 + sigma eps (variance preserving).

  Args:
    log_snr: log(alpha^2 / sigma^2), any shape.

  Returns:
    (alpha, sigma), each the shape of `log_snr`, with alpha^2 + sigma^2 = 1.
  """
  return (jnp.sqrt(jax.nn.sigmoid(log_snr)),
          jnp.sqrt(jax.nn.sigmoid(-log_snr)))
