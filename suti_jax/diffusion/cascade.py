"""Chains a base stage and super-resolution stages (Imagen 64 -> 256 -> 1024).

Model-agnostic: each stage supplies a factory that binds the low-res input
into a guidance predict-fn; this module resizes, noise-augments and samples.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from suti_jax.config import SamplingConfig
from suti_jax.diffusion import guidance
from suti_jax.diffusion import loss
from suti_jax.diffusion import sampling
from suti_jax.diffusion.schedule import Schedule

# (low_res [B,h,w,C] or None, aug_log_snr [B] or None) -> the stage's predictor;
# the base stage receives (None, None).
PredictFnFactory = Callable[[jax.Array | None, jax.Array | None],
                            guidance.Predictor]


@dataclasses.dataclass(frozen=True)
class CascadeStage:
  """One stage of the cascade.

  Attributes:
    make_predict_fn: binds the (noise-augmented) low-res input and its
      aug_log_snr into a predictor; see `PredictFnFactory`.
    image_size: output resolution in px.
    sampling: the stage's sampler, steps, guidance, thresholding and, for SR
      stages, `noise_aug_level` (the fixed aug time).
    schedule: the stage's log-SNR schedule (also used for noise augmentation).
    prediction: the model's output type, 'eps', 'v' or 'x0'.
    low_res_size: size (px) at which the previous stage's output is handed to
      `make_predict_fn` (the UNet's `low_res_size`); 0 = base stage.
    has_exemplars: whether the model is conditioned on exemplars (SuTI).
    channels: image channels C.
    resize_method: `jax.image.resize` method; must match how training derives
      the low-res input.
  """

  make_predict_fn: PredictFnFactory
  image_size: int
  sampling: SamplingConfig
  schedule: Schedule
  prediction: str
  low_res_size: int = 0
  has_exemplars: bool = False
  channels: int = 3
  resize_method: str = "bicubic"

  @property
  def is_sr(self) -> bool:
    """Whether the stage is conditioned on a low-res image."""
    return self.low_res_size > 0


def prepare_low_res(images: jax.Array, stage: CascadeStage,
                    key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Resizes the previous stage's output and noise-augments it for `stage`.

  Args:
    images: previous stage output [B, H', W', C] in [-1, 1].
    stage: an SR stage.
    key: PRNG key for the augmentation noise.

  Returns:
    (aug_low_res [B, h, w, C] with h = w = stage.low_res_size, aug_log_snr [B]).
  """
  size = stage.low_res_size
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(
        images, (images.shape[0], size, size, images.shape[3]),
        stage.resize_method)
    # Bicubic overshoots; the model was trained on low-res images in [-1, 1].
    images = jnp.clip(images, -1.0, 1.0)
  return loss.noise_augment(images, key, stage.schedule,
                            t=stage.sampling.noise_aug_level)


def sample_cascade(stages: Sequence[CascadeStage], batch_size: int,
                   key: jax.Array) -> list[jax.Array]:
  """Samples every stage in turn, each SR stage conditioned on the previous.

  Args:
    stages: a base stage followed by any number of SR stages.
    batch_size: B.
    key: PRNG key.

  Returns:
    One [B, S, S, C] array in [-1, 1] per stage, S = that stage's image_size.
  """
  if not stages:
    raise ValueError("sample_cascade needs at least one stage")
  if stages[0].is_sr or any(not s.is_sr for s in stages[1:]):
    raise ValueError("the first stage must be a base stage and the rest SR")
  outputs = []
  for index, stage in enumerate(stages):
    aug_key, sample_key = jax.random.split(jax.random.fold_in(key, index))
    low_res = aug_log_snr = None
    if stage.is_sr:
      low_res, aug_log_snr = prepare_low_res(outputs[-1], stage, aug_key)
    shape = (batch_size, stage.image_size, stage.image_size, stage.channels)
    outputs.append(sampling.sample(
        stage.make_predict_fn(low_res, aug_log_snr), shape, sample_key,
        stage.schedule, stage.sampling, stage.prediction,
        has_exemplars=stage.has_exemplars))
  return outputs
