"""The pure, jittable cascade sampler shared by `Pipeline` and the exported
SavedModel: text encoding, exemplar features cached once per stage, one
batched UNet call per step for all guidance conditions, uint8 output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from suti_jax.diffusion import cascade
from suti_jax.diffusion import guidance as guidance_lib
from suti_jax.diffusion.schedule import make_schedule
from suti_jax.inference.stage import StageSpec
from suti_jax.models import unet as unet_lib
from suti_jax.models.exemplar import ExemplarFeatures
from suti_jax.models.text import t5
from suti_jax.train import step as step_lib

Array = jax.Array


@flax.struct.dataclass
class Scales:
  """Guidance scales of one stage as float32 scalars (traced: no recompiles)."""

  guidance: Array
  text: Array
  exemplar: Array


@flax.struct.dataclass
class Exemplars:
  """One subject's demonstrations, padded to K slots.

  Attributes:
    images: [K, S, S, 3] float32 in [-1, 1], S = the last stage's image size.
    text_ids: [K, L] int32 caption tokens.
    text_mask: [K, L] bool.
    mask: [K] bool; False = padded slot.
  """

  images: Array
  text_ids: Array
  text_mask: Array
  mask: Array


def default_scales(spec: StageSpec) -> Scales:
  s = spec.sampling
  return Scales(*(jnp.float32(v) for v in (s.guidance_scale, s.text_guidance_scale,
                                           s.exemplar_guidance_scale)))


def encode_text(spec: StageSpec, text_params: Any, ids: Array, mask: Array) -> Array:
  """Frozen T5 embeddings [N, L, D], zero at padding (as in training)."""
  return step_lib.encode_text(t5.T5Encoder(spec.text), text_params, ids, mask)


def encode_exemplars(spec: StageSpec, params: Any, text_params: Any,
                     exemplars: Exemplars) -> ExemplarFeatures:
  """Exemplar features of one subject for one stage (the per-stage cache).

  Images are resized to the stage's resolution (antialiased bilinear, like the
  data pipeline) and only the stage's K_max slots are used.

  Returns:
    ExemplarFeatures with a batch of 1.
  """
  k = spec.model.exemplar.max_exemplars
  images = exemplars.images[:k]
  size = spec.model.image_size
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]),
                              "linear", antialias=True)
  mask = exemplars.mask[:k]
  text_mask = exemplars.text_mask[:k] & mask[:, None]  # A padded slot has no caption.
  emb = encode_text(spec, text_params, exemplars.text_ids[:k], text_mask)
  return unet_lib.UNet(spec.model).apply(
      {"params": params}, images[None], emb[None], text_mask[None], mask[None],
      method=unet_lib.UNet.encode_exemplars)


def batched_predictor(spec: StageSpec, params: Any, text_emb: Array, text_mask: Array,
                      features: ExemplarFeatures | None, low_res: Array | None,
                      aug_log_snr: Array | None) -> guidance_lib.BatchedPredictFn:
  """All guidance conditions of a step as one UNet call.

  Args:
    spec: the stage.
    params: UNet params.
    text_emb: [B, L, D]; text_mask: [B, L].
    features: cached exemplar features of one subject (batch 1), or None.
    low_res: SR stages, [B, h, w, C] noise-augmented low-res images.
    aug_log_snr: SR stages, [B].

  Returns:
    A BatchedPredictFn over rows [N*B] (condition-major).
  """
  model = unet_lib.UNet(spec.model)

  def fn(x_t: Array, log_snr: Array, keep_text: Array, keep_exemplars: Array) -> Array:
    rows = x_t.shape[0]
    tile = lambda a: jnp.tile(a, (rows // a.shape[0],) + (1,) * (a.ndim - 1))  # noqa: E731
    mask = tile(text_mask) & keep_text[:, None]
    # The null text condition is an all-False mask with zero embeddings, as
    # condition dropout makes it in training.
    kwargs = dict(text_emb=jnp.where(mask[..., None], tile(text_emb), 0.0), text_mask=mask)
    if low_res is not None:
      kwargs.update(low_res=tile(low_res), aug_log_snr=tile(aug_log_snr))
    if features is not None:
      # The subject's tokens stay batch 1: exemplar attention projects them once
      # per step rather than once per row.
      spread = lambda a: jnp.broadcast_to(a, (rows,) + a.shape[1:])  # noqa: E731
      kwargs["exemplar_features"] = ExemplarFeatures(
          tokens=dict(features.tokens),
          mask={r: spread(m) & keep_exemplars[:, None] for r, m in features.mask.items()})
    return model.apply({"params": params}, x_t, log_snr, **kwargs)

  return guidance_lib.BatchedPredictFn(fn)


def generate(specs: Sequence[StageSpec], params: Sequence[Any], text_params: Sequence[Any],
             text_ids: Array, text_mask: Array, key: Array, scales: Sequence[Scales],
             exemplars: Exemplars | None = None, guidance: str | None = None) -> Array:
  """Samples the whole cascade.

  Args:
    specs: base stage then SR stages (static under jit).
    params: UNet params per stage.
    text_params: T5 params per stage.
    text_ids: [B, L] int32 prompt tokens; text_mask: [B, L] bool.
    key: PRNG key (all noise comes from it).
    scales: guidance scales per stage.
    exemplars: the subject (SuTI), or None for plain text-to-image.
    guidance: guidance mode with exemplars; default each stage's configured
      mode. Without exemplars every stage uses 'cfg' on the text.

  Returns:
    [B, S, S, 3] uint8 images of the last stage.
  """
  stages = []
  for spec, p, tp, scale in zip(specs, params, text_params, scales, strict=True):
    features = None if exemplars is None else encode_exemplars(spec, p, tp, exemplars)
    mode = "cfg" if exemplars is None else guidance or spec.sampling.guidance
    sampling = dataclasses.replace(
        spec.sampling, guidance=mode, guidance_scale=scale.guidance,
        text_guidance_scale=scale.text, exemplar_guidance_scale=scale.exemplar)
    factory = functools.partial(batched_predictor, spec, p,
                                encode_text(spec, tp, text_ids, text_mask), text_mask, features)
    stages.append(cascade.CascadeStage(
        make_predict_fn=factory, image_size=spec.model.image_size, sampling=sampling,
        schedule=make_schedule(spec.diffusion), prediction=spec.diffusion.prediction,
        low_res_size=spec.model.low_res_size, has_exemplars=features is not None,
        channels=spec.model.out_channels))
  images = cascade.sample_cascade(stages, text_ids.shape[0], key)[-1]
  return to_uint8(images)


def to_uint8(images: Array) -> Array:
  """[-1, 1] floats -> uint8 (round to nearest)."""
  return jnp.round(jnp.clip((images + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def from_uint8(images: Array) -> Array:
  """uint8 -> float32 in [-1, 1] (the data pipeline's normalisation)."""
  return images.astype(jnp.float32) / 127.5 - 1.0
