"""Held-out evaluation of the demo: the methods' images (SuTI, DreamBooth experts, the
text-only model, copy-the-nearest-exemplar, ground truth) and their judge and
ground-truth metrics, overall and per skill, with personalisation wall times.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from suti_jax.data import captions
from suti_jax.data import synthetic
from suti_jax.demo import world as world_lib
from suti_jax.experts import dreambooth
from suti_jax.experts import judges as judges_lib
from suti_jax.inference import Pipeline, StageModel
from suti_jax.models.text import TextEncoder, build_tokenizer

# Methods in report order; the last two need no model.
METHODS = ("suti_v2", "suti_v1", "dreambooth", "text_only", "copy_exemplar", "ground_truth")
METHOD_LABELS = {
    "suti_v2": "SuTI v2 (expert targets)",
    "suti_v1": "SuTI v1 (same-cluster targets)",
    "dreambooth": "DreamBooth expert per subject",
    "text_only": "text-only base (class noun)",
    "copy_exemplar": "copy nearest exemplar",
    "ground_truth": "ground truth",
}
# name -> (label, higher is better; None = neither).
METRICS = {
    "subject_fidelity": ("subject fidelity (judge cosine)", True),
    "subject_match": ("same-subject rate (judge)", True),
    "text_fidelity": ("text fidelity (judge)", True),
    "pixel_mse": ("pixel MSE to truth", False),
    "embed_distance": ("subject-embedding distance to truth", False),
    # Low = the image is close to one of the exemplars: how much a method copies.
    "nearest_exemplar_mse": ("pixel MSE to nearest exemplar", None),
}


@dataclasses.dataclass(frozen=True)
class Generated:
  """One method's images for every eval prompt, in eval-set order.

  Attributes:
    images: uint8 [N, H, W, 3].
    seconds_per_subject: personalisation wall time per subject (compilation
      amortised over the subjects), or None for methods that do not personalise.
  """

  images: np.ndarray
  seconds_per_subject: float | None = None


def flat_prompts(eval_set: Sequence[world_lib.EvalSubject]) -> list[world_lib.EvalPrompt]:
  """Every prompt of every subject, subject-major (the row order of all arrays)."""
  return [p for s in eval_set for p in s.prompts]


def ground_truth(eval_set: Sequence[world_lib.EvalSubject]) -> Generated:
  return Generated(np.stack([p.target for p in flat_prompts(eval_set)]))


def copy_nearest_exemplar(eval_set: Sequence[world_lib.EvalSubject]) -> Generated:
  """Per prompt, the exemplar whose caption shares most content words with it.

  The choice reads only the texts, never the judges or the ground truth, so it
  is what a model that learned to copy could do at best without editing.
  """
  images = []
  for subject in eval_set:
    for p in subject.prompts:
      sims = [captions.caption_similarity(p.prompt, c, subject.description)
              for c in subject.exemplar_captions]
      images.append(subject.exemplar_images[int(np.argmax(sims))])
  return Generated(np.stack(images))


def text_only(base: StageModel, eval_set: Sequence[world_lib.EvalSubject], key: jax.Array,
              num_steps: int) -> Generated:
  """The base model on the class-noun prompts: what text alone gets you."""
  pipeline = Pipeline([base])
  prompts = [p.class_prompt for p in flat_prompts(eval_set)]
  return Generated(pipeline.text_to_image(prompts, 1, key, num_steps=num_steps))


def suti(stage: StageModel, eval_set: Sequence[world_lib.EvalSubject], key: jax.Array,
         num_steps: int) -> Generated:
  """SuTI in context: exemplars + prompts -> images, no fine-tuning.

  Each subject's prompts render in one batched call. The time per subject is
  the whole run's wall time (compilation included) divided by the number of
  subjects, as for `dreambooth_experts`.
  """
  pipeline = Pipeline([stage])
  start = time.time()
  images = [pipeline.personalize(subject.exemplar_images, subject.exemplar_captions,
                                 [p.prompt for p in subject.prompts], 1,
                                 jax.random.fold_in(key, s), num_steps=num_steps)
            for s, subject in enumerate(eval_set)]
  return Generated(np.concatenate(images), (time.time() - start) / len(eval_set))


def dreambooth_experts(base: StageModel, eval_set: Sequence[world_lib.EvalSubject],
                       expert_cfg: dreambooth.ExpertConfig, key: jax.Array,
                       num_steps: int) -> Generated:
  """One DreamBooth expert per held-out subject (class prior included), then its
  identifier prompts.

  Experts train in chunks of `expert_cfg.max_parallel_experts`, so the time per
  subject is the whole run's wall time (class images, fine-tunes, sampling,
  compilation) divided by the number of subjects.
  """
  spec = base.spec
  encoder = TextEncoder(spec.text, build_tokenizer(spec.text), base.text_params)
  sampling = expert_cfg.render_sampling(dataclasses.replace(spec.sampling, num_steps=num_steps))
  start = time.time()
  experts = dreambooth.finetune_experts(
      base.params, encoder, spec.model, spec.diffusion,
      [(s.exemplar_images, s.class_noun) for s in eval_set], expert_cfg, key,
      [expert_cfg.instance_prompts(s.class_noun, len(s.exemplar_images),
                                   s.exemplar_captions, s.description) for s in eval_set])
  images = [dreambooth.render(expert, [p.expert_prompt for p in subject.prompts],
                              jax.random.fold_in(key, s), sampling, text_encoder=encoder,
                              unet_cfg=spec.model, diffusion_cfg=spec.diffusion,
                              **expert_cfg.render_options(base.params))
            for s, (subject, expert) in enumerate(zip(eval_set, experts))]
  return Generated(np.concatenate(images), (time.time() - start) / len(eval_set))


def time_personalization(methods: Mapping[str, Callable[[list[world_lib.EvalSubject]], Generated]],
                         eval_set: Sequence[world_lib.EvalSubject], num_timed: int
                         ) -> dict[str, float]:
  """Steady-state seconds to personalise one subject, per method.

  Each method first personalises one warm-up subject (its compiles), then the
  next `num_timed` subjects one call each; the mean of those calls is its time.
  Compiles are a one-off per process and configuration, so they are left out
  for every method alike.

  Args:
    methods: name -> fn(subjects) rendering every prompt of those subjects
      (`suti` or `dreambooth_experts` with their other arguments bound).
    eval_set: the held-out subjects; needs 1 + num_timed of them.
    num_timed: subjects timed per method.

  Returns:
    name -> seconds per subject.
  """
  if num_timed < 1 or len(eval_set) < 1 + num_timed:
    raise ValueError(f"timing {num_timed} subjects after a warm-up needs {1 + num_timed} "
                     f"held-out subjects, got {len(eval_set)}")
  out = {}
  for name, fn in methods.items():
    fn([eval_set[0]])
    seconds = []
    for subject in eval_set[1:1 + num_timed]:
      start = time.perf_counter()
      fn([subject])
      seconds.append(time.perf_counter() - start)
    out[name] = float(np.mean(seconds))
  return out


def score(images: np.ndarray, eval_set: Sequence[world_lib.EvalSubject],
          subject_judge: judges_lib.SubjectJudge,
          text_judge: judges_lib.TextJudge) -> dict[str, np.ndarray]:
  """Per-prompt metrics of one method.

  Args:
    images: uint8 [N, H, W, 3] in `flat_prompts` order.
    eval_set: the held-out subjects.
    subject_judge / text_judge: the trained judges.

  Returns:
    metric name (`METRICS`) -> float32 [N].
  """
  prompts = flat_prompts(eval_set)
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
  targets = np.stack([p.target for p in prompts])
  pixels = images.astype(np.float32) / 255.0
  subject, copy_mse = [], []
  start = 0
  for s in eval_set:
    rows = slice(start, start + len(s.prompts))
    subject.append(subject_judge.score_batch(images[rows], s.exemplar_images))
    exemplars = s.exemplar_images.astype(np.float32) / 255.0
    mse = np.mean((pixels[rows, None] - exemplars[None]) ** 2, axis=(2, 3, 4))
    copy_mse.append(mse.min(axis=1))
    start += len(s.prompts)
  subject_cos = np.concatenate(subject)
  emb = subject_judge.embed(images)
  emb_truth = subject_judge.embed(targets)
  diff = pixels - targets.astype(np.float32) / 255.0
  return {
      "subject_fidelity": subject_cos.astype(np.float32),
      "subject_match": (subject_cos >= subject_judge.threshold).astype(np.float32),
      "text_fidelity": text_judge.score_batch(images, [p.prompt for p in prompts]),
      "pixel_mse": np.mean(diff ** 2, axis=(1, 2, 3)).astype(np.float32),
      "embed_distance": (1.0 - np.sum(emb * emb_truth, axis=-1)).astype(np.float32),
      "nearest_exemplar_mse": np.concatenate(copy_mse).astype(np.float32),
  }


def bootstrap_interval(values: np.ndarray, groups: np.ndarray, *, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """Percentile interval of the mean, resampling whole groups (subjects).

  Prompts of one subject share its exemplars and are not independent, so the
  subjects are what is resampled (a cluster bootstrap); seeded, so a re-run
  gives the same interval.

  Args:
    values: float [N], one per prompt.
    groups: [N] group label of each prompt.
    resamples: bootstrap draws.
    level: coverage of the interval.
    seed: numpy seed.

  Returns:
    (low, high).
  """
  labels, index = np.unique(groups, return_inverse=True)
  sums = np.bincount(index, weights=values, minlength=len(labels))
  counts = np.bincount(index, minlength=len(labels)).astype(np.float64)
  draws = np.random.default_rng(seed).integers(0, len(labels), (resamples, len(labels)))
  means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
  tail = (1.0 - level) / 2
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return float(low), float(high)


def aggregate(per_prompt: dict[str, dict[str, np.ndarray]],
              eval_set: Sequence[world_lib.EvalSubject]) -> dict[str, Any]:
  """Means (with subject-bootstrap 95% intervals) per method, and per method and skill.

  Args:
    per_prompt: method -> `score(...)` output.
    eval_set: the held-out subjects (for the prompts' skills).

  Returns:
    {'methods': {method: {metric: mean}}, 'intervals': {method: {metric: [low, high]}},
     'per_skill': {method: {skill: {metric: mean}}}}.
  """
  prompts = flat_prompts(eval_set)
  skills = np.array([p.skill for p in prompts])
  subjects = np.array([s.subject_id for s in eval_set for _ in s.prompts])
  methods, intervals, per_skill = {}, {}, {}
  for method, values in per_prompt.items():
    methods[method] = {m: float(np.mean(v)) for m, v in values.items()}
    intervals[method] = {m: list(bootstrap_interval(np.asarray(v, np.float64), subjects))
                         for m, v in values.items()}
    per_skill[method] = {
        skill: {m: float(np.mean(v[skills == skill])) for m, v in values.items()}
        for skill in synthetic.SKILLS if np.any(skills == skill)}
  return {"methods": methods, "intervals": intervals, "per_skill": per_skill}
