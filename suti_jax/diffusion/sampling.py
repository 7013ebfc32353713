"""Ancestral (DDPM), DDIM and DPM-Solver++(2M) samplers over a uniform t grid
from 1 to 0.

One `jax.lax.fori_loop`, so `sample` jits as a whole; guidance and x0
thresholding happen at every step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from suti_jax.config import SamplingConfig
from suti_jax.diffusion import guidance as guidance_lib
from suti_jax.diffusion import objectives
from suti_jax.diffusion import thresholding
from suti_jax.diffusion.schedule import Schedule, alpha_sigma

# (x_t, x0, eps, log_snr_t, log_snr_s, key, eta) -> x_s, all images
# [B, H, W, C], log-SNRs [B, 1, 1, 1].
StepFn = Callable[..., jax.Array]


def _posterior_ratio(log_snr_t: jax.Array, log_snr_s: jax.Array) -> jax.Array:
  """1 - SNR_t / SNR_s = sigma_{t|s}^2 / sigma_t^2 for s < t (Kingma et al.
  2021, appendix A), via expm1 so it is accurate when the steps are small."""
  return -jnp.expm1(log_snr_t - log_snr_s)


def ddpm_step(x_t: jax.Array, x0: jax.Array, eps: jax.Array,
              log_snr_t: jax.Array, log_snr_s: jax.Array, key: jax.Array,
              eta: float) -> jax.Array:
  """Draws x_s ~ q(x_s | x_t, x0) with x0 the model's estimate (Ho et al. 2020).

  Mean alpha_t sigma_s^2 / (alpha_s sigma_t^2) x_t + alpha_s c x0 and variance
  sigma_s^2 c with c = 1 - SNR_t / SNR_s. `eps` and `eta` are unused (the
  posterior needs only x0); they keep the StepFn signature.

  Returns:
    x_s [B, H, W, C].
  """
  del eps, eta
  alpha_t, sigma_t = alpha_sigma(log_snr_t)
  alpha_s, sigma_s = alpha_sigma(log_snr_s)
  c = _posterior_ratio(log_snr_t, log_snr_s)
  mean = (alpha_t * jnp.square(sigma_s) / (alpha_s * jnp.square(sigma_t)) * x_t
          + alpha_s * c * x0)
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  return mean + sigma_s * jnp.sqrt(c) * noise


def ddim_step(x_t: jax.Array, x0: jax.Array, eps: jax.Array,
              log_snr_t: jax.Array, log_snr_s: jax.Array, key: jax.Array,
              eta: float) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + dir * eps + noise.

  The noise std is eta times the ancestral posterior std, so eta = 0 is the
  deterministic sampler and eta = 1 matches DDPM's marginals.

  Returns:
    x_s [B, H, W, C].
  """
  del x_t
  alpha_s, sigma_s = alpha_sigma(log_snr_s)
  x_s = alpha_s * x0
  if eta == 0.0:
    return x_s + sigma_s * eps
  noise_std = eta * sigma_s * jnp.sqrt(_posterior_ratio(log_snr_t, log_snr_s))
  direction = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - jnp.square(noise_std),
                                   0.0))
  noise = jax.random.normal(key, x0.shape, x0.dtype)
  return x_s + direction * eps + noise_std * noise


def dpm_solver_2m_x0(x0: jax.Array, x0_prev: jax.Array, log_snr_prev: jax.Array,
                     log_snr_t: jax.Array, log_snr_s: jax.Array) -> jax.Array:
  """The data prediction of a DPM-Solver++(2M) step (Lu et al. 2022, alg. 2).

  With lambda = log_snr / 2, h = lambda_s - lambda_t and r = h_prev / h, the
  step is DDIM's (eta = 0) on D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev: the x0
  predictions of this step and the previous one extrapolated linearly in
  lambda, which makes the sampler second order in the step size.

  Args:
    x0: this step's (thresholded) x0 prediction at log_snr_t.
    x0_prev: the previous step's, at log_snr_prev.
    log_snr_prev / log_snr_t / log_snr_s: the previous, current and next
      log-SNR (increasing), broadcastable to the images.

  Returns:
    D, the x0 that the DDIM step moves with.
  """
  ratio = (log_snr_t - log_snr_prev) / (log_snr_s - log_snr_t)
  weight = 0.5 / ratio
  return (1.0 + weight) * x0 - weight * x0_prev


SAMPLERS: dict[str, StepFn] = {"ddpm": ddpm_step, "ddim": ddim_step,
                               "dpm_solver_2m": ddim_step}
# Samplers whose step moves with `dpm_solver_2m_x0` instead of the x0 prediction.
SECOND_ORDER = frozenset({"dpm_solver_2m"})


