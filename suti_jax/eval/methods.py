"""DreamBench generation methods backed by suti_jax models: a SuTI cascade
personalised from the subject's photos (no fine-tuning)."""

from __future__ import annotations

import jax
import numpy as np

from suti_jax.eval import dreambench
from suti_jax.inference import Pipeline


class SuTIMethod(dreambench.GenerationMethod):
  """A SuTI cascade given `num_exemplars` of the subject's photos as demonstrations.

  The photos' captions are the class prompt ("a photo of a dog"), as the
  pipeline's DreamBench reader writes them for v1 ICL groups.
  """

  name = "SuTI (suti_jax)"

  def __init__(self, pipeline: Pipeline, num_exemplars: int = 3):
    """Args: pipeline: base (+ SR) SuTI stages; num_exemplars: photos shown (SuTI: 3)."""
    if num_exemplars < 1:
      raise ValueError(f"num_exemplars must be >= 1, got {num_exemplars}")
    self.pipeline = pipeline
    self.num_exemplars = num_exemplars

  def generate(self, subject: dreambench.Subject, prompt: str, num_images: int,
               seed: int) -> np.ndarray:
    photos = dreambench.load_images(subject)[:self.num_exemplars]
    captions = [f"a photo of a {subject.class_noun}"] * len(photos)
    return self.pipeline.personalize(photos, captions, prompt, num_images,
                                     jax.random.PRNGKey(seed))
