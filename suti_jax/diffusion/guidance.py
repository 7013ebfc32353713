"""Classifier-free guidance over the text and exemplar conditions.

Modes: 'cfg' (joint), 'compositional' (nested, separate scales) and
'interleaved' (Re-Imagen: alternate the guided condition between steps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from suti_jax.config import SamplingConfig

GUIDANCE_MODES = ("cfg", "compositional", "interleaved")

# The docs/architecture.md contract: (x_t [B,H,W,C], log_snr [B], text, exemplars)
# -> model output [B,H,W,C], where `text` / `exemplars` are static Python bools
# saying whether that condition is given (False = the null condition).
PredictFn = Callable[[jax.Array, jax.Array, bool, bool], jax.Array]


@dataclasses.dataclass(frozen=True)
class BatchedPredictFn:
  """A model taking per-example condition flags, so that all conditions needed
  at one step run as a single call on a batch concatenated condition-major.

  Attributes:
    fn: (x_t [N*B,H,W,C], log_snr [N*B], keep_text [N*B] bool,
      keep_exemplars [N*B] bool) -> model output [N*B,H,W,C]. Rows k*B:(k+1)*B
      are the k-th condition; per-subject inputs (text embeddings, exemplar
      features) must be tiled N times by `fn` to match.
  """

  fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


Predictor = Union[PredictFn, BatchedPredictFn]


class Condition(NamedTuple):
  """Which conditions a model evaluation sees."""

  text: bool
  exemplars: bool


class _Term(NamedTuple):
  """One guidance term: (scale - 1) * (pred[positive] - pred[negative])."""

  scale: float
  positive: Condition
  negative: Condition


def check_guidance(mode: str, has_exemplars: bool) -> None:
  """Raises ValueError for an unknown mode, or a two-condition mode without
  exemplars (only 'cfg' is meaningful for a plain text-to-image model)."""
  if mode not in GUIDANCE_MODES:
    raise ValueError(
        f"unknown guidance {mode!r}; known: {list(GUIDANCE_MODES)}")
  if mode != "cfg" and not has_exemplars:
    raise ValueError(
        f"guidance {mode!r} needs a model with exemplars; use 'cfg'")


def _terms(cfg: SamplingConfig, has_exemplars: bool,
           phase: int) -> tuple[Condition, tuple[_Term, ...]]:
  """The fully conditional evaluation and the guidance terms of one step.

  Every mode is written as out = c + sum_k (w_k - 1) (pos_k - neg_k), which is
  the usual u + w (c - u) rearranged so that all scales = 1 give exactly c.
  """
  text_and_exemplars = Condition(True, True)
  text_only = Condition(True, False)
  exemplars_only = Condition(False, True)
  neither = Condition(False, False)
  if cfg.guidance == "cfg":
    # Ho & Salimans 2022: one scale, unconditional = no condition at all.
    full = text_and_exemplars if has_exemplars else text_only
    return full, (_Term(cfg.guidance_scale, full, neither),)
  if cfg.guidance == "compositional":
    # Nested form (as InstructPix2Pix, Brooks et al. 2023, eq. 3):
    # u + w_t (c_t - u) + w_e (c_te - c_t). Unlike Liu et al.'s sum of
    # independent terms, it reduces to c_te at w_t = w_e = 1.
    return text_and_exemplars, (
        _Term(cfg.text_guidance_scale, text_only, neither),
        _Term(cfg.exemplar_guidance_scale, text_and_exemplars, text_only))
  # Re-Imagen (Chen et al. 2022, sec. 3.3), interleaving ratio 1/2: even steps
  # guide the text (negative keeps the exemplars), odd steps the exemplars
  # (negative keeps the text).
  if phase == 0:
    term = _Term(cfg.text_guidance_scale, text_and_exemplars, exemplars_only)
  else:
    term = _Term(cfg.exemplar_guidance_scale, text_and_exemplars, text_only)
  return text_and_exemplars, (term,)


def evaluate(predictor: Predictor, x_t: jax.Array, log_snr: jax.Array,
             conditions: tuple[Condition, ...]) -> dict[Condition, jax.Array]:
  """Runs the model once per condition, or once in all for a BatchedPredictFn.

  Args:
    predictor: a PredictFn or a BatchedPredictFn.
    x_t: [B, H, W, C].
    log_snr: [B].
    conditions: distinct conditions to evaluate.

  Returns:
    condition -> model output [B, H, W, C].
  """
  if not isinstance(predictor, BatchedPredictFn):
    return {c: predictor(x_t, log_snr, c.text, c.exemplars) for c in conditions}
  n, batch_size = len(conditions), x_t.shape[0]
  keep_text = jnp.repeat(jnp.array([c.text for c in conditions]), batch_size)
  keep_exemplars = jnp.repeat(
      jnp.array([c.exemplars for c in conditions]), batch_size)
  out = predictor.fn(
      jnp.tile(x_t, (n,) + (1,) * (x_t.ndim - 1)), jnp.tile(log_snr, n),
      keep_text, keep_exemplars)
  return dict(zip(conditions, jnp.split(out, n, axis=0)))


def _combine(predictor: Predictor, x_t: jax.Array, log_snr: jax.Array,
             full: Condition, terms: tuple[_Term, ...]) -> jax.Array:
  """Evaluates the needed conditions and sums the guidance terms onto `full`."""
  # A term with scale 1 contributes nothing: skip its extra model evaluations.
  # Traced scales (inputs of an exported sampler) are always evaluated.
  terms = tuple(term for term in terms
                if isinstance(term.scale, jax.Array) or term.scale != 1.0)
  needed = [full]
  for term in terms:
    needed += [c for c in (term.positive, term.negative) if c not in needed]
  preds = evaluate(predictor, x_t, log_snr, tuple(needed))
  out = preds[full]
  for term in terms:
    out = out + (term.scale - 1.0) * (preds[term.positive] - preds[term.negative])
  return out


def guided_prediction(predictor: Predictor, x_t: jax.Array, log_snr: jax.Array,
                      step: int | jax.Array, cfg: SamplingConfig, *,
                      has_exemplars: bool) -> jax.Array:
  """The guided model output at sampling step `step`.

  Guidance is applied in the model's output space (eps or v). Each mode is an
  affine combination (weights sum to 1) of outputs at the same x_t and log_snr,
  and eps, v and x0 are affine in each other there, so guiding eps or v gives
  the same x0.

  Args:
    predictor: the model with all conditioning bound (PredictFn or
      BatchedPredictFn).
    x_t: [B, H, W, C].
    log_snr: [B].
    step: sampling step index (0 = first, noisiest); Python int or traced
      int32 scalar. Only 'interleaved' uses it.
    cfg: guidance mode and scales.
    has_exemplars: whether the model is conditioned on exemplars (SuTI).

  Returns:
    Guided model output [B, H, W, C].
  """
  check_guidance(cfg.guidance, has_exemplars)
  phases = (0, 1) if cfg.guidance == "interleaved" else (0,)
  branches = [
      functools.partial(_combine, predictor, x_t, log_snr,
                        *_terms(cfg, has_exemplars, phase))
      for phase in phases]
  if len(branches) == 1:
    return branches[0]()
  if isinstance(step, int):
    return branches[step % 2]()
  return jax.lax.switch(step % 2, branches)
