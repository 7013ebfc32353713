"""Stage 6: write new prompts across the five skills (SuTI v2: an LLM writes them).

Prompts too similar to any exemplar caption are rejected and counted, so the
apprentice learns to follow the prompt instead of copying an exemplar.
"""

from __future__ import annotations

import dataclasses
import apache_beam as beam
import numpy as np

from data_pipeline import counters
from suti_jax.data import synthetic
from suti_jax.data.captions import caption_similarity
from suti_jax.data.pipeline_interfaces import Cluster, PromptSpec, PromptWriter, RenderTask


class GrammarPromptWriter(PromptWriter):
  """The default: the synthetic world's grammar, naming the subject by its description."""

  def write(self, description: str, skill: str, rng: np.random.Generator) -> str:
    scene = synthetic.random_scene(skill, rng)
    return synthetic.write_prompt(None, scene, rng, subject_ref=description)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Flags of the prompt stage.

  Attributes:
    prompts_per_cluster: prompts written per cluster, cycling through the skills.
    max_caption_similarity: a prompt whose similarity to any exemplar caption is
      at least this is rejected ('drop/prompt_too_similar').
    attempts_per_prompt: tries per prompt before giving that prompt up.
    seed: global seed; each cluster's generator is seeded from (seed, key).
  """

  prompts_per_cluster: int = 5
  max_caption_similarity: float = 0.6
  attempts_per_prompt: int = 4
  seed: int = 0


def write_prompts(cluster: Cluster, writer: PromptWriter, cfg: PromptConfig
                  ) -> tuple[list[PromptSpec], int]:
  """Writes one cluster's prompts.

  Args:
    cluster: a consolidated cluster.
    writer: the prompt writer.
    cfg: counts, similarity bound and seed.

  Returns:
    (prompts, number rejected as too similar to an exemplar caption).
  """
  rng = np.random.default_rng(counters.stable_seed(cfg.seed, "prompts", cluster.key))
  captions = [m.caption for m in cluster.members]
  prompts, rejected = [], 0
  for j in range(cfg.prompts_per_cluster):
    skill = synthetic.SKILLS[j % len(synthetic.SKILLS)]
    for _ in range(cfg.attempts_per_prompt):
      prompt = writer.write(cluster.description, skill, rng)
      similarity = max(caption_similarity(prompt, c, cluster.description) for c in captions)
      if similarity >= cfg.max_caption_similarity:
        rejected += 1
        continue
      if all(p.prompt != prompt for p in prompts):
        prompts.append(PromptSpec(skill, prompt))
        break
  return prompts, rejected


class _WriteFn(beam.DoFn):

  def __init__(self, writer: PromptWriter, cfg: PromptConfig):
    self._writer = writer
    self._cfg = cfg

  def setup(self):
    self._writer.setup()

  def process(self, cluster: Cluster):
    prompts, rejected = write_prompts(cluster, self._writer, self._cfg)
    if rejected:
      counters.count("drop/prompt_too_similar", rejected)
    if not prompts:
      counters.count("drop/no_prompts")
      return
    counters.count("prompt_writer/prompts", len(prompts))
    yield RenderTask(cluster, tuple(prompts))


class WritePrompts(beam.PTransform):
  """PCollection[Cluster] -> PCollection[RenderTask]."""

  def __init__(self, writer: PromptWriter = GrammarPromptWriter(),
               cfg: PromptConfig = PromptConfig()):
    super().__init__()
    self._writer = writer
    self._cfg = cfg

  def expand(self, clusters):
    return clusters | "Write" >> beam.ParDo(_WriteFn(self._writer, self._cfg))


def same_cluster_tasks(clusters: beam.PCollection) -> beam.PCollection:
  """SuTI v1 mode writes no prompts: each Cluster becomes a prompt-less RenderTask."""
  return clusters | "NoPrompts" >> beam.Map(lambda c: RenderTask(c, ()))
