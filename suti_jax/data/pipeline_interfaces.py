"""The contract between the Beam pipeline's stages and the models they plug in.

Element types (records, clusters, prompts, targets) and the model ABCs (embedder,
captioner, describer, prompt writer, target renderer, fidelity scorers), each an
object with `setup()` (called once per worker) and one method. `data_pipeline`
imports these; the library implements some of them (`suti_jax.experts.renderer`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class WebRecord:
  """One input image-text pair.

  Attributes:
    example_id: stable id (the input's own id, else 'file:line').
    url: the image URL.
    caption: alt text (after recaptioning: the new caption).
    image: encoded PNG/JPEG bytes, checked to decode at read time.
    true_subject_id: synthetic-world ground truth or ''; only the oracle
      renderer may read it.
  """

  example_id: str
  url: str
  caption: str
  image: bytes
  true_subject_id: str = ""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The records of one URL cluster, sorted by (url, example_id).

  Attributes:
    key: the normalised URL prefix the records share.
    members: the records.
    description: consolidated subject description ('' before consolidation).
  """

  key: str
  members: tuple[WebRecord, ...]
  description: str = ""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """A prompt to render for a cluster and the skill it exercises."""

  skill: str
  prompt: str


@dataclasses.dataclass(frozen=True)
class RenderTask:
  """A cluster and the prompts its expert renders, in order."""

  cluster: Cluster
  prompts: tuple[PromptSpec, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
  """One rendered target (or why rendering failed).

  Attributes:
    skill: the skill the prompt exercises ('same_cluster' in SuTI v1 mode).
    prompt: the prompt the target answers.
    image: uint8 [H, W, 3], or None when rendering failed.
    excluded_member: index into the cluster's members that must not be an
      exemplar (the target itself in same-cluster mode); -1 = none.
    error: why rendering failed ('' on success).
  """

  skill: str
  prompt: str
  image: np.ndarray | None
  excluded_member: int = -1
  error: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
  """A rendered target with its cluster, before fidelity filtering."""

  cluster: Cluster
  target: Target
  index: int
  renderer: str


class ImageEmbedder(abc.ABC):
  """Maps images to unit vectors whose dot product is an image similarity."""

  def setup(self) -> None:
    """Loads weights; called once per worker before any `embed`."""

  @abc.abstractmethod
  def embed(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, D], each row L2-normalised."""


class Captioner(abc.ABC):
  """Writes a new caption for an image (SuTI: PaLI)."""

  # False lets the stage skip decoding images the captioner never looks at.
  needs_image: bool = True

  def setup(self) -> None:
    """Loads weights; called once per worker."""

  @abc.abstractmethod
  def caption(self, image: np.ndarray, source_caption: str) -> str:
    """uint8 [H, W, 3] and its web caption -> the new caption."""


class SubjectDescriber(abc.ABC):
  """Consolidates a cluster's captions into one subject description (SuTI: PaLM)."""

  def setup(self) -> None:
    """Loads weights; called once per worker."""

  @abc.abstractmethod
  def describe(self, captions: Sequence[str]) -> str:
    """The captions of one cluster -> a short description ('' = none found)."""


class PromptWriter(abc.ABC):
  """Writes new prompts about a subject for a given skill (SuTI: an LLM)."""

  def setup(self) -> None:
    """Loads weights; called once per worker."""

  @abc.abstractmethod
  def write(self, description: str, skill: str, rng: np.random.Generator) -> str:
    """One prompt that asks for the described subject under `skill`."""


class TargetRenderer(abc.ABC):
  """Renders the target images of one cluster's prompts (SuTI: a DreamBooth expert).

  The expert-render stage calls `setup()` once per worker and `render_targets`
  once per cluster, so a renderer can fine-tune or load one expert per cluster
  and batch all of its prompts.
  """

  name: str = "renderer"

  def setup(self) -> None:
    """Loads weights; called once per worker."""

  @abc.abstractmethod
  def render_targets(self, cluster: Cluster, prompts: Sequence[PromptSpec],
                     seed: int) -> list[Target]:
    """Targets for `prompts` (a renderer may choose its own, see same-cluster)."""

  def render_batch(self, tasks: Sequence[RenderTask], seed: int) -> list[list[Target]]:
    """Targets of several clusters at once (the stage batches clusters when asked).

    The default renders each cluster alone (task i with seed + i); a renderer
    that trains its experts together (vmapped) overrides it.

    Args:
      tasks: clusters with their prompts, sorted by cluster key.
      seed: one seed for the whole batch.

    Returns:
      Per task, its targets.
    """
    return [self.render_targets(t.cluster, t.prompts, (seed + i) % 2**63)
            for i, t in enumerate(tasks)]


class SubjectScorer(abc.ABC):
  """Subject fidelity of a target to its exemplars (SuTI: CLIP-I / DINO)."""

  def setup(self) -> None:
    """Loads weights; called once per worker."""

  @abc.abstractmethod
  def score(self, image: np.ndarray, exemplar_images: np.ndarray) -> float:
    """uint8 [H, W, 3] and uint8 [K, H, W, 3] -> a score, higher = same subject."""


class TextScorer(abc.ABC):
  """Text fidelity of a target to its prompt (SuTI: CLIP-T)."""

  def setup(self) -> None:
    """Loads weights; called once per worker."""

  @abc.abstractmethod
  def score(self, image: np.ndarray, prompt: str) -> float:
    """uint8 [H, W, 3] and a prompt -> a score in [0, 1], higher = matches."""

  def recaption(self, image: np.ndarray, prompt: str) -> str:
    """The prompt restricted to what the image shows; a scorer that can not tell
    keeps the prompt."""
    return prompt
