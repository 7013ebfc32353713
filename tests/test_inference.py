"""Inference API: the 2-stage text-to-image cascade, SuTI personalisation (cached
exemplar features, padding, once-per-call encoding, K checks) and the sample CLI."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax import inference
from suti_jax.inference import pipeline as pipeline_lib
from suti_jax.inference import sampler
from suti_jax.models import unet as unet_lib
from suti_jax.models.exemplar import ExemplarInputs
from suti_jax.train import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K_MAX = 5


def _stage(config, seed):
  return inference.random_stage(experiment.sections(config), jax.random.PRNGKey(seed))


def _subject(k, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (k, 20, 24, 3), dtype=np.uint8)  # Not square: gets cropped.
  return images, [f"a red toy, view {i}" for i in range(k)]


@pytest.fixture(scope="module")
def encode_calls():
  """Counts executions (not traces) of UNet.encode_exemplars via a debug callback."""
  calls = []
  original = unet_lib.UNet.encode_exemplars

  def counted(self, *args, **kwargs):
    jax.debug.callback(lambda: calls.append(1))
    return original(self, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(unet_lib.UNet, "encode_exemplars", counted)
    yield calls


@pytest.fixture(scope="module")
def suti(encode_calls):
  del encode_calls  # Patched before the pipeline traces anything.
  config = tl.micro_config("suti")
  config.model.exemplar.max_exemplars = K_MAX
  stage = _stage(config, 0)
  # Exemplar attention starts at exactly zero; perturb every param so that the
  # exemplars change the output and the checks below can fail.
  @jax.jit
  def perturb(params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(treedef, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  return inference.Pipeline([dataclasses.replace(stage, params=perturb(stage.params))])


@pytest.fixture(scope="module")
def cascade_stages():
  return _stage(tl.micro_config(), 0), _stage(tl.sr_micro_config(), 1)


def test_text_to_image_two_stage_cascade(cascade_stages):
  base, sr = cascade_stages
  pipeline = inference.Pipeline([base, sr])
  key = jax.random.PRNGKey(0)
  out = pipeline.text_to_image(["a cat", "a dog"], 2, key, num_steps=2)
  assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
  compiled = pipeline_lib._generate._cache_size()  # pylint: disable=protected-access
  # Another Pipeline over the same stages shares the compiled program.
  again = inference.Pipeline([base, sr]).text_to_image(["a cat", "a dog"], 2, key, num_steps=2)
  np.testing.assert_array_equal(out, again)
  # The scale is a traced input: a new value changes the images, not the compile.
  guided = pipeline.text_to_image(["a cat", "a dog"], 2, key, num_steps=2,
                                  guidance_scale=[1.0, 6.0])
  assert guided.shape == out.shape and np.abs(guided.astype(int) - out).max() > 0
  assert pipeline_lib._generate._cache_size() == compiled  # pylint: disable=protected-access


def test_cascade_validation(cascade_stages):
  base, sr = cascade_stages
  with pytest.raises(ValueError, match="must be a base stage"):
    inference.Pipeline([sr])
  with pytest.raises(ValueError, match="upsamples from 16 px"):
    inference.Pipeline([base, sr, sr])
  other_text = dataclasses.replace(sr, spec=dataclasses.replace(
      sr.spec, text=dataclasses.replace(sr.spec.text, num_layers=2)))
  with pytest.raises(ValueError, match="text encoder config"):
    inference.Pipeline([base, other_text])
  with pytest.raises(inference.ExemplarError, match="no exemplar attention"):
    inference.Pipeline([base]).personalize(*_subject(1), "x", 1, jax.random.PRNGKey(0))


def test_cached_features_equal_uncached_model_call(suti):
  stage = suti.stages[0]
  spec, model = stage.spec, unet_lib.UNet(stage.spec.model)
  rng = np.random.default_rng(1)
  text_ids, text_mask = suti.tokenize(["a toy on a beach", "a toy in snow"])
  text_emb = sampler.encode_text(spec, stage.text_params, text_ids, text_mask)
  x_t = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  log_snr = jnp.array([-1.0, 2.0])

  @jax.jit
  def both(exemplars):
    features = sampler.encode_exemplars(spec, stage.params, stage.text_params, exemplars)
    cached = sampler.batched_predictor(spec, stage.params, text_emb, text_mask, features,
                                       None, None).fn(x_t, log_snr, jnp.ones(2, bool),
                                                      jnp.ones(2, bool))
    ex_mask = exemplars.text_mask & exemplars.mask[:, None]
    emb = sampler.encode_text(spec, stage.text_params, exemplars.text_ids, ex_mask)
    tile = lambda a: jnp.broadcast_to(a[None], (2,) + a.shape)  # noqa: E731
    inputs = ExemplarInputs(images=tile(exemplars.images), text_emb=tile(emb),
                            text_mask=tile(ex_mask), mask=tile(exemplars.mask))
    uncached = model.apply({"params": stage.params}, x_t, log_snr, text_emb, text_mask,
                           exemplars=inputs)
    no_exemplars = model.apply({"params": stage.params}, x_t, log_snr, text_emb, text_mask)
    return cached, uncached, no_exemplars

  for k in range(1, K_MAX + 1):
    cached, uncached, plain = both(suti.prepare_exemplars(*_subject(k, seed=k)))
    np.testing.assert_allclose(cached, uncached, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(cached) - np.asarray(plain)).max() > 1e-3  # Exemplars matter.


def test_personalize_k_1_to_5_padding_and_single_encode(suti, encode_calls):
  key = jax.random.PRNGKey(3)
  for k in range(1, K_MAX + 1):
    out = inference.personalize(suti, *_subject(k), "a toy on a beach", 2, key, num_steps=3)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  # Encoding runs once per stage per call, not per step or sample.
  encode_calls.clear()
  images, captions = _subject(2)
  out = suti.personalize(images, captions, "a toy on a beach", 2, key, num_steps=3)
  jax.effects_barrier()
  assert len(encode_calls) == 1
  # Padded slots hold garbage here; they must not change the samples.
  exemplars = suti.prepare_exemplars(images, captions)
  rng = np.random.default_rng(9)
  garbage = dataclasses.replace(
      exemplars, images=np.where(exemplars.mask[:, None, None, None], exemplars.images,
                                 rng.uniform(-1, 1, exemplars.images.shape).astype(np.float32)),
      text_ids=np.where(exemplars.mask[:, None], exemplars.text_ids, 77),
      text_mask=exemplars.text_mask | ~exemplars.mask[:, None])
  ids, mask = suti.tokenize(["a toy on a beach"] * 2)
  stage = suti.stages[0]
  padded = pipeline_lib._generate(  # pylint: disable=protected-access
      suti.specs(3), (stage.params,), (stage.text_params,), ids, mask, key,
      suti._scales(), garbage, None)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(padded), out)


def test_too_many_exemplars(suti):
  with pytest.raises(inference.ExemplarError, match="1 to K_max=5"):
    suti.personalize(*_subject(K_MAX + 1), "x", 1, jax.random.PRNGKey(0))
  with pytest.raises(inference.ExemplarError, match="captions"):
    suti.personalize(_subject(2)[0], ["only one"], "x", 1, jax.random.PRNGKey(0))


# The tiny base config shrunk to compile fast (a --config file for the CLI).
MICRO_CONFIG = """
from configs import imagen_base64
def get_config(arg=None):
  c = imagen_base64.get_config("tiny")
  c.model.base_channels = 8
  c.text.num_layers = 1
  c.text.max_length = 8
  return c
