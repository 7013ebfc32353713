"""Tests for suti_jax.diffusion thresholding, guidance and sampling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti_jax.config import SamplingConfig
from suti_jax.diffusion import guidance
from suti_jax.diffusion import objectives
from suti_jax.diffusion import sampling
from suti_jax.diffusion import thresholding
from suti_jax.diffusion.schedule import Schedule

SCHEDULE = Schedule("cosine")
SHAPE = (2, 4, 4, 3)
X_STAR = jax.random.uniform(jax.random.PRNGKey(7), SHAPE, minval=-0.9,
                            maxval=0.9)


def _oracle(x_star, prediction="eps"):
  """Ideal model for data that is the single image x_star (any conditions)."""

  def predict_fn(x_t, log_snr, text, exemplars):
    del text, exemplars
    # A BatchedPredictFn sees N conditions stacked along the batch.
    target = jnp.tile(x_star, (x_t.shape[0] // x_star.shape[0], 1, 1, 1))
    eps = objectives.eps_from_x0(x_t, target, log_snr)
    return objectives.prediction_target(target, eps, log_snr, prediction)

  return predict_fn


def _gaussian_oracle(mu, s):
  """Ideal eps model for data ~ N(mu, s^2 I): E[eps | x_t] in closed form."""

  def predict_fn(x_t, log_snr, text, exemplars):
    del text, exemplars
    snr = jnp.exp(log_snr)[:, None, None, None]
    alpha, sigma = jnp.sqrt(snr / (1 + snr)), jnp.sqrt(1 / (1 + snr))
    return sigma * (x_t - alpha * mu) / (alpha**2 * s**2 + sigma**2)

  return predict_fn


# Thresholding.


def test_dynamic_threshold_bounds_and_identity():
  big = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  out = thresholding.dynamic_threshold(big, 0.995)
  assert np.all(np.abs(out) <= 1.0 + 1e-6)
  # Saturation rescales rather than clips: the ranking of pixels is kept and
  # the max magnitude equals 1 for examples with s > 1.
  np.testing.assert_allclose(np.abs(out).reshape(4, -1).max(1), 1.0, atol=1e-6)
  inside = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3), minval=-1,
                              maxval=1)
  np.testing.assert_array_equal(thresholding.dynamic_threshold(inside, 0.995),
                                inside)
  # Per example: an in-range example is untouched next to a saturated one.
  mixed = jnp.concatenate([inside[:1], big[:1]])
  np.testing.assert_array_equal(
      thresholding.apply_threshold(mixed, "dynamic", 0.995)[0], inside[0])


def test_static_and_none_and_unknown():
  x = jnp.array([[-3.0, 0.5, 2.0]])
  np.testing.assert_array_equal(thresholding.apply_threshold(x, "static", 0.9),
                                [[-1.0, 0.5, 1.0]])
  np.testing.assert_array_equal(thresholding.apply_threshold(x, "none", 0.9), x)
  with pytest.raises(ValueError, match="known"):
    thresholding.apply_threshold(x, "soft", 0.9)


# Guidance.


def _constant_predictor(calls):
  """Returns a distinct constant per condition and records each call."""
  values = {(True, True): 1.0, (True, False): 2.0, (False, True): 4.0,
            (False, False): 8.0}

  def predict_fn(x_t, log_snr, text, exemplars):
    del log_snr
    calls.append((text, exemplars))
    return jnp.full_like(x_t, values[(text, exemplars)])

  return predict_fn


def _masked_from(predict_fn):
  """A BatchedPredictFn with the same outputs as a per-condition predict_fn."""

  def fn(x_t, log_snr, keep_text, keep_exemplars):
    outs = [predict_fn(x_t, log_snr, t, e) for t, e in
            ((True, True), (True, False), (False, True), (False, False))]
    index = 2 * (~keep_text).astype(int) + (~keep_exemplars).astype(int)
    return jnp.stack(outs)[index, jnp.arange(x_t.shape[0])]

  return guidance.BatchedPredictFn(fn)


@pytest.mark.parametrize("mode", ["cfg", "compositional", "interleaved"])
@pytest.mark.parametrize("batched", [False, True])
def test_scale_one_is_the_conditional_prediction(mode, batched):
  x_t = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  log_snr = jnp.zeros((SHAPE[0],))
  x_j = lambda x, s, t, e: x * (1 + t) + 3 * e + s[:, None, None, None]
  predictor = _masked_from(x_j) if batched else x_j
  cfg = SamplingConfig(guidance=mode, guidance_scale=1.0,
                       text_guidance_scale=1.0, exemplar_guidance_scale=1.0)
  for step in (0, 1, jnp.int32(3)):
    out = guidance.guided_prediction(predictor, x_t, log_snr, step, cfg,
                                     has_exemplars=True)
    np.testing.assert_array_equal(out, x_j(x_t, log_snr, True, True))


@pytest.mark.parametrize("batched", [False, True])
def test_guidance_formulas(batched):
  x_t, log_snr = jnp.zeros(SHAPE), jnp.zeros((SHAPE[0],))
  calls = []
  predictor = _constant_predictor(calls)
  if batched:
    predictor = _masked_from(predictor)
  # c_te=1, c_t=2, c_e=4, u=8.
  cases = [
      (SamplingConfig(guidance="cfg", guidance_scale=3.0), True, 0,
       8 + 3 * (1 - 8)),
      (SamplingConfig(guidance="cfg", guidance_scale=3.0), False, 0,
       8 + 3 * (2 - 8)),
      (SamplingConfig(guidance="compositional", text_guidance_scale=2.0,
                      exemplar_guidance_scale=5.0), True, 0,
       8 + 2 * (2 - 8) + 5 * (1 - 2)),
      (SamplingConfig(guidance="interleaved", text_guidance_scale=2.0,
                      exemplar_guidance_scale=5.0), True, 0,
       4 + 2 * (1 - 4)),
      (SamplingConfig(guidance="interleaved", text_guidance_scale=2.0,
                      exemplar_guidance_scale=5.0), True, 1,
       2 + 5 * (1 - 2)),
  ]
  for cfg, has_exemplars, step, expected in cases:
    out = guidance.guided_prediction(predictor, x_t, log_snr, step, cfg,
                                     has_exemplars=has_exemplars)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_interleaved_alternates_the_queried_conditions():
  calls = []
  cfg = SamplingConfig(guidance="interleaved", text_guidance_scale=2.0,
                       exemplar_guidance_scale=3.0)
  x_t, log_snr = jnp.zeros(SHAPE), jnp.zeros((SHAPE[0],))
  for step in range(4):
    guidance.guided_prediction(_constant_predictor(calls), x_t, log_snr, step,
                               cfg, has_exemplars=True)
  text_step = [(True, True), (False, True)]
  exemplar_step = [(True, True), (True, False)]
  assert calls == text_step + exemplar_step + text_step + exemplar_step


def test_interleaved_alternates_with_a_traced_step():
  # Inside the sampler's fori_loop the step index is traced (lax.switch path).
  cfg = SamplingConfig(guidance="interleaved", text_guidance_scale=2.0,
                       exemplar_guidance_scale=5.0, num_steps=4)
  x_t, log_snr = jnp.zeros(SHAPE), jnp.zeros((SHAPE[0],))
  predictor = _constant_predictor([])
  at_step = jax.jit(lambda i: guidance.guided_prediction(
      predictor, x_t, log_snr, i, cfg, has_exemplars=True))
  got = [float(at_step(jnp.int32(i))[0, 0, 0, 0]) for i in range(4)]
  assert got == [-2.0, -3.0, -2.0, -3.0]


def test_guidance_errors():
  x_t, log_snr = jnp.zeros(SHAPE), jnp.zeros((SHAPE[0],))
  for mode in ("compositional", "interleaved"):
    with pytest.raises(ValueError, match="needs a model with exemplars"):
      guidance.guided_prediction(_constant_predictor([]), x_t, log_snr, 0,
                                 SamplingConfig(guidance=mode),
                                 has_exemplars=False)
  with pytest.raises(ValueError, match="known"):
    guidance.check_guidance("joint", True)


def test_scale_one_skips_the_unconditional_call():
  calls = []
  guidance.guided_prediction(
      _constant_predictor(calls), jnp.zeros(SHAPE), jnp.zeros((SHAPE[0],)), 0,
      SamplingConfig(guidance="cfg", guidance_scale=1.0), has_exemplars=False)
  assert calls == [(True, False)]


# Samplers.


def _sample(predict_fn, cfg, prediction="eps", shape=SHAPE, key=0, x_T=None):
  return sampling.sample(predict_fn, shape, jax.random.PRNGKey(key), SCHEDULE,
                         cfg, prediction, x_T=x_T)


def test_ddim_eta0_is_deterministic_given_x_T():
  x_T = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  cfg = SamplingConfig(num_steps=8, guidance_scale=2.0)
  predict_fn = _gaussian_oracle(0.1, 0.3)
  a = _sample(predict_fn, cfg, key=1, x_T=x_T)
  b = _sample(predict_fn, cfg, key=2, x_T=x_T)
  np.testing.assert_array_equal(a, b)
  c = _sample(predict_fn, dataclasses.replace(cfg, eta=1.0), key=1, x_T=x_T)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddim_recovers_single_image(prediction):
  cfg = SamplingConfig(sampler="ddim", num_steps=20, guidance_scale=3.0)
  out = jax.jit(functools.partial(
      _sample, _oracle(X_STAR, prediction), cfg, prediction))()
  np.testing.assert_allclose(out, X_STAR, atol=1e-3)


def test_batched_interleaved_sampling_recovers_single_image():
  cfg = SamplingConfig(num_steps=6, guidance="interleaved",
                       text_guidance_scale=3.0, exemplar_guidance_scale=2.0)
  out = jax.jit(lambda key: sampling.sample(
      _masked_from(_oracle(X_STAR, "v")), SHAPE, key, SCHEDULE, cfg, "v",
      has_exemplars=True))(jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, X_STAR, atol=1e-3)


def test_ddpm_ancestral_recovers_single_image():
  cfg = SamplingConfig(sampler="ddpm", num_steps=200, threshold="none")
  out = _sample(_oracle(X_STAR), cfg)
  np.testing.assert_allclose(out, X_STAR, atol=1e-3)


def _gaussian_moments(sampler, eta, num_steps, mu, s):
  """Exact mean and std of the sampler's output for N(mu, s^2) data.

  With the Gaussian oracle every step is affine in x_t plus independent
  noise, so the moments propagate in closed form (float64, from x_T ~ N(0, 1)).
  """
  t = np.linspace(1.0, 0.0, num_steps + 1)
  log_snr = np.asarray(SCHEDULE(jnp.asarray(t)), np.float64)
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-log_snr))), np.sqrt(
      1 / (1 + np.exp(log_snr)))
  mean, var = 0.0, 1.0
  for i in range(num_steps):
    a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
    gain = a_t * s**2 / (a_t**2 * s**2 + s_t**2)  # x0_hat = gain x_t + bias.
    bias = mu * (1 - gain * a_t)
    if i == num_steps - 1:
      return gain * mean + bias, np.sqrt(gain**2 * var)
    c = 1 - np.exp(log_snr[i] - log_snr[i + 1])
    if sampler == "ddpm":
      coef_x, coef_x0, noise_var = a_t * s_s**2 / (a_s * s_t**2), a_s * c, (
          s_s**2 * c)
    else:
      noise_var = eta**2 * s_s**2 * c
      direction = np.sqrt(s_s**2 - noise_var)
      coef_x, coef_x0 = direction / s_t, a_s - direction * a_t / s_t
    a, b = coef_x + coef_x0 * gain, coef_x0 * bias
    mean, var = a * mean + b, a**2 * var + noise_var


def test_gaussian_moments_oracle_converges_to_the_data():
  for sampler, eta in (("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)):
    mean, std = _gaussian_moments(sampler, eta, 5000, 0.1, 0.3)
    assert abs(mean - 0.1) < 1e-3 and abs(std - 0.3) < 2e-3


@pytest.mark.parametrize("sampler,eta,num_steps", [
    ("ddim", 0.0, 10), ("ddim", 0.0, 200), ("ddim", 0.5, 50), ("ddpm", 0.0, 50),
    ("ddpm", 0.0, 1000)])
def test_gaussian_data_statistics(sampler, eta, num_steps):
  mu, s = 0.1, 0.3
  cfg = SamplingConfig(sampler=sampler, eta=eta, num_steps=num_steps,
                       threshold="none", guidance_scale=1.0)
  out = np.asarray(_sample(_gaussian_oracle(mu, s), cfg, shape=(256, 8, 8, 1)))
  mean, std = _gaussian_moments(sampler, eta, num_steps, mu, s)
  # 16k samples: standard errors ~0.002 on the mean and ~0.0015 on the std.
  assert abs(out.mean() - mean) < 0.007
  assert abs(out.std() - std) < 0.005
  if num_steps >= 200:
    assert abs(out.mean() - mu) < 0.01 and abs(out.std() - s) < 0.01


def _gaussian_flow_error(sampler, num_steps, mu=0.1, s=0.2):
  """RMS distance of the sampler's output from the exact probability-flow ODE
  solution for N(mu, s^2) data (same x_T, same final denoising step).

  The flow keeps each pixel's standardised value z = (x_t - alpha mu) /
  sqrt(alpha^2 s^2 + sigma^2), so the exact x at the last step's time is known
  in closed form; outputs the final clip could touch are left out.
  """
  x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 1))
  cfg = SamplingConfig(sampler=sampler, num_steps=num_steps, threshold="none",
                       guidance_scale=1.0)
  out = np.asarray(_sample(_gaussian_oracle(mu, s), cfg, shape=x_T.shape, x_T=x_T),
                   np.float64)
  log_snr = np.asarray(SCHEDULE(jnp.linspace(1.0, 0.0, num_steps + 1)), np.float64)
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-log_snr))), np.sqrt(1 / (1 + np.exp(log_snr)))
  spread = np.sqrt(alpha**2 * s**2 + sigma**2)
  z = (np.asarray(x_T, np.float64) - alpha[0] * mu) / spread[0]
  last = num_steps - 1
  gain = alpha[last] * s**2 / spread[last]**2
  exact = gain * (alpha[last] * mu + spread[last] * z) + mu * (1 - gain * alpha[last])
  inside = np.abs(exact) < 0.99
  return float(np.sqrt(np.mean((out - exact)[inside] ** 2)))


def test_dpm_solver_2m_is_second_order_where_ddim_is_first():
  errors = {sampler: [_gaussian_flow_error(sampler, n) for n in (128, 512)]
            for sampler in ("ddim", "dpm_solver_2m")}
  ddim, dpm = errors["ddim"], errors["dpm_solver_2m"]
  # 4x the steps: a first-order error falls ~4x, a second-order one ~16x (here
  # 3.7x and 9.3x: the cosine grid's first steps span a wide log-SNR range).
  assert ddim[0] / ddim[1] < 4.5
  assert dpm[0] / dpm[1] > 7.0
  assert dpm[0] < ddim[0] / 3 and dpm[1] < ddim[1] / 5


def test_dpm_solver_2m_starts_and_ends_as_ddim():
  x_T = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  predict_fn = _gaussian_oracle(0.1, 0.3)

  def run(sampler, num_steps):
    return np.asarray(_sample(predict_fn, SamplingConfig(
        sampler=sampler, num_steps=num_steps, guidance_scale=2.0), x_T=x_T))

  # Two steps: a first-order step, then the final x0. The third step is the
  # first that extrapolates.
  np.testing.assert_array_equal(run("dpm_solver_2m", 2), run("ddim", 2))
  assert np.abs(run("dpm_solver_2m", 3) - run("ddim", 3)).max() > 1e-3
  out = _sample(_oracle(X_STAR, "v"), SamplingConfig(sampler="dpm_solver_2m", num_steps=10,
                                                     guidance_scale=3.0), "v")
  np.testing.assert_allclose(out, X_STAR, atol=1e-3)


def test_ddim_eta_one_equals_ddpm():
  x_T = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  cfg = SamplingConfig(num_steps=10, threshold="none", guidance_scale=1.0)
  predict_fn = _gaussian_oracle(0.1, 0.3)
  ddim = _sample(predict_fn, dataclasses.replace(cfg, eta=1.0), x_T=x_T)
  ddpm = _sample(predict_fn, dataclasses.replace(cfg, sampler="ddpm"), x_T=x_T)
  np.testing.assert_allclose(ddim, ddpm, atol=1e-5)


def test_sampler_config_errors():
  for cfg in (SamplingConfig(sampler="euler"), SamplingConfig(num_steps=0),
              SamplingConfig(threshold="soft"), SamplingConfig(eta=-1.0),
              SamplingConfig(sampler="dpm_solver_2m", eta=0.5)):
    with pytest.raises(ValueError):
      _sample(_oracle(X_STAR), cfg)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.9, 0.995, 1.0])
@pytest.mark.parametrize("n", [1, 7, 768])
def test_upper_quantile_is_jnp_quantile(q, n):
  values = jnp.abs(jax.random.normal(jax.random.PRNGKey(n), (3, n))) * 2
  np.testing.assert_allclose(thresholding.upper_quantile(values, q),
                             jnp.quantile(values, q, axis=1), rtol=1e-6, atol=0)


def test_upper_quantile_with_ties_zeros_and_the_largest_float():
  # Repeated values around the quantile's position, all zeros, the largest float.
  values = jnp.array([[0.0] * 5 + [1.5] * 190 + [2.0, 3.0, 3.0, 7.0, 9.0],
                      [0.0] * 200,
                      [4.0] * 199 + [float(np.finfo(np.float32).max)]])
  for q in (0.0, 0.5, 0.99, 0.995, 1.0):
    np.testing.assert_array_equal(thresholding.upper_quantile(values, q),
                                  jnp.quantile(values, q, axis=1))
