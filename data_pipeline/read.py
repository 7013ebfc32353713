"""Stage 1: read web image-text pairs (JSONL + image files, CaptionExample TFRecords,
or a DreamBench folder where each subject becomes one URL cluster).

Invalid inputs go to the dead-letter output with a reason. Also writes the synthetic
web in both input formats, for tests and demos.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from typing import Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_pipeline import counters
from suti_jax.data import images
from suti_jax.data import records
from suti_jax.data.pipeline_interfaces import WebRecord
from suti_jax.data.synthetic import WebPair

FORMATS = ("jsonl", "tfrecord", "dreambench")
# DreamBench photos get URLs on this host, one folder per subject, so that
# clustering by URL puts each subject in its own cluster.
DREAMBENCH_HOST = "dreambench.local"
_STAGE = "read"


def infer_format(pattern: str) -> str:
  """'jsonl' for *.jsonl / *.json, 'dreambench' for a folder holding a
  DreamBench manifest.json, else 'tfrecord'."""
  if pattern.endswith((".jsonl", ".json")):
    return "jsonl"
  if os.path.isfile(os.path.join(pattern, "manifest.json")):
    return "dreambench"
  return "tfrecord"


def dreambench_rows(root: str) -> list[tuple[str, str, str, str]]:
  """(example_id, url, caption, image_path) for every DreamBench photo.

  The caption is the class noun only ("a photo of a dog"), as DreamBooth's
  class prompts; the manifest reader validates every subject and image.
  """
  from suti_jax.eval import dreambench  # pylint: disable=import-outside-toplevel
  benchmark = dreambench.load_benchmark(root)
  return [(f"dreambench/{subject.name}/{path.name}",
           f"https://{DREAMBENCH_HOST}/{subject.name}/{path.name}",
           f"a photo of a {subject.class_noun}", str(path))
          for subject in benchmark.subjects for path in subject.image_paths]


class _ReadDreamBenchPhoto(beam.DoFn):
  """(example_id, url, caption, image_path) -> WebRecord, with the subject as
  ground truth (real photos: the subject is known)."""

  def process(self, element):
    example_id, url, caption, path = element
    with FileSystems.open(path) as f:
      image = f.read()
    yield from _check(example_id, url, caption, image, example_id.split("/")[1])


def _valid_url(url: str) -> bool:
  parts = urllib.parse.urlsplit(url)
  return parts.scheme in ("http", "https") and bool(parts.hostname)


def _image_drop_reason(error: images.ImageError) -> str:
  # A count of its own: bombs are hostile input, not the usual broken download.
  return "image_too_large" if isinstance(error, images.PixelBudgetError) else "undecodable_image"


def _check(example_id: str, url: str, caption: str, image: bytes, true_subject_id: str):
  """Yields the WebRecord, or a dead letter saying what is wrong with it."""
  if not _valid_url(url):
    yield counters.dead_letter(_STAGE, "invalid_url", example_id, url)
    return
  try:
    images.decode_array(image)
  except images.ImageError as e:
    yield counters.dead_letter(_STAGE, _image_drop_reason(e), example_id, url, e.problem)
    return
  counters.count("read/records")
  yield WebRecord(example_id, url, caption, image, true_subject_id)


def _jsonl_lines(path: str) -> Iterator[tuple[str, str, str]]:
  with FileSystems.open(path) as f:
    for i, line in enumerate(f):
      if line.strip():
        yield f"{path}:{i}", posixpath.dirname(path), line.decode("utf-8", "replace")


class _ParseJsonl(beam.DoFn):
  """(source, folder, line) -> WebRecord; images are read relative to the folder."""

  def process(self, element):
    source, folder, line = element
    try:
      row = json.loads(line)
      url, caption, image_path = row["url"], row["caption"], row["image_path"]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
      yield counters.dead_letter(_STAGE, "invalid_json", source, "", repr(e))
      return
    example_id = str(row.get("id") or source)
    path = image_path if "://" in image_path or image_path.startswith("/") else (
        FileSystems.join(folder, image_path))
    try:
      with FileSystems.open(path) as f:
        image = f.read()
    except (OSError, IOError) as e:
      yield counters.dead_letter(_STAGE, "missing_image", example_id, url, repr(e))
      return
    yield from _check(example_id, url, str(caption), image, str(row.get("true_subject_id", "")))


class _ParseCaptionExample(beam.DoFn):
  """Serialised CaptionExample -> WebRecord (the id is its example_id, else its url)."""

  def process(self, serialized: bytes):
    try:
      example = records.parse_caption_example(serialized)
    except records.RecordError as e:
      reason = (_image_drop_reason(e.__cause__) if isinstance(e.__cause__, images.ImageError)
                else "invalid_record")
      yield counters.dead_letter(_STAGE, reason, "", "", str(e))
      return
    yield from _check(example.example_id or example.url, example.url, example.caption,
                      example.image, "")


class ReadWebPairs(beam.PTransform):
  """Reads web pairs; outputs `.records` (WebRecord) and `.dead_letter` (dicts)."""

  def __init__(self, pattern: str, input_format: str = "auto"):
    """Args: pattern: file glob (a folder for 'dreambench'); input_format:
    'jsonl', 'tfrecord', 'dreambench' or 'auto'."""
    super().__init__()
    self._pattern = pattern
    self._format = infer_format(pattern) if input_format == "auto" else input_format
    if self._format not in FORMATS:
      raise ValueError(f"input_format {input_format!r}; known: {FORMATS} or 'auto'")

  def expand(self, pbegin):
    if self._format == "jsonl":
      matched = FileSystems.match([self._pattern])[0].metadata_list
      paths = sorted(m.path for m in matched)
      if not paths:
        raise FileNotFoundError(f"no input files match {self._pattern}")
      raw = pbegin | "Files" >> beam.Create(paths) | "Lines" >> beam.FlatMap(_jsonl_lines)
      parse = beam.ParDo(_ParseJsonl())
    elif self._format == "dreambench":
      raw = pbegin | "Photos" >> beam.Create(dreambench_rows(self._pattern))
      parse = beam.ParDo(_ReadDreamBenchPhoto())
    else:
      raw = pbegin | "TFRecords" >> beam.io.ReadFromTFRecord(self._pattern)
      parse = beam.ParDo(_ParseCaptionExample())
    return raw | "Parse" >> parse.with_outputs(counters.DEAD_LETTER, main="records")


def write_jsonl_input(pairs: Sequence[WebPair], folder: str) -> str:
  """Writes web pairs as `folder/web.jsonl` + `folder/images/*.png`.

  Args:
    pairs: the pairs (e.g. `synthetic.generate_web_pairs(...)`).
    folder: output folder (created).

  Returns:
    The JSONL path. Rows carry `id` and the ground truth `true_subject_id`,
    which only the oracle renderer reads.
  """
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  path = os.path.join(folder, "web.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for i, pair in enumerate(pairs):
      image_path = f"images/{i:06d}.png"
      with open(os.path.join(folder, image_path), "wb") as image_file:
        image_file.write(records.encode_png(pair.image))
      f.write(json.dumps({"id": f"web-{i:06d}", "url": pair.url, "caption": pair.caption,
                          "image_path": image_path,
                          "true_subject_id": pair.true_subject_id}, sort_keys=True) + "\n")
  return path


def write_tfrecord_input(pairs: Sequence[WebPair], path_prefix: str,
                         num_shards: int = 2) -> list[str]:
  """Writes web pairs as sharded CaptionExample TFRecords (no ground truth).

  Args:
    pairs: the pairs.
    path_prefix: shard path prefix; its folder must exist.
    num_shards: number of files.

  Returns:
    The shard paths.
  """
  serialized = (records.serialize_caption_example(records.CaptionExample(
      image=records.encode_png(p.image), caption=p.caption, url=p.url,
      example_id=f"web-{i:06d}")) for i, p in enumerate(pairs))
  return records.write_tfrecords(path_prefix, serialized, num_shards)