"""


@pytest.mark.slow
def test_sample_cli_writes_grid(tmp_path):
  output = tmp_path / "grid.png"
  (tmp_path / "micro.py").write_text(MICRO_CONFIG)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="", PYTHONPATH=ROOT)
  subprocess.run(
      [sys.executable, "-m", "launch.sample", f"--config={tmp_path / 'micro.py'}:tiny",
       "--random_init", "--prompts=a red toy;a blue toy", "--num_samples=3", "--steps=2",
       f"--output={output}", f"--output_dir={tmp_path / 'each'}"],
      cwd=ROOT, env=env, check=True, timeout=600)
  grid = np.asarray(PIL.Image.open(output))
  assert grid.shape == (2 * 16, 3 * 16, 3)  # One row per prompt; tiny base is 16 px.
  assert len(os.listdir(tmp_path / "each")) == 6
  first = np.asarray(PIL.Image.open(tmp_path / "each" / "1_0.png"))
  np.testing.assert_array_equal(first, grid[16:32, :16])


def test_sample_cli_refuses_implicit_random_weights(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.sample", "--config=configs/imagen_base64.py:tiny",
       "--prompts=a", f"--output={tmp_path / 'g.png'}"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True,
      text=True, timeout=300)
  assert result.returncode != 0 and "--random_init" in result.stderr
