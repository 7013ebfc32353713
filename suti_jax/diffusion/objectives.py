"""Forward process x_t = alpha x0 + sigma eps, and eps / x0 / v conversions.

Also the training targets and loss weights per prediction type ('eps', 'v', 'x0').
Every `log_snr` is [B] (or a scalar) and broadcasts over the trailing axes of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from suti_jax.diffusion.schedule import alpha_sigma

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")


def check_prediction(prediction: str) -> None:
  """Raises ValueError unless `prediction` is one of PREDICTIONS."""
  if prediction not in PREDICTIONS:
    raise ValueError(
        f"unknown prediction {prediction!r}; known: {list(PREDICTIONS)}")


def _alpha_sigma_like(log_snr: jax.Array,
                      x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """alpha, sigma of `log_snr` [B] reshaped to [B, 1, ..., 1] to broadcast on x."""
  log_snr = jnp.asarray(log_snr, jnp.float32)
  log_snr = log_snr.reshape(log_snr.shape + (1,) * (x.ndim - log_snr.ndim))
  return alpha_sigma(log_snr)


def q_sample(x0: jax.Array, eps: jax.Array, log_snr: jax.Array) -> jax.Array:
  """Noises clean data: x_t = alpha x0 + sigma eps.

  Args:
    x0: clean data [B, H, W, C].
    eps: standard normal noise [B, H, W, C].
    log_snr: [B].

  Returns:
    x_t [B, H, W, C].
  """
  alpha, sigma = _alpha_sigma_like(log_snr, x0)
  return alpha * x0 + sigma * eps


def x0_from_eps(x_t: jax.Array, eps: jax.Array, log_snr: jax.Array) -> jax.Array:
  """x0 = (x_t - sigma eps) / alpha; x_t, eps [B, H, W, C], log_snr [B]."""
  alpha, sigma = _alpha_sigma_like(log_snr, x_t)
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: jax.Array, x0: jax.Array, log_snr: jax.Array) -> jax.Array:
  """eps = (x_t - alpha x0) / sigma; x_t, x0 [B, H, W, C], log_snr [B]."""
  alpha, sigma = _alpha_sigma_like(log_snr, x_t)
  return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, log_snr: jax.Array) -> jax.Array:
  """v = alpha eps - sigma x0 (Salimans & Ho 2022); x0, eps [B, H, W, C]."""
  alpha, sigma = _alpha_sigma_like(log_snr, x0)
  return alpha * eps - sigma * x0


def x0_eps_from_v(x_t: jax.Array, v: jax.Array,
                  log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverts v: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.

  Args:
    x_t: [B, H, W, C].
    v: [B, H, W, C].
    log_snr: [B].

  Returns:
    (x0, eps), each [B, H, W, C].
  """
  alpha, sigma = _alpha_sigma_like(log_snr, x_t)
  return alpha * x_t - sigma * v, sigma * x_t + alpha * v


def to_x0_eps(pred: jax.Array, x_t: jax.Array, log_snr: jax.Array,
              prediction: str) -> tuple[jax.Array, jax.Array]:
  """Model output -> (x0, eps) for any prediction type.

  An x0 model's eps is (x_t - alpha x0) / sigma, which amplifies its error by
  alpha / sigma at low noise; samplers that threshold x0 are unaffected.

  Args:
    pred: model output [B, H, W, C] (eps, v or x0).
    x_t: the model input [B, H, W, C].
    log_snr: [B].
    prediction: 'eps', 'v' or 'x0'.

  Returns:
    (x0, eps), each [B, H, W, C].
  """
  check_prediction(prediction)
  if prediction == "eps":
    return x0_from_eps(x_t, pred, log_snr), pred
  if prediction == "x0":
    return pred, eps_from_x0(x_t, pred, log_snr)
  return x0_eps_from_v(x_t, pred, log_snr)


def prediction_target(x0: jax.Array, eps: jax.Array, log_snr: jax.Array,
                      prediction: str) -> jax.Array:
  """The regression target of a model of the given prediction type.

  Args:
    x0: clean data [B, H, W, C].
    eps: the noise used in x_t [B, H, W, C].
    log_snr: [B].
    prediction: 'eps', 'v' or 'x0'.

  Returns:
    eps, v or x0, [B, H, W, C].
  """
  check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  return v_from_x0_eps(x0, eps, log_snr)


def loss_weight(log_snr: jax.Array, prediction: str, weighting: str,
                min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example weight of the MSE on the prediction target.

  'min_snr' is Min-SNR-gamma (Hang et al. 2023, eq. 8 and sec. 3.4): the x0-space
  weight min(SNR, gamma) expressed in target space: min(SNR, gamma) / SNR for eps,
  min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) itself for x0 (an eps error
  is sqrt(SNR) times the x0 error it implies, a v error sqrt(SNR + 1) times).
  Written with exp(-log_snr) and sigmoid(-log_snr) = 1 / (SNR + 1) so it stays
  finite for |log_snr| ~ 20.

  Args:
    log_snr: [B].
    prediction: 'eps', 'v' or 'x0'.
    weighting: 'none' or 'min_snr'.
    min_snr_gamma: gamma (the paper uses 5).

  Returns:
    weights [B].
  """
  check_prediction(prediction)
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(
        f"unknown loss weighting {weighting!r}; known: {list(LOSS_WEIGHTINGS)}")
  log_snr = jnp.asarray(log_snr, jnp.float32)
  if weighting == "none":
    return jnp.ones_like(log_snr)
  if prediction == "eps":
    return jnp.minimum(1.0, min_snr_gamma * jnp.exp(-log_snr))
  if prediction == "x0":
    return jnp.minimum(jnp.exp(log_snr), min_snr_gamma)
  return jnp.minimum(jnp.exp(log_snr), min_snr_gamma) * jax.nn.sigmoid(-log_snr)
