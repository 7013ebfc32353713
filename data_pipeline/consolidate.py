"""Stage 5: consolidate a cluster's captions into one subject description (SuTI: PaLM).

The describer is pluggable; the rule-based default keeps the content words most
captions share, in caption order ('red and blue toy').
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import apache_beam as beam

from data_pipeline import counters
from suti_jax.data.captions import content_words
from suti_jax.data.pipeline_interfaces import Cluster, SubjectDescriber

class FrequentWordsDescriber(SubjectDescriber):
  """Keeps the content words in at least `min_fraction` of the captions (and two).

  Words are ordered by their median position in the captions; the last is taken
  as the head noun and the others as its modifiers: 'red and blue toy'. Noisy
  captions ('click to enlarge') and scene words ('beach') fall below the fraction.
  """

  def __init__(self, min_fraction: float = 0.5, max_words: int = 4):
    self.min_fraction = min_fraction
    self.max_words = max_words

  def describe(self, captions: Sequence[str]) -> str:
    if not captions:
      return ""
    docs = [content_words(c) for c in captions]
    df = collections.Counter(w for words in docs for w in set(words))
    positions = collections.defaultdict(list)
    for words in docs:
      for i, w in enumerate(words):
        positions[w].append(i / max(len(words), 1))
    # One caption is no consensus: a word needs at least two.
    kept = [w for w, n in df.items() if n >= max(2, self.min_fraction * len(captions))]
    # Most frequent first when there are too many, then back into caption order.
    kept = sorted(kept, key=lambda w: (-df[w], w))[:self.max_words]
    kept.sort(key=lambda w: (sorted(positions[w])[len(positions[w]) // 2], w))
    if not kept:
      return ""
    *modifiers, noun = kept
    if not modifiers:
      return noun
    if len(modifiers) == 1:
      return f"{modifiers[0]} {noun}"
    return f"{', '.join(modifiers[:-1])} and {modifiers[-1]} {noun}"


class _ConsolidateFn(beam.DoFn):

  def __init__(self, describer: SubjectDescriber):
    self._describer = describer

  def setup(self):
    self._describer.setup()

  def process(self, cluster: Cluster):
    description = self._describer.describe([m.caption for m in cluster.members])
    if not description:
      counters.count("drop/no_description")
      return
    counters.count("consolidate/clusters")
    yield dataclasses.replace(cluster, description=description)


class Consolidate(beam.PTransform):
  """PCollection[Cluster] -> clusters with `description` set (none: dropped)."""

  def __init__(self, describer: SubjectDescriber = FrequentWordsDescriber()):
    super().__init__()
    self._describer = describer

  def expand(self, clusters):
    return clusters | "Consolidate" >> beam.ParDo(_ConsolidateFn(self._describer))
