"""Stage 7: render each cluster's targets with a pluggable `TargetRenderer`.

Renderers by name: 'expert' (DreamBooth, from suti_jax.experts), 'same_cluster'
(SuTI v1) and 'oracle' (synthetic-world ground truth, an upper bound for tests).
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Sequence

import apache_beam as beam

from data_pipeline import counters
from suti_jax.data import images
from suti_jax.data import synthetic
from suti_jax.data.pipeline_interfaces import Candidate, Cluster, PromptSpec, RenderTask, Target
from suti_jax.data.pipeline_interfaces import TargetRenderer
from suti_jax.experts import renderer as expert_renderer

RENDERERS = ("expert", "same_cluster", "oracle")
_STAGE = "expert_render"
_RENDER_FAILED = "render_failed"
# The drops this stage counts (`drop/<reason>`).
DROP_REASONS = (_RENDER_FAILED,)
# Clusters are batched within hash groups of about this many batches; only each
# group's last batch can be short.
_BATCHES_PER_GROUP = 8


class SameClusterRenderer(TargetRenderer):
  """SuTI v1: each cluster image in turn is a target, its caption the prompt.

  The target image is excluded from that group's exemplars. v1 models learned to
  copy exemplars; this mode exists as that baseline.
  """

  name = "same_cluster"

  def __init__(self, max_targets: int = 8):
    self.max_targets = max_targets

  def render_targets(self, cluster: Cluster, prompts: Sequence[PromptSpec],
                     seed: int) -> list[Target]:
    return [Target("same_cluster", m.caption, images.decode_array(m.image), excluded_member=i)
            for i, m in enumerate(cluster.members[:self.max_targets])]


class OracleRenderer(TargetRenderer):
  """Synthetic world only: renders the exact ground truth of each prompt.

  Reads the records' ground-truth `true_subject_id` (JSONL input) and the
  synthetic renderer, so its targets are an upper bound no real expert reaches.
  """

  name = "oracle"

  def render_targets(self, cluster: Cluster, prompts: Sequence[PromptSpec],
                     seed: int) -> list[Target]:
    ids = collections.Counter(m.true_subject_id for m in cluster.members if m.true_subject_id)
    if not ids:
      error = "oracle needs ground-truth true_subject_id (JSONL input from the synthetic web)"
      return [Target(p.skill, p.prompt, None, error=error) for p in prompts]
    subject = synthetic.make_subject(min(ids, key=lambda i: (-ids[i], i)))
    size = images.decode_array(cluster.members[0].image).shape[0]
    targets = []
    for p in prompts:
      try:
        image = synthetic.render(subject, synthetic.parse_prompt(p.prompt), size)
        targets.append(Target(p.skill, p.prompt, image))
      except (KeyError, ValueError) as e:
        targets.append(Target(p.skill, p.prompt, None, error=repr(e)))
    return targets


def make_target_renderer(name: str, **options: Any) -> TargetRenderer:
  """The renderer called `name`, built with `options`.

  Args:
    name: one of `RENDERERS`.
    **options: the renderer's constructor arguments.

  Returns:
    A TargetRenderer (not set up yet).

  Raises:
    ValueError: unknown name.
  """
  if name == "same_cluster":
    return SameClusterRenderer(**options)
  if name == "oracle":
    return OracleRenderer(**options)
  if name == "expert":
    return expert_renderer.ExpertTargetRenderer(**options)
  raise ValueError(f"unknown renderer {name!r}; known: {RENDERERS}")


class _RenderFn(beam.DoFn):
  """Builds the renderer once per worker (setup) and renders a batch of clusters per call."""

  def __init__(self, name: str, options: dict[str, Any], seed: int):
    self._name = name
    self._options = options
    self._seed = seed
    self._renderer = None

  def setup(self):
    self._renderer = make_target_renderer(self._name, **self._options)
    self._renderer.setup()

  def process(self, batch: Sequence[RenderTask]):
    """Renders a batch of clusters (sorted by key; one cluster when not batching)."""
    keys = [task.cluster.key for task in batch]
    seed = counters.stable_seed(self._seed, "render", *keys)
    for task, targets in zip(batch, self._renderer.render_batch(batch, seed)):
      for i, target in enumerate(targets):
        if target.image is None:
          yield counters.dead_letter(_STAGE, _RENDER_FAILED, f"{task.cluster.key}#{i}",
                                     task.cluster.key, f"{target.prompt!r}: {target.error}")
          continue
        counters.count("expert_render/targets")
        yield Candidate(task.cluster, target, i, self._renderer.name)


def batches_of(tasks: Sequence[RenderTask], batch_size: int) -> list[list[RenderTask]]:
  """`tasks` sorted by cluster key and cut into batches of `batch_size` (the last shorter)."""
  ordered = sorted(tasks, key=lambda t: t.cluster.key)
  return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def _part_batches(group_tasks: tuple[int, Iterable[RenderTask]], batch_size: int, part: int,
                  num_parts: int) -> Iterable[list[RenderTask]]:
  """The batches of one hash group that belong to `part`: dealt out in turn, each
  group starting one part further on, so the parts get equal shares of batches."""
  group, tasks = group_tasks
  for index, batch in enumerate(batches_of(list(tasks), batch_size)):
    if (group + index) % num_parts == part:
      yield batch


class RenderTargets(beam.PTransform):
  """PCollection[RenderTask] -> `.candidates` (Candidate) and `.dead_letter`.

  With `batch_size` > 1 the clusters are rendered `batch_size` at a time (an
  expert renderer fine-tunes them vmapped). Batches are cut from key-sorted
  groups of about `_BATCHES_PER_GROUP` batches, chosen by a hash of the cluster
  key, so they do not depend on how the runner bundles elements: the same input
  gives the same batches, and the same targets, on every run.

  With `num_parts` > 1 only part `part`'s share of those batches is rendered
  (dealt out in turn within each group), so `num_parts` runs together render
  exactly the targets of one run.
  """

  def __init__(self, renderer: str, options: dict[str, Any] | None = None, seed: int = 0,
               batch_size: int = 1, part: int = 0, num_parts: int = 1):
    super().__init__()
    if renderer not in RENDERERS:
      raise ValueError(f"unknown renderer {renderer!r}; known: {RENDERERS}")
    if batch_size < 1:
      raise ValueError(f"render batch_size must be >= 1, got {batch_size}")
    if not 0 <= part < num_parts:
      raise ValueError(f"--part={part} must be in [0, --num_parts={num_parts})")
    self._fn = _RenderFn(renderer, dict(options or {}), seed)
    self._batch_size = batch_size
    self._part, self._num_parts = part, num_parts

  def expand(self, tasks):
    size, part, num_parts = self._batch_size, self._part, self._num_parts
    if size == 1 and num_parts == 1:
      batches = tasks | "One" >> beam.Map(lambda task: [task])
    else:
      count = tasks | "Count" >> beam.combiners.Count.Globally()

      def group(task, n):
        groups = max(1, -(-n // (size * _BATCHES_PER_GROUP)))
        return counters.stable_seed("render-group", task.cluster.key) % groups, task

      batches = (tasks
                 | "Group" >> beam.Map(group, n=beam.pvalue.AsSingleton(count))
                 | "ByGroup" >> beam.GroupByKey()
                 | "Batch" >> beam.FlatMap(_part_batches, size, part, num_parts))
    return (batches | "Render" >> beam.ParDo(self._fn)
            .with_outputs(counters.DEAD_LETTER, main="candidates"))
