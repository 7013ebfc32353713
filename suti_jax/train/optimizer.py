"""The optax optimizer from an OptimizerConfig (warmup + constant/cosine
schedule, global-norm clipping, frozen-parameter masks) and the weight EMA.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from suti_jax.config import OptimizerConfig

OPTIMIZERS = ("adafactor", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant or cosine decay.

  Args:
    cfg: learning_rate, warmup_steps, schedule, decay_steps (cosine: steps
      after warmup until `end_learning_rate`).

  Returns:
    step -> learning rate.
  """
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}; known: {SCHEDULES}")
  if cfg.schedule == "cosine":
    if cfg.decay_steps <= 0:
      raise ValueError("optimizer.schedule='cosine' needs optimizer.decay_steps > 0")
    alpha = cfg.end_learning_rate / cfg.learning_rate if cfg.learning_rate else 0.0
    after = optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps, alpha=alpha)
  else:
    after = optax.constant_schedule(cfg.learning_rate)
  if cfg.warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _base(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  if cfg.name == "adafactor":
    # Imagen's "Adafactor, lr 1e-4" is an absolute step size: no parameter-scale
    # multiplier, and no update clipping on top of the global-norm clip.
    return optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=None,
                           weight_decay_rate=cfg.weight_decay or None)
  if cfg.name == "adam":
    if cfg.weight_decay:
      raise ValueError("optimizer.weight_decay needs optimizer.name='adamw' (adam has none)")
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  if cfg.name == "adamw":
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  raise ValueError(f"optimizer.name={cfg.name!r}; known: {OPTIMIZERS}")


def make_optimizer(cfg: OptimizerConfig, trainable: Any = None) -> optax.GradientTransformation:
  """Clip by global norm, then the named optimizer, on trainable params only.

  Args:
    cfg: the optimizer section.
    trainable: optional tree of Python bools shaped like the params (the
      UNet's `surgery.trainable_mask`); frozen leaves get zero updates and no
      optimizer state, and the clip norm covers trainable grads only.

  Returns:
    An optax GradientTransformation.
  """
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  tx = optax.chain(*chain, _base(cfg, learning_rate_schedule(cfg)))
  if trainable is None:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_decay(cfg: OptimizerConfig, step: jax.Array) -> jax.Array:
  """EMA decay at `step` (the number of updates applied before this one).

  `ema_warmup_steps == 0`: the constant `ema_decay`. Otherwise the EMA copies
  the weights for the first `ema_warmup_steps` steps, then follows
  min(ema_decay, (1 + n) / (10 + n)) with n the steps since, so early noisy
  weights fade quickly (the TF ExponentialMovingAverage num_updates rule).

  Args:
    cfg: ema_decay and ema_warmup_steps.
    step: scalar int step.

  Returns:
    A float32 scalar in [0, ema_decay].
  """
  if cfg.ema_warmup_steps <= 0:
    return jnp.asarray(cfg.ema_decay, jnp.float32)
  n = jnp.asarray(step, jnp.float32) - cfg.ema_warmup_steps
  ramp = jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n))
  return jnp.where(n < 0, 0.0, ramp)


def update_ema(ema: Any, params: Any, decay: jax.Array, trainable: Any = None) -> Any:
  """ema <- decay * ema + (1 - decay) * params; frozen leaves are kept as is.

  Args:
    ema: EMA params.
    params: the params after this step's update.
    decay: scalar decay.
    trainable: optional bool tree like `params`; False leaves are returned
      untouched (bit-identical), since a convex blend of equal values can round.

  Returns:
    The new EMA params.
  """
  if trainable is None:
    trainable = jax.tree.map(lambda _: True, params)
  return jax.tree.map(
      lambda t, e, p: (e + (1.0 - decay) * (p - e)).astype(e.dtype) if t else e,
      trainable, ema, params)
