"""DreamBench (Ruiz et al. 2023): manifest reader, prompts, pluggable generation methods
and the evaluation protocol (25 prompts x N images per subject, DINO / CLIP-I / CLIP-T).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import pathlib
import re
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from suti_jax.data import images as images_lib
from suti_jax.eval import metrics

_TEMPLATE_LINE = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?$")
_SECTIONS = {"Object Prompts": "object", "Live Subject Prompts": "live"}


class BenchmarkError(ValueError):
  """The DreamBench folder is inconsistent (missing image, unknown class, bad prompt file)
  or its manifest points outside it."""


@dataclasses.dataclass(frozen=True)
class Subject:
  """One DreamBench subject: its class noun, live flag and reference photos."""

  name: str
  class_noun: str
  live: bool
  image_paths: tuple[pathlib.Path, ...]


@dataclasses.dataclass(frozen=True)
class PromptTable:
  """`prompts_and_classes.txt`: subject -> class table and the two 25-prompt template lists."""

  classes: dict[str, str]
  object_templates: tuple[str, ...]
  live_templates: tuple[str, ...]


def parse_prompts_and_classes(text: str) -> PromptTable:
  """Parses DreamBench's `prompts_and_classes.txt`.

  Args:
    text: the file's contents.

  Returns:
    The class table and the `'a {0} {1} ...'` templates ({0}: unique token, {1}: class noun).
  """
  classes, templates, section = {}, {"object": [], "live": []}, None
  for line in map(str.strip, text.splitlines()):
    if line in _SECTIONS:
      section = _SECTIONS[line]
    elif (match := _TEMPLATE_LINE.match(line)) and section:
      templates[section].append(match.group(1))
    elif section is None and line.count(",") == 1 and line != "subject_name,class":
      name, class_noun = line.split(",")
      classes[name] = class_noun
  if not classes or not templates["object"] or not templates["live"]:
    raise BenchmarkError("prompts_and_classes.txt lacks the class table or a prompt list")
  return PromptTable(classes, tuple(templates["object"]), tuple(templates["live"]))


def fill_prompt(template: str, class_noun: str, unique_token: str = "") -> str:
  """Fills a `'a {0} {1} ...'` template.

  DreamBooth fills {0} with its rare identifier ("a sks dog"); zero-shot methods such as SuTI
  see the subject through its exemplars, so by default {0} is dropped: "a dog in the snow".

  Args:
    template: a DreamBench template.
    class_noun: the subject's class noun ({1}).
    unique_token: identifier for {0}; empty drops it.

  Returns:
    The prompt, with single spaces.
  """
  return " ".join(template.format(unique_token, class_noun).split())


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A validated DreamBench folder."""

  root: pathlib.Path
  subjects: tuple[Subject, ...]
  table: PromptTable
  unique_token: str = ""

  def templates(self, subject: Subject) -> tuple[str, ...]:
    """The subject's 25 templates (live subjects have their own list)."""
    return self.table.live_templates if subject.live else self.table.object_templates

  def prompts(self, subject: Subject, unique_token: str | None = None) -> list[str]:
    """The subject's prompts, in file order.

    Args:
      subject: a subject of this benchmark.
      unique_token: overrides the benchmark's identifier ("" gives the class-noun prompts
        CLIP-T is scored against).

    Returns:
      The filled prompts.
    """
    token = self.unique_token if unique_token is None else unique_token
    return [fill_prompt(t, subject.class_noun, token) for t in self.templates(subject)]


def _image_path(root: pathlib.Path, manifest: pathlib.Path, subject: str,
                entry: Any) -> pathlib.Path:
  """`root / entry`, refused unless it resolves inside `root`.

  The manifest is untrusted input: an absolute path, `..` or a symlink leading out of the
  folder would make the benchmark read (and the pipeline train on) any file.
  """
  if not isinstance(entry, str):
    raise BenchmarkError(f"{manifest}: subject {subject!r}: image entry {entry!r} is not a "
                         "path")
  path = root / entry
  if not path.resolve().is_relative_to(root.resolve()):
    raise BenchmarkError(f"{manifest}: subject {subject!r}: image {entry!r} is outside {root}")
  return path