def check_sampling(cfg: SamplingConfig, has_exemplars: bool) -> None:
  """Raises ValueError for unknown names or bad values in `cfg`."""
  if cfg.sampler not in SAMPLERS:
    raise ValueError(
        f"unknown sampler {cfg.sampler!r}; known: {sorted(SAMPLERS)}")
  if cfg.num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {cfg.num_steps}")
  if cfg.eta < 0.0:
    raise ValueError(f"eta must be >= 0, got {cfg.eta}")
  if cfg.sampler in SECOND_ORDER and cfg.eta != 0.0:
    raise ValueError(f"sampler {cfg.sampler!r} is deterministic; it needs eta=0, "
                     f"got {cfg.eta}")
  thresholding.check_threshold(cfg.threshold)
  guidance_lib.check_guidance(cfg.guidance, has_exemplars)


def sample(predict_fn: guidance_lib.Predictor, shape: tuple[int, ...],
           key: jax.Array, schedule: Schedule, cfg: SamplingConfig,
           prediction: str, *, has_exemplars: bool = False,
           x_T: jax.Array | None = None) -> jax.Array:  # pylint: disable=invalid-name
  """Generates images by integrating from t = 1 to t = 0 in `cfg.num_steps`.

  Each step: guided model output at t -> (x0, eps); x0 is thresholded and eps
  recomputed from it (Imagen sec. 2.3), then the sampler moves to the next
  grid time s. The last step returns the thresholded x0 itself.

  Args:
    predict_fn: the model with conditioning bound, per the guidance contract
      (a PredictFn, or a BatchedPredictFn to run all conditions in one call).
    shape: [B, H, W, C] of the output.
    key: PRNG key for x_T and the sampler noise.
    schedule: the stage's log-SNR schedule.
    cfg: sampler, step count, eta, guidance and thresholding.
    prediction: the model's output type, 'eps', 'v' or 'x0'.
    has_exemplars: whether the model is conditioned on exemplars.
    x_T: optional initial noise [B, H, W, C]; drawn from `key` if None.

  Returns:
    Samples [B, H, W, C] in [-1, 1].
  """
  check_sampling(cfg, has_exemplars)
  objectives.check_prediction(prediction)
  step_fn = SAMPLERS[cfg.sampler]
  init_key, loop_key = jax.random.split(key)
  x_init = (jax.random.normal(init_key, shape, jnp.float32) if x_T is None
            else jnp.asarray(x_T, jnp.float32))
  batch_size = shape[0]
  num_steps = cfg.num_steps
  t_grid = jnp.linspace(1.0, 0.0, num_steps + 1)
  expand = (slice(None),) + (None,) * (len(shape) - 1)

  def log_snr_at(step: jax.Array) -> jax.Array:  # [B, 1, 1, 1]
    return schedule(jnp.full((batch_size,), t_grid[step]))[expand]

  def body(step: jax.Array, carry: tuple[jax.Array, jax.Array]
           ) -> tuple[jax.Array, jax.Array]:
    x_t, x0_prev = carry
    log_snr_t = schedule(jnp.full((batch_size,), t_grid[step]))
    pred = guidance_lib.guided_prediction(
        predict_fn, x_t, log_snr_t, step, cfg, has_exemplars=has_exemplars)
    x0, _ = objectives.to_x0_eps(pred.astype(jnp.float32), x_t, log_snr_t,
                                 prediction)
    x0 = thresholding.apply_threshold(x0, cfg.threshold,
                                      cfg.threshold_percentile)
    log_snr_t, log_snr_s = log_snr_t[expand], log_snr_at(step + 1)
    moving_x0 = x0
    if cfg.sampler in SECOND_ORDER:
      # The first step has no previous prediction: a first-order (DDIM) step.
      # (Its stand-in previous log-SNR only keeps the unused branch finite.)
      first = step == 0
      log_snr_prev = jnp.where(first, 2 * log_snr_t - log_snr_s,
                               log_snr_at(jnp.maximum(step - 1, 0)))
      moving_x0 = jnp.where(first, x0, dpm_solver_2m_x0(x0, x0_prev, log_snr_prev,
                                                        log_snr_t, log_snr_s))
    eps = objectives.eps_from_x0(x_t, moving_x0, log_snr_t)
    x_s = step_fn(x_t, moving_x0, eps, log_snr_t, log_snr_s,
                  jax.random.fold_in(loop_key, step), cfg.eta)
    return jnp.where(step == num_steps - 1, x0, x_s), x0

  x0, _ = jax.lax.fori_loop(0, num_steps, body, (x_init, jnp.zeros_like(x_init)))
  return jnp.clip(x0, -1.0, 1.0)
