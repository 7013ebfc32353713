"""Tests for suti_jax.diffusion.objectives and suti_jax.diffusion.loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti_jax.config import DiffusionConfig
from suti_jax.diffusion import loss
from suti_jax.diffusion import objectives
from suti_jax.diffusion.schedule import Schedule

SHAPE = (4, 8, 8, 3)


def _tensors(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.uniform(k1, SHAPE, minval=-1, maxval=1)
  eps = jax.random.normal(k2, SHAPE)
  log_snr = jax.random.uniform(k3, (SHAPE[0],), minval=-5, maxval=5)
  return x0, eps, log_snr


def test_q_sample_broadcasts_per_example():
  x0, eps, log_snr = _tensors()
  x_t = objectives.q_sample(x0, eps, log_snr)
  alpha = np.sqrt(1 / (1 + np.exp(-np.asarray(log_snr))))
  sigma = np.sqrt(1 / (1 + np.exp(np.asarray(log_snr))))
  expected = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
  np.testing.assert_allclose(x_t, expected, atol=1e-6)


def test_round_trips():
  x0, eps, log_snr = _tensors()
  x_t = objectives.q_sample(x0, eps, log_snr)
  np.testing.assert_allclose(objectives.x0_from_eps(x_t, eps, log_snr), x0,
                             atol=1e-5)
  np.testing.assert_allclose(objectives.eps_from_x0(x_t, x0, log_snr), eps,
                             atol=1e-5)
  v = objectives.v_from_x0_eps(x0, eps, log_snr)
  x0_v, eps_v = objectives.x0_eps_from_v(x_t, v, log_snr)
  np.testing.assert_allclose(x0_v, x0, atol=1e-5)
  np.testing.assert_allclose(eps_v, eps, atol=1e-5)
  for prediction in ("eps", "v", "x0"):
    target = objectives.prediction_target(x0, eps, log_snr, prediction)
    x0_p, eps_p = objectives.to_x0_eps(target, x_t, log_snr, prediction)
    np.testing.assert_allclose(x0_p, x0, atol=1e-5)
    np.testing.assert_allclose(eps_p, eps, atol=1e-4)
  np.testing.assert_array_equal(objectives.prediction_target(x0, eps, log_snr, "x0"), x0)
  with pytest.raises(ValueError, match="known"):
    objectives.to_x0_eps(eps, x_t, log_snr, "score")


def test_min_snr_weights_at_known_snrs():
  log_snr = jnp.log(jnp.array([1.0, 5.0, 20.0]))
  gamma = 5.0
  np.testing.assert_allclose(
      objectives.loss_weight(log_snr, "eps", "min_snr", gamma),
      [1.0, 1.0, 5 / 20], rtol=1e-5)
  np.testing.assert_allclose(
      objectives.loss_weight(log_snr, "v", "min_snr", gamma),
      [1 / 2, 5 / 6, 5 / 21], rtol=1e-5)
  np.testing.assert_array_equal(
      objectives.loss_weight(log_snr, "v", "none"), [1.0, 1.0, 1.0])
  np.testing.assert_allclose(
      objectives.loss_weight(log_snr, "x0", "min_snr", gamma), [1.0, 5.0, 5.0], rtol=1e-5)
  for prediction in ("eps", "v", "x0"):
    extreme = objectives.loss_weight(jnp.array([-20.0, 20.0]), prediction, "min_snr")
    assert np.all(np.isfinite(extreme))
  with pytest.raises(ValueError, match="known"):
    objectives.loss_weight(log_snr, "eps", "p2")


def test_min_snr_is_one_x0_space_weight_for_every_prediction():
  """Each target's weighted error is min(SNR, gamma) times the implied x0 error."""
  x0, eps, log_snr = _tensors()
  x_t = objectives.q_sample(x0, eps, log_snr)
  x0_hat = x0 + 0.1 * jax.random.normal(jax.random.PRNGKey(9), SHAPE)
  eps_hat = objectives.eps_from_x0(x_t, x0_hat, log_snr)
  x0_error = jnp.mean(jnp.square(x0_hat - x0).reshape(SHAPE[0], -1), axis=1)
  want = jnp.minimum(jnp.exp(log_snr), 5.0) * x0_error
  for prediction in ("eps", "v", "x0"):
    target = objectives.prediction_target(x0, eps, log_snr, prediction)
    pred = objectives.prediction_target(x0_hat, eps_hat, log_snr, prediction)
    mse = jnp.mean(jnp.square(pred - target).reshape(SHAPE[0], -1), axis=1)
    weighted = objectives.loss_weight(log_snr, prediction, "min_snr", 5.0) * mse
    np.testing.assert_allclose(weighted, want, rtol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_denoising_loss_oracle_is_zero_and_wrong_model_is_not(prediction):
  cfg = DiffusionConfig(prediction=prediction, loss_weighting="min_snr")
  sched = Schedule("cosine")
  x_star = jax.random.uniform(jax.random.PRNGKey(1), SHAPE, minval=-1, maxval=1)

  def oracle(x_t, log_snr):
    eps = objectives.eps_from_x0(x_t, x_star, log_snr)
    return objectives.prediction_target(x_star, eps, log_snr, prediction)

  key = jax.random.PRNGKey(2)
  per_example, aux = loss.denoising_loss(oracle, x_star, key, sched, cfg)
  assert per_example.shape == (SHAPE[0],)
  # eps recovered from x_t divides by sigma, which is ~1e-4 near t = 0.
  np.testing.assert_allclose(per_example, 0.0, atol=1e-4)
  assert set(aux) == {"mse", "log_snr", "weight"}
  zeros, aux = loss.denoising_loss(lambda x_t, s: jnp.zeros_like(x_t), x_star,
                                   key, sched, cfg)
  assert np.all(zeros > 1e-3)
  np.testing.assert_allclose(zeros, aux["weight"] * aux["mse"], rtol=1e-6)
  np.testing.assert_allclose(
      aux["weight"],
      objectives.loss_weight(aux["log_snr"], prediction, "min_snr", 5.0))
  assert np.any(aux["weight"] < 0.99)


def test_noise_augment():
  sched = Schedule("cosine")
  low_res = jax.random.uniform(jax.random.PRNGKey(0), SHAPE, minval=-1, maxval=1)
  key = jax.random.PRNGKey(3)
  clean, clean_log_snr = loss.noise_augment(low_res, key, sched, t=0.0)
  np.testing.assert_allclose(clean, low_res, atol=3e-4)
  np.testing.assert_allclose(clean_log_snr, 20.0, atol=1e-3)
  noisy, noisy_log_snr = loss.noise_augment(low_res, key, sched, t=0.5)
  np.testing.assert_allclose(noisy_log_snr, 0.0, atol=1e-4)
  assert np.abs(noisy - low_res).mean() > 0.1
  _, train_log_snr = loss.noise_augment(
      low_res, key, sched, max_t=0.3)
  assert np.all(train_log_snr >= sched(jnp.array(0.3)) - 1e-4)
  assert len(np.unique(np.asarray(train_log_snr))) == SHAPE[0]
  with pytest.raises(ValueError, match="exactly one"):
    loss.noise_augment(low_res, key, sched)


def test_condition_dropout_frequencies():
  cfg = DiffusionConfig(text_drop_prob=0.1, exemplar_drop_prob=0.2,
                        both_drop_prob=0.15)
  keep_text, keep_ex = loss.condition_dropout(jax.random.PRNGKey(0), 20_000, cfg)
  keep_text, keep_ex = np.asarray(keep_text), np.asarray(keep_ex)
  assert keep_text.dtype == bool and keep_text.shape == (20_000,)
  freq = lambda m: m.mean()
  assert abs(freq(~keep_text & keep_ex) - 0.1) < 0.02
  assert abs(freq(keep_text & ~keep_ex) - 0.2) < 0.02
  assert abs(freq(~keep_text & ~keep_ex) - 0.15) < 0.02
  assert abs(freq(keep_text & keep_ex) - 0.55) < 0.02
  with pytest.raises(ValueError, match="summing to <= 1"):
    loss.condition_dropout(jax.random.PRNGKey(0), 8, dataclasses.replace(
        cfg, both_drop_prob=0.8))
