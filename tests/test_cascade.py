"""Tests for suti_jax.diffusion.cascade with analytic (oracle) stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti_jax.config import SamplingConfig
from suti_jax.diffusion import cascade
from suti_jax.diffusion import objectives
from suti_jax.diffusion.schedule import Schedule

BATCH = 2
X_STAR = jax.random.uniform(jax.random.PRNGKey(3), (BATCH, 8, 8, 3),
                            minval=-0.7, maxval=0.7)


def _oracle(target, prediction):
  """Ideal predictor for data that is exactly `target`."""

  def predict_fn(x_t, log_snr, text, exemplars):
    del text, exemplars
    eps = objectives.eps_from_x0(x_t, target, log_snr)
    return objectives.prediction_target(target, eps, log_snr, prediction)

  return predict_fn


def _stages(received, aug_level):
  """A base stage that generates X_STAR and an SR stage that upsamples its
  low-res input 2x (its oracle target is resize(low_res))."""

  def base_factory(low_res, aug_log_snr):
    received.append(("base", low_res, aug_log_snr))
    return _oracle(X_STAR, "eps")

  def sr_factory(low_res, aug_log_snr):
    received.append(("sr", low_res, aug_log_snr))
    return _oracle(jax.image.resize(low_res, (BATCH, 16, 16, 3), "bicubic"),
                   "v")

  base = cascade.CascadeStage(
      base_factory, image_size=8,
      sampling=SamplingConfig(num_steps=10, guidance_scale=2.0),
      schedule=Schedule("cosine"), prediction="eps")
  sr = cascade.CascadeStage(
      sr_factory, image_size=16,
      sampling=SamplingConfig(num_steps=5, guidance_scale=4.0,
                              noise_aug_level=aug_level),
      schedule=Schedule("linear", -10.0, 10.0), prediction="v",
      low_res_size=8)
  return base, sr


def test_two_stage_cascade_shapes_values_and_low_res():
  received = []
  base, sr = _stages(received, aug_level=0.0)
  out_8, out_16 = cascade.sample_cascade([base, sr], BATCH,
                                         jax.random.PRNGKey(0))
  assert out_8.shape == (BATCH, 8, 8, 3) and out_16.shape == (BATCH, 16, 16, 3)
  np.testing.assert_allclose(out_8, X_STAR, atol=1e-3)
  assert [r[0] for r in received] == ["base", "sr"]
  assert received[0][1] is None and received[0][2] is None
  _, low_res, aug_log_snr = received[1]
  # Aug time 0 is log_snr_max = 10 of the SR stage's own schedule: the base
  # output plus noise of std sigma = sqrt(sigmoid(-10)) ~ 0.0067.
  np.testing.assert_allclose(aug_log_snr, [10.0, 10.0], atol=1e-5)
  residual = np.asarray(low_res) - np.sqrt(1 / (1 + np.exp(-10.0))) * X_STAR
  assert 0.005 < residual.std() < 0.009
  # The SR oracle regenerates its (clipped) target from what it received ...
  expected = jax.image.resize(low_res, (BATCH, 16, 16, 3), "bicubic")
  np.testing.assert_allclose(out_16, jnp.clip(expected, -1, 1), atol=1e-3)
  # ... which is the upsampled base output up to the augmentation noise.
  upsampled = jax.image.resize(X_STAR, (BATCH, 16, 16, 3), "bicubic")
  np.testing.assert_allclose(out_16, upsampled, atol=0.05)


def test_sr_stage_resizes_and_noise_augments_its_input():
  received = []
  base, sr = _stages(received, aug_level=0.5)
  sr_at_4 = cascade.CascadeStage(
      sr.make_predict_fn, 16, sr.sampling, sr.schedule, sr.prediction,
      low_res_size=4)
  cascade.sample_cascade([base, sr_at_4], BATCH, jax.random.PRNGKey(0))
  _, low_res, aug_log_snr = received[1]
  assert low_res.shape == (BATCH, 4, 4, 3)
  # linear schedule over [-10, 10] at t = 0.5 is log_snr 0: alpha = sqrt(1/2).
  np.testing.assert_allclose(aug_log_snr, [0.0, 0.0], atol=1e-5)
  clean = jax.image.resize(X_STAR, (BATCH, 4, 4, 3), "bicubic")
  residual = np.asarray(low_res - np.sqrt(0.5) * np.clip(clean, -1, 1))
  assert abs(residual.std() - np.sqrt(0.5)) < 0.15


def test_cascade_stage_order_is_checked():
  received = []
  base, sr = _stages(received, aug_level=0.0)
  for stages in ([], [sr], [base, base]):
    with pytest.raises(ValueError):
      cascade.sample_cascade(stages, BATCH, jax.random.PRNGKey(0))
  assert base.is_sr is False and sr.is_sr is True
