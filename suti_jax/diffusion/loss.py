"""Training-time diffusion pieces: the denoising loss, noise conditioning
augmentation of SR inputs, and condition dropout for classifier-free guidance.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from suti_jax.config import DiffusionConfig
from suti_jax.diffusion import objectives
from suti_jax.diffusion.schedule import Schedule

# (x_t [B, H, W, C], log_snr [B]) -> model output [B, H, W, C].
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def denoising_loss(predict_fn: DenoiseFn, x0: jax.Array, key: jax.Array,
                   schedule: Schedule,
                   cfg: DiffusionConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted MSE between the model output and its eps or v target.

  t ~ U[0, 1] and eps ~ N(0, I) per example (continuous-time objective of
  Kingma et al. 2021, as in Imagen).

  Args:
    predict_fn: the model with its conditioning bound, (x_t, log_snr) -> pred.
    x0: clean images [B, H, W, C].
    key: PRNG key.
    schedule: maps t to log_snr.
    cfg: prediction type and loss weighting.

  Returns:
    (loss [B], aux) where aux has 'mse' [B] (unweighted), 'log_snr' [B] and
    'weight' [B].
  """
  t_key, eps_key = jax.random.split(key)
  batch_size = x0.shape[0]
  t = jax.random.uniform(t_key, (batch_size,))
  log_snr = schedule(t)
  eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
  x_t = objectives.q_sample(x0, eps, log_snr)
  target = objectives.prediction_target(x0, eps, log_snr, cfg.prediction)
  pred = predict_fn(x_t, log_snr).astype(jnp.float32)
  mse = jnp.mean(jnp.square(pred - target).reshape(batch_size, -1), axis=1)
  weight = objectives.loss_weight(log_snr, cfg.prediction, cfg.loss_weighting,
                                  cfg.min_snr_gamma)
  return weight * mse, {"mse": mse, "log_snr": log_snr, "weight": weight}


def noise_augment(low_res: jax.Array, key: jax.Array, schedule: Schedule, *,
                  max_t: float | None = None,
                  t: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Noise conditioning augmentation of an SR stage's low-res input.

  Imagen (Saharia et al. 2022, sec. 2.5): in training the aug time is drawn
  per example from U[0, max_t]; at sampling a fixed time t is used. The model
  is told the level through `aug_log_snr`. Give exactly one of max_t and t.

  Args:
    low_res: low-res images [B, h, w, C] in [-1, 1].
    key: PRNG key.
    schedule: maps aug time to log_snr (the stage's own schedule).
    max_t: training: upper end of the uniform aug time.
    t: sampling: the fixed aug time.

  Returns:
    (aug_low_res [B, h, w, C], aug_log_snr [B]).
  """
  if (max_t is None) == (t is None):
    raise ValueError("give exactly one of max_t (training) and t (sampling)")
  t_key, eps_key = jax.random.split(key)
  batch_size = low_res.shape[0]
  if t is None:
    aug_t = jax.random.uniform(t_key, (batch_size,), maxval=max_t)
  else:
    aug_t = jnp.full((batch_size,), t, jnp.float32)
  aug_log_snr = schedule(aug_t)
  eps = jax.random.normal(eps_key, low_res.shape, low_res.dtype)
  return objectives.q_sample(low_res, eps, aug_log_snr), aug_log_snr


def condition_dropout(key: jax.Array, batch_size: int,
                      cfg: DiffusionConfig) -> tuple[jax.Array, jax.Array]:
  """Which examples keep their text and exemplar conditions this step.

  Three disjoint events (Ho & Salimans 2022 CFG, extended to two conditions):
  drop text only (`text_drop_prob`), drop exemplars only
  (`exemplar_drop_prob`), drop both (`both_drop_prob`).

  Args:
    key: PRNG key.
    batch_size: B.
    cfg: the three probabilities; each >= 0 and summing to <= 1.

  Returns:
    (keep_text [B] bool, keep_exemplars [B] bool).
  """
  probs = (cfg.text_drop_prob, cfg.exemplar_drop_prob, cfg.both_drop_prob)
  if min(probs) < 0.0 or sum(probs) > 1.0:
    raise ValueError(
        "condition dropout needs text_drop_prob, exemplar_drop_prob and "
        f"both_drop_prob >= 0 summing to <= 1, got {probs}")
  p_text, p_exemplar, p_both = probs
  u = jax.random.uniform(key, (batch_size,))
  drop_text_only = u < p_text
  drop_exemplar_only = (u >= p_text) & (u < p_text + p_exemplar)
  drop_both = (u >= p_text + p_exemplar) & (u < p_text + p_exemplar + p_both)
  keep_text = ~(drop_text_only | drop_both)
  keep_exemplars = ~(drop_exemplar_only | drop_both)
  return keep_text, keep_exemplars