def load_benchmark(root: str | pathlib.Path, subjects: Sequence[str] | None = None,
                   unique_token: str = "") -> Benchmark:
  """Reads and validates `manifest.json` and `prompts_and_classes.txt` under `root`.

  Args:
    root: the DreamBench folder (e.g. ../shared/dreambench).
    subjects: names to keep (all when None), in manifest order.
    unique_token: identifier placed in prompts (see `fill_prompt`).

  Returns:
    The benchmark.

  Raises:
    BenchmarkError: naming the subject and path of a missing image, an unknown class or
      subject, or an unknown requested subject; naming the manifest and entry of an image
      path that resolves outside `root` (checked before anything is read).
  """
  root = pathlib.Path(root)
  table = parse_prompts_and_classes((root / "prompts_and_classes.txt").read_text())
  manifest_path = root / "manifest.json"
  manifest = json.loads(manifest_path.read_text())["subjects"]
  unknown = sorted(set(subjects or ()) - set(manifest))
  if unknown:
    raise BenchmarkError(f"unknown subjects {unknown}; the manifest has {sorted(manifest)}")
  out = []
  for name, entry in manifest.items():
    if subjects is not None and name not in subjects:
      continue
    class_noun = entry["class"]
    if class_noun not in set(table.classes.values()):
      raise BenchmarkError(f"subject {name!r}: class {class_noun!r} is not in the class table "
                           f"of {root / 'prompts_and_classes.txt'}")
    if table.classes.get(name, class_noun) != class_noun:
      raise BenchmarkError(f"subject {name!r}: manifest class {class_noun!r} differs from the "
                           f"class table's {table.classes[name]!r}")
    paths = tuple(_image_path(root, manifest_path, name, p) for p in entry["images"])
    if not paths:
      raise BenchmarkError(f"subject {name!r} lists no images")
    for path in paths:
      if not path.is_file():
        raise BenchmarkError(f"subject {name!r}: image {path} is missing")
    out.append(Subject(name, class_noun, bool(entry["live"]), paths))
  return Benchmark(root, tuple(out), table, unique_token)


def load_images(subject: Subject) -> np.ndarray:
  """The subject's reference photos as uint8 [M, H, W, 3] (DreamBench's are 256x256).

  Raises:
    images_lib.ImageError: naming the photo that is undecodable or over the pixel budget.
  """
  return np.stack([images_lib.read_image(p) for p in subject.image_paths])


class GenerationMethod(abc.ABC):
  """A way of producing images for (subject, prompt): the thing DreamBench evaluates."""

  name: str = "method"

  @abc.abstractmethod
  def generate(self, subject: Subject, prompt: str, num_images: int, seed: int) -> np.ndarray:
    """Images of `subject` following `prompt`.

    Args:
      subject: the subject (its photos are `load_images(subject)`).
      prompt: the filled prompt, e.g. "a dog in the snow".
      num_images: how many images to return.
      seed: deterministic seed for this (subject, prompt).

    Returns:
      uint8 [N, H, W, 3]; N == num_images except for `RealImagesMethod`.
    """


class DirectoryMethod(GenerationMethod):
  """Images produced elsewhere, read from `root/<subject>/<prompt_index>_<n>.png`.

  `prompt_index` is the 0-based position of the prompt in the subject's list (file order of
  prompts_and_classes.txt, objects or live), `n` is 0..num_images-1; e.g. `dog/3_0.png`.
  """

  name = "directory"

  def __init__(self, root: str | pathlib.Path, benchmark: Benchmark):
    self.root = pathlib.Path(root)
    self.benchmark = benchmark

  def generate(self, subject: Subject, prompt: str, num_images: int, seed: int) -> np.ndarray:
    prompts = self.benchmark.prompts(subject)
    if prompt not in prompts:
      raise BenchmarkError(f"prompt {prompt!r} is not one of subject {subject.name!r}'s prompts")
    index = prompts.index(prompt)
    images = []
    for n in range(num_images):
      path = self.root / subject.name / f"{index}_{n}.png"
      if not path.is_file():
        raise FileNotFoundError(f"generated image {path} (subject {subject.name!r}, prompt "
                                f"{index}: {prompt!r}) not found")
      images.append(images_lib.read_image(path))
    return np.stack(images)


