"""DreamBench generation methods backed by suti_jax models: a SuTI cascade
personalised from the subject's photos (no fine-tuning), and per-subject
DreamBooth experts fine-tuned from a text-to-image stage."""

from __future__ import annotations

import jax
import numpy as np

from suti_jax.data import images as images_lib
from suti_jax.eval import dreambench
from suti_jax.experts import dreambooth
from suti_jax.experts import renderer
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


class DreamBoothMethod(dreambench.GenerationMethod):
  """A DreamBooth expert per subject, fine-tuned from a text-to-image base stage on
  all of the subject's photos ('a sks <class>'), then prompted with the identifier."""

  name = "DreamBooth (suti_jax expert)"

  def __init__(self, base: renderer.BaseModel, expert_cfg: dreambooth.ExpertConfig,
               seed: int = 0):
    """Args: base: the stage experts start from; expert_cfg: the fine-tuning recipe;
    seed: fine-tuning seed (the same for every subject)."""
    self.base = base
    self.expert_cfg = expert_cfg
    self.seed = seed
    self._experts: dict[str, object] = {}

  def _expert(self, subject: dreambench.Subject):
    """Fine-tunes the subject's expert once and caches it."""
    if subject.name not in self._experts:
      size = self.base.unet_cfg.image_size
      photos = np.stack([dreambooth.to_uint8(images_lib.preprocess_array(p, size))
                         for p in dreambench.load_images(subject)])
      (self._experts[subject.name],) = dreambooth.finetune_experts(
          self.base.params, self.base.text_encoder, self.base.unet_cfg,
          self.base.diffusion_cfg, [(photos, subject.class_noun)], self.expert_cfg,
          jax.random.PRNGKey(self.seed))
    return self._experts[subject.name]

  def generate(self, subject: dreambench.Subject, prompt: str, num_images: int,
               seed: int) -> np.ndarray:
    identified = dreambooth.identifier_prompt(prompt, subject.class_noun, subject.class_noun)
    return dreambooth.render(
        self._expert(subject), [identified] * num_images, jax.random.PRNGKey(seed),
        self.expert_cfg.render_sampling(self.base.sampling_cfg),
        text_encoder=self.base.text_encoder,
        unet_cfg=self.base.unet_cfg, diffusion_cfg=self.base.diffusion_cfg,
        **self.expert_cfg.render_options(self.base.params))
