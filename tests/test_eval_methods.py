"""The suti_jax generation methods on DreamBench (SuTI, DreamBooth experts): the
subject's photos in, images out, scored by the protocol (random tiny weights:
bookkeeping, not quality)."""

import dataclasses

import os
import pathlib

import jax
import numpy as np
import pytest

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax import inference
from suti_jax.eval import dreambench, metrics, methods
from suti_jax.experts import dreambooth, renderer
from suti_jax.models.text import load_text_encoder
from suti_jax.train import experiment

DATA = pathlib.Path(os.environ.get(
    "SUTI_DREAMBENCH_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "dreambench"))
pytestmark = pytest.mark.skipif(not (DATA / "manifest.json").exists(),
                                reason=f"DreamBench not found at {DATA}")


@pytest.fixture(scope="module")
def method():
  stage = inference.random_stage(experiment.sections(tl.micro_config("suti")),
                                 jax.random.PRNGKey(0))
  return methods.SuTIMethod(inference.Pipeline([stage]), num_exemplars=2)


def test_suti_method_generates_per_seed(method):
  benchmark = dreambench.load_benchmark(DATA, subjects=["dog"])
  (subject,) = benchmark.subjects
  prompt = benchmark.prompts(subject)[0]
  first = method.generate(subject, prompt, 2, seed=3)
  assert first.shape == (2, 16, 16, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, method.generate(subject, prompt, 2, seed=3))
  assert not np.array_equal(first, method.generate(subject, prompt, 2, seed=4))


def test_suti_method_runs_the_protocol(method):
  benchmark = dreambench.load_benchmark(DATA, subjects=["dog"])
  result = dreambench.evaluate(benchmark, method, metrics.Embedders.random(0),
                               num_images=1, max_prompts=1)
  (scores,) = result.scores
  for value in (scores.dino, scores.clip_i, scores.clip_t):
    assert np.isfinite(value) and -1.0 <= value <= 1.0
  assert result.method == "SuTI (suti_jax)"


def test_suti_method_needs_an_exemplar():
  with pytest.raises(ValueError, match="num_exemplars"):
    methods.SuTIMethod(pipeline=None, num_exemplars=0)


def test_dreambooth_method_finetunes_once_per_subject_and_renders():
  config = tl.micro_config()
  sec = experiment.sections(config)
  stage = inference.random_stage(sec, jax.random.PRNGKey(0))
  base = renderer.BaseModel(
      stage.params, load_text_encoder(sec.text, jax.random.PRNGKey(0)), sec.model,
      sec.diffusion, dataclasses.replace(sec.sampling, num_steps=2, guidance_scale=1.0))
  cfg = dataclasses.replace(dreambooth.ExpertConfig.tiny(), num_steps=2, num_class_images=2,
                            class_sampling_steps=2, batch_size=2)
  method = methods.DreamBoothMethod(base, cfg)
  benchmark = dreambench.load_benchmark(DATA, subjects=["dog"])
  (subject,) = benchmark.subjects
  images = method.generate(subject, benchmark.prompts(subject)[0], 2, seed=0)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  expert = method._expert(subject)  # pylint: disable=protected-access
  method.generate(subject, benchmark.prompts(subject)[1], 1, seed=1)
  assert method._expert(subject) is expert  # pylint: disable=protected-access
