"""Sampling from trained stages: `StageModel` loading, the jittable cascade
sampler and the `Pipeline` API (text-to-image and SuTI personalisation)."""

from suti_jax.inference.pipeline import ExemplarError, Pipeline, personalize, validate_cascade
from suti_jax.inference.stage import StageModel, StageSpec, load_stage, random_stage

__all__ = ["ExemplarError", "Pipeline", "StageModel", "StageSpec", "load_stage", "personalize",
           "random_stage", "validate_cascade"]
