"""Tests for suti_jax.diffusion.schedule."""

import jax.numpy as jnp
import numpy as np
import pytest

from suti_jax.config import DiffusionConfig
from suti_jax.diffusion import schedule as schedule_lib

T = jnp.linspace(0.0, 1.0, 1001)


@pytest.mark.parametrize("name", schedule_lib.schedule_names())
def test_alpha_sigma_variance_preserving(name):
  alpha, sigma = schedule_lib.alpha_sigma(schedule_lib.Schedule(name)(T))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  assert np.all(alpha > 0) and np.all(sigma > 0)


def test_alpha_sigma_values():
  alpha, sigma = schedule_lib.alpha_sigma(jnp.array([0.0, jnp.log(3.0)]))
  np.testing.assert_allclose(alpha, [np.sqrt(0.5), np.sqrt(0.75)], rtol=1e-6)
  np.testing.assert_allclose(sigma, [np.sqrt(0.5), np.sqrt(0.25)], rtol=1e-6)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_strictly_decreasing_with_configured_endpoints(name):
  sched = schedule_lib.Schedule(name, log_snr_min=-15.0, log_snr_max=12.0)
  log_snr = np.asarray(sched(T))
  assert np.all(np.diff(log_snr) < 0)
  np.testing.assert_allclose(log_snr[[0, -1]], [12.0, -15.0], atol=1e-3)


def test_cosine_matches_unshifted_form_in_the_middle():
  # With a symmetric range the shift is symmetric, so t=0.5 is log_snr=0 and
  # the curve is close to -2 log tan(pi t / 2) away from the ends.
  sched = schedule_lib.Schedule("cosine", -20.0, 20.0)
  t = jnp.array([0.25, 0.5, 0.75])
  np.testing.assert_allclose(sched(t), -2 * np.log(np.tan(np.pi * t / 2)),
                             atol=1e-3)


def test_linear_beta_is_imagen_form_clipped():
  sched = schedule_lib.Schedule("linear_beta", -5.0, 20.0)
  log_snr = np.asarray(sched(T))
  assert np.all(np.diff(log_snr) <= 0)
  np.testing.assert_allclose(log_snr[0], -np.log(np.expm1(1e-4)), rtol=1e-5)
  assert log_snr[-1] == -5.0


def test_make_schedule_from_config_and_errors():
  sched = schedule_lib.make_schedule(
      DiffusionConfig(schedule="linear", log_snr_min=-3.0, log_snr_max=4.0))
  assert sched == schedule_lib.Schedule("linear", -3.0, 4.0)
  with pytest.raises(ValueError, match="known: .*cosine"):
    schedule_lib.make_schedule(DiffusionConfig(schedule="sigmoid"))
  with pytest.raises(ValueError, match="log_snr_min < log_snr_max"):
    schedule_lib.Schedule("cosine", 5.0, 5.0)
  with pytest.raises(ValueError, match="already registered"):
    schedule_lib.register_schedule("cosine")(lambda t, lo, hi: t)