class RealImagesMethod(GenerationMethod):
  """Returns all of the subject's own photos, whatever `num_images` asks (the upper bound)."""

  name = "real images"

  def generate(self, subject: Subject, prompt: str, num_images: int, seed: int) -> np.ndarray:
    return load_images(subject)


class NoiseMethod(GenerationMethod):
  """Uniform random pixels: a sanity baseline every real method must beat."""

  name = "noise"

  def __init__(self, size_px: int = 256):
    self.size_px = size_px

  def generate(self, subject: Subject, prompt: str, num_images: int, seed: int) -> np.ndarray:
    shape = (num_images, self.size_px, self.size_px, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def prompt_seed(seed: int, subject: Subject, prompt_index: int) -> int:
  """A stable per-(subject, prompt) seed derived from the run's seed."""
  return (seed * 1_000_003 + zlib.crc32(f"{subject.name}/{prompt_index}".encode())) % 2**31


def _check_images(images: np.ndarray, method: GenerationMethod, subject: Subject,
                  prompt: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
    raise ValueError(f"method {method.name!r} returned {images.dtype} {images.shape} for subject "
                     f"{subject.name!r}, prompt {prompt!r}; expected uint8 [N, H, W, 3], N >= 1")
  return images


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Per-subject scores of a method and of the real-images bound, in subject order."""

  method: str
  scores: tuple[metrics.Scores, ...]
  real_bound: tuple[metrics.Scores, ...]


def evaluate(benchmark: Benchmark, method: GenerationMethod, embedders: metrics.Embedders,
             num_images: int = 4, max_prompts: int | None = None, seed: int = 0,
             on_subject: Callable[[Subject, np.ndarray, list[np.ndarray]], None] | None = None,
             ) -> EvalResult:
  """Runs the DreamBench protocol.

  For each subject: its prompts (the first `max_prompts` if given), `num_images` per prompt from
  `method`, scored against the subject's photos (DINO, CLIP-I) and the class-noun prompt (CLIP-T).
  The bound scores the photos against themselves with the same function (`metrics.score`).

  Args:
    benchmark: the validated DreamBench folder.
    method: the generation method.
    embedders: DINO / CLIP embedders.
    num_images: images per prompt (DreamBench: 4).
    max_prompts: truncates each subject's prompt list (quick runs only).
    seed: run seed; each (subject, prompt) gets `prompt_seed(seed, ...)`.
    on_subject: called with (subject, photos, per-prompt generated images), e.g. to write grids.

  Returns:
    The per-subject scores.
  """
  scores, bounds = [], []
  for subject in benchmark.subjects:
    real = load_images(subject)
    real_emb = embedders.embed_images(real)
    prompts = benchmark.prompts(subject)[:max_prompts]
    generated = []
    for i, prompt in enumerate(prompts):
      images = method.generate(subject, prompt, num_images, prompt_seed(seed, subject, i))
      generated.append(_check_images(images, method, subject, prompt))
    # CLIP-T compares with the class-noun prompt: CLIP does not know the unique token.
    text_emb = embedders.embed_texts(benchmark.prompts(subject, unique_token="")[:len(prompts)])
    text_emb = np.repeat(text_emb, [len(g) for g in generated], axis=0)
    flat = [image for batch in generated for image in batch]
    scores.append(metrics.score(subject.name, flat, embedders.embed_images(flat), real, real_emb,
                                text_emb))
    bounds.append(metrics.score(subject.name, list(real), real_emb, real, real_emb))
    if on_subject is not None:
      on_subject(subject, real, generated)
  return EvalResult(method.name, tuple(scores), tuple(bounds))
