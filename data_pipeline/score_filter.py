"""Stage 8: score targets for subject and text fidelity, keep the good ones as ICL groups.

Scorers are pluggable by spec: subject 'embedding' (default) or 'judge:<path>'; text
'constant' (default, 1.0) or 'judge:<path>' (suti_jax.experts.judges, loaded once per worker).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import apache_beam as beam
import numpy as np

from data_pipeline import counters
from data_pipeline.cluster_filter import ColourEmbedder, decode_members
from suti_jax.data import images
from suti_jax.data import records
from suti_jax.data.pipeline_interfaces import Candidate, ImageEmbedder, SubjectScorer, TextScorer
from suti_jax.experts import judges

PIPELINE_VERSION = "data_pipeline/1"
_NO_EXEMPLARS = "no_exemplars"
_LOW_SUBJECT_FIDELITY = "low_subject_fidelity"
_LOW_TEXT_FIDELITY = "low_text_fidelity"
_OVER_SUBJECT_QUOTA = "over_subject_quota"
# The drops this stage counts (`drop/<reason>`).
DROP_REASONS = (_NO_EXEMPLARS, _LOW_SUBJECT_FIDELITY, _LOW_TEXT_FIDELITY, _OVER_SUBJECT_QUOTA)


class EmbeddingSubjectScorer(SubjectScorer):
  """Cosine between the target's embedding and the exemplars' normalised mean."""

  def __init__(self, embedder: ImageEmbedder | None = None):
    self.embedder = embedder or ColourEmbedder()

  def setup(self):
    self.embedder.setup()

  def score(self, image: np.ndarray, exemplar_images: np.ndarray) -> float:
    size = exemplar_images.shape[1]
    if image.shape[:2] != (size, size):  # An expert may render at its own size.
      image = ((images.preprocess_array(image, size) + 1.0) * 127.5).round().astype(np.uint8)
    emb = self.embedder.embed(np.concatenate([image[None], exemplar_images]))
    mean = emb[1:].mean(0)
    return float(emb[0] @ mean / max(np.linalg.norm(mean), 1e-6))


class ConstantTextScorer(TextScorer):
  """The default text scorer when no judge is configured: every target scores 1.0."""

  def score(self, image: np.ndarray, prompt: str) -> float:
    return 1.0


class _Loaded:
  """Adapts a judge class (`load(path)`, `score(...)`) and loads it in setup."""

  def __init__(self, judge_cls: type, path: str):
    self._judge_cls = judge_cls
    self._path = path
    self._judge = None

  def setup(self):
    self._judge = self._judge_cls.load(self._path)

  def score(self, image, condition) -> float:
    return float(self._judge.score(image, condition))

  def recaption(self, image, prompt: str) -> str:
    return self._judge.recaption(image, prompt)


def make_scorer(kind: str, spec: str):
  """Builds a scorer from its flag value.

  Args:
    kind: 'subject' or 'text'.
    spec: subject: 'embedding' or 'judge:<path>'; text: 'constant' or 'judge:<path>'.

  Returns:
    An object with `setup()` and `score(image, exemplars_or_prompt) -> float`.
  """
  if spec.startswith("judge:"):
    judge_cls = judges.SubjectJudge if kind == "subject" else judges.TextJudge
    return _Loaded(judge_cls, spec[len("judge:"):])
  if kind == "subject" and spec == "embedding":
    return EmbeddingSubjectScorer()
  if kind == "text" and spec == "constant":
    return ConstantTextScorer()
  raise ValueError(f"unknown {kind} scorer {spec!r}")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """Flags of the fidelity filter.

  Attributes:
    min_subject_score: targets scoring below are dropped ('drop/low_subject_fidelity').
    min_text_score: targets scoring below are dropped ('drop/low_text_fidelity').
    max_exemplars: K, exemplars per ICL group (the first K by URL order).
    recaption_targets: a target's prompt keeps only the modifiers the text scorer
      sees in it (`TextScorer.recaption`), before its text score is taken; counted
      as 'score_filter/recaptioned'. An expert that drifts from the prompt then
      still gives a group whose text says what its target shows.
    max_groups_per_subject: of one subject's targets that pass both thresholds,
      keep the N that best show their prompts (text score, then subject score);
      the rest are 'drop/over_subject_quota'. With experts rendering more
      prompts than groups wanted, this is best-of-n selection. 0 keeps all.
  """

  min_subject_score: float = 0.3
  min_text_score: float = 0.5
  max_exemplars: int = 5
  recaption_targets: bool = False
  max_groups_per_subject: int = 0


class _ScoreFn(beam.DoFn):

  def __init__(self, subject_scorer, text_scorer, cfg: ScoreConfig):
    self._subject = subject_scorer
    self._text = text_scorer
    self._cfg = cfg

  def setup(self):
    self._subject.setup()
    self._text.setup()

  def process(self, candidate: Candidate):
    cluster, target = candidate.cluster, candidate.target
    chosen = [i for i in range(len(cluster.members)) if i != target.excluded_member]
    chosen = chosen[:self._cfg.max_exemplars]
    if not chosen:
      counters.count(f"drop/{_NO_EXEMPLARS}")
      return
    exemplars = [cluster.members[i] for i in chosen]
    pixels = decode_members(dataclasses.replace(cluster, members=tuple(exemplars)))
    subject = self._subject.score(target.image, pixels)
    if subject < self._cfg.min_subject_score:
      counters.count(f"drop/{_LOW_SUBJECT_FIDELITY}")
      return
    prompt = target.prompt
    # Only targets that kept the subject are recaptioned (a judge call each).
    if self._cfg.recaption_targets:
      prompt = self._text.recaption(target.image, prompt)
      if prompt != target.prompt:
        counters.count("score_filter/recaptioned")
    text = self._text.score(target.image, prompt)
    if text < self._cfg.min_text_score:
      counters.count(f"drop/{_LOW_TEXT_FIDELITY}")
      return
    counters.count("score_filter/groups")
    urls = [m.url for m in exemplars]
    if target.excluded_member >= 0:
      urls.append(cluster.members[target.excluded_member].url)
    yield records.ICLGroup(
        group_id=f"{counters.stable_seed(cluster.key):016x}-{candidate.index:03d}",
        subject_id=cluster.key, skill=target.skill,
        exemplar_images=[m.image for m in exemplars],
        exemplar_captions=[m.caption for m in exemplars],
        target_image=records.encode_png(target.image), target_prompt=prompt,
        score_subject=subject, score_text=text, source_urls=urls,
        expert=candidate.renderer, pipeline=PIPELINE_VERSION)


class ScoreAndFilter(beam.PTransform):
  """PCollection[Candidate] -> PCollection[records.ICLGroup] that pass both filters
  (and, with a quota, are among their subject's best-shown)."""

  def __init__(self, subject_scorer=None, text_scorer=None, cfg: ScoreConfig = ScoreConfig()):
    """Args: scorers default to the embedding / constant ones; cfg: thresholds, K, quota."""
    super().__init__()
    self._fn = _ScoreFn(subject_scorer or EmbeddingSubjectScorer(),
                        text_scorer or ConstantTextScorer(), cfg)
    self._quota = cfg.max_groups_per_subject

  def expand(self, candidates):
    groups = candidates | "Score" >> beam.ParDo(self._fn)
    if self._quota <= 0:
      return groups
    return (groups
            | "BySubject" >> beam.Map(lambda g: (g.subject_id, g))
            | "GroupBySubject" >> beam.GroupByKey()
            | "KeepBest" >> beam.FlatMap(lambda item: best_groups(item[1], self._quota)))


def best_groups(groups: Iterable[records.ICLGroup], quota: int) -> list[records.ICLGroup]:
  """The `quota` groups of one subject that best show their prompts: highest text
  score, then subject score (group id breaks ties, so the choice is deterministic);
  counts the others as 'drop/over_subject_quota'."""
  ranked = sorted(groups, key=lambda g: (-g.score_text, -g.score_subject, g.group_id))
  if len(ranked) > quota:
    counters.count(f"drop/{_OVER_SUBJECT_QUOTA}", len(ranked) - quota)
  return ranked[:quota]
