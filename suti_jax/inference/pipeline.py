"""`Pipeline`: a validated cascade of StageModels with `text_to_image` and
SuTI `personalize` (exemplars in, images out), jitted once per shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from suti_jax.data import images as images_lib
from suti_jax.inference import sampler
from suti_jax.inference.stage import StageModel, StageSpec
from suti_jax.models.text import tokenizers

GUIDANCE_MODES = ("interleaved", "cfg", "compositional")


class ExemplarError(ValueError):
  """Exemplars that the cascade cannot take (too many, or no exemplar attention)."""


def validate_cascade(stages: Sequence[StageModel]) -> None:
  """Raises ValueError unless `stages` is a base stage then chained SR stages
  that all share one text encoder config."""
  if not stages:
    raise ValueError("a Pipeline needs at least one stage")
  if stages[0].low_res_size:
    raise ValueError(f"the first stage ({stages[0].stage}) must be a base stage, but it is "
                     f"super-resolution from {stages[0].low_res_size} px")
  for prev, stage in zip(stages, stages[1:]):
    if stage.low_res_size != prev.image_size:
      raise ValueError(f"stage {stage.stage} upsamples from {stage.low_res_size} px but the "
                       f"previous stage {prev.stage} makes {prev.image_size} px images")
  for stage in stages[1:]:
    if stage.spec.text != stages[0].spec.text:
      raise ValueError(f"stage {stage.stage} has text encoder config {stage.spec.text}, "
                       f"unlike {stages[0].stage}'s {stages[0].spec.text}")


def _per_stage(value: Any, num_stages: int, name: str) -> tuple[Any, ...]:
  """A scalar (or None) for every stage, or a per-stage sequence."""
  if isinstance(value, (list, tuple)):
    if len(value) != num_stages:
      raise ValueError(f"{name}: {len(value)} values for {num_stages} stages")
    return tuple(value)
  return (value,) * num_stages


def _override(value: Any, default: Any) -> Any:
  return default if value is None else value


# One jit cache for every Pipeline: a program is compiled once per stage specs,
# batch shape and number of steps (params and guidance scales are traced inputs),
# so pipelines over other checkpoints of the same configs reuse it.
_generate = jax.jit(sampler.generate, static_argnames=("specs", "guidance"))


class Pipeline:
  """Base stage then SR stages; samples through the whole cascade."""

  def __init__(self, stages: Sequence[StageModel]):
    """Validates and binds the stages.

    Args:
      stages: base stage, then SR stages whose `low_res_size` is the previous
        stage's `image_size`; all with the same TextEncoderConfig.
    """
    validate_cascade(stages)
    self.stages = tuple(stages)
    self.tokenizer = tokenizers.build_tokenizer(stages[0].spec.text)

  @property
  def image_size(self) -> int:
    return self.stages[-1].image_size

  @property
  def max_exemplars(self) -> int | None:
    """K_max of the cascade (smallest over stages); None if a stage has no
    exemplar attention."""
    ks = [s.max_exemplars for s in self.stages]
    return None if None in ks else min(ks)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, L], mask bool [N, L]) with the cascade's tokenizer."""
    return self.tokenizer.encode(list(texts), self.stages[0].spec.text.max_length)

  def specs(self, num_steps: Any = None) -> tuple[StageSpec, ...]:
    """Each stage's spec with `num_steps` (all or per stage) applied."""
    steps = _per_stage(num_steps, len(self.stages), "num_steps")
    return tuple(dataclasses.replace(s.spec, sampling=dataclasses.replace(
        s.spec.sampling, num_steps=_override(n, s.spec.sampling.num_steps)))
                 for s, n in zip(self.stages, steps))

  def _scales(self, guidance_scale: Any = None, text_guidance_scale: Any = None,
              exemplar_guidance_scale: Any = None) -> tuple[sampler.Scales, ...]:
    n = len(self.stages)
    out = []
    for stage, g, t, e in zip(self.stages, _per_stage(guidance_scale, n, "guidance_scale"),
                              _per_stage(text_guidance_scale, n, "text_guidance_scale"),
                              _per_stage(exemplar_guidance_scale, n, "exemplar_guidance_scale")):
      default = sampler.default_scales(stage.spec)
      out.append(sampler.Scales(*(np.float32(_override(v, d)) for v, d in zip(
          (g, t, e), (default.guidance, default.text, default.exemplar)))))
    return tuple(out)

  def _run(self, prompts: Sequence[str], num_samples: int, key: jax.Array, num_steps: Any,
           scales: tuple[sampler.Scales, ...], exemplars: sampler.Exemplars | None = None,
           guidance: str | None = None) -> np.ndarray:
    if num_samples < 1 or not prompts:
      raise ValueError(f"need prompts and num_samples >= 1, got {len(prompts)} prompts and "
                       f"num_samples={num_samples}")
    ids, mask = self.tokenize([p for p in prompts for _ in range(num_samples)])
    out = _generate(self.specs(num_steps), tuple(s.params for s in self.stages),
                    tuple(s.text_params for s in self.stages), ids, mask, key, scales,
                    exemplars, guidance)
    return np.asarray(jax.device_get(out))

  def text_to_image(self, prompts: Sequence[str], num_samples: int, key: jax.Array, *,
                    num_steps: int | Sequence[int] | None = None,
                    guidance_scale: float | Sequence[float] | None = None) -> np.ndarray:
    """Samples `num_samples` images per prompt through the cascade.

    SuTI stages run without exemplars (their exemplar attention adds 0) and
    use classifier-free guidance on the text.

    Args:
      prompts: P strings.
      num_samples: images per prompt.
      key: PRNG key.
      num_steps: sampling steps, for all stages or per stage; default config.
      guidance_scale: CFG scale, for all stages or per stage; default config.

    Returns:
      uint8 [P * num_samples, S, S, 3], prompt-major.
    """
    return self._run(prompts, num_samples, key, num_steps, self._scales(guidance_scale))

  def prepare_exemplars(self, exemplar_images: Sequence[np.ndarray] | np.ndarray,
                        exemplar_captions: Sequence[str]) -> sampler.Exemplars:
    """Crops, resizes, tokenizes and pads 1..K_max exemplars to K_max slots.

    Args:
      exemplar_images: K uint8 [H, W, 3] images (any size; centre-cropped).
      exemplar_captions: K captions.

    Returns:
      Exemplars with images at the last stage's resolution.
    """
    k_max = self.max_exemplars
    if k_max is None:
      missing = [s.stage for s in self.stages if s.max_exemplars is None]
      raise ExemplarError(f"stages {missing} have no exemplar attention (UNetConfig.exemplar "
                          "is None); personalize needs SuTI stages throughout the cascade")
    k = len(exemplar_images)
    if k != len(exemplar_captions):
      raise ExemplarError(f"{k} exemplar images but {len(exemplar_captions)} captions")
    if not 1 <= k <= k_max:
      raise ExemplarError(f"got {k} exemplars; this cascade takes 1 to K_max={k_max}")
    size = self.image_size
    images = np.zeros((k_max, size, size, 3), np.float32)
    images[:k] = [images_lib.preprocess_array(np.asarray(im), size) for im in exemplar_images]
    ids, mask = self.tokenize(list(exemplar_captions) + [""] * (k_max - k))
    mask[k:] = False
    return sampler.Exemplars(images=images, text_ids=ids, text_mask=mask,
                             mask=np.arange(k_max) < k)

  def personalize(self, exemplar_images: Sequence[np.ndarray] | np.ndarray,
                  exemplar_captions: Sequence[str], prompt: str | Sequence[str],
                  num_samples: int, key: jax.Array, *, guidance: str | None = None,
                  guidance_scale: float | Sequence[float] | None = None,
                  text_guidance_scale: float | Sequence[float] | None = None,
                  exemplar_guidance_scale: float | Sequence[float] | None = None,
                  num_steps: int | Sequence[int] | None = None) -> np.ndarray:
    """Renders the exemplars' subject as `prompt` describes (no fine-tuning).

    Exemplar features are encoded once per stage and reused at every step and
    for every sample; several prompts of one subject render in one batched call.

    Args:
      exemplar_images: K uint8 [H, W, 3] images of one subject, 1 <= K <= K_max.
      exemplar_captions: K captions.
      prompt: the new text, or P texts.
      num_samples: images to draw per prompt.
      key: PRNG key.
      guidance: 'interleaved', 'cfg' or 'compositional'; default per stage config.
      guidance_scale: 'cfg' scale; all stages or per stage.
      text_guidance_scale: text scale of 'interleaved' / 'compositional'.
      exemplar_guidance_scale: exemplar scale of those modes.
      num_steps: sampling steps; all stages or per stage.

    Returns:
      uint8 [P * num_samples, S, S, 3], prompt-major (P = 1 for one prompt).
    """
    if guidance is not None and guidance not in GUIDANCE_MODES:
      raise ValueError(f"unknown guidance {guidance!r}; known: {list(GUIDANCE_MODES)}")
    exemplars = self.prepare_exemplars(exemplar_images, exemplar_captions)
    scales = self._scales(guidance_scale, text_guidance_scale, exemplar_guidance_scale)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return self._run(prompts, num_samples, key, num_steps, scales, exemplars, guidance)


def personalize(pipeline: Pipeline, exemplar_images: Sequence[np.ndarray] | np.ndarray,
                exemplar_captions: Sequence[str], prompt: str | Sequence[str], num_samples: int,
                key: jax.Array, **options: Any) -> np.ndarray:
  """`pipeline.personalize(...)`; see `Pipeline.personalize` for the options."""
  return pipeline.personalize(exemplar_images, exemplar_captions, prompt, num_samples, key,
                              **options)
