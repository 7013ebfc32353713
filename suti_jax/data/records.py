"""The versioned record schema: ICL groups and image-caption pairs.

Owns tf.train.Example (de)serialisation, validation and sharded TFRecord writing.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterable, Sequence

import numpy as np
import PIL.Image
import tensorflow as tf
from google.protobuf import message

from suti_jax.data import images

SCHEMA_VERSION = 1

# In-graph parse specs (suti_jax.data.sources). A required scalar has no
# default, so a missing key fails the parse; lists are checked after parsing.
ICL_FEATURES = {
    "schema_version": tf.io.FixedLenFeature([], tf.int64),
    "group_id": tf.io.FixedLenFeature([], tf.string),
    "exemplar/image": tf.io.VarLenFeature(tf.string),
    "exemplar/caption": tf.io.VarLenFeature(tf.string),
    "target/image": tf.io.FixedLenFeature([], tf.string),
    "target/prompt": tf.io.FixedLenFeature([], tf.string),
}
CAPTION_FEATURES = {
    "schema_version": tf.io.FixedLenFeature([], tf.int64),
    "image": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
}
# Frozen T5 outputs (`launch.embed_text`), float32 values plus their shape:
# the prompt or caption [L, D], an ICL group's exemplar captions [K, L, D].
ICL_EMBEDDINGS = ("embedding/prompt", "embedding/captions")
CAPTION_EMBEDDINGS = ("embedding/caption",)


def embedding_features(keys: Sequence[str]) -> dict[str, tf.io.VarLenFeature]:
  """In-graph parse specs of embedding fields (checked against their shape after parsing)."""
  features = {}
  for key in keys:
    features[key] = tf.io.VarLenFeature(tf.float32)
    features[key + "_shape"] = tf.io.VarLenFeature(tf.int64)
  return features


class RecordError(ValueError):
  """A record is invalid; the message names its source (file:record) and field."""

  def __init__(self, source: str, field: str, problem: str):
    super().__init__(f"{source}: field '{field}': {problem}")
    self.source = source
    self.field = field
    self.problem = problem


def record_source(path: str, index: int) -> str:
  """The `source` string of record `index` (0-based) in file `path`."""
  return f"{path}:{index}"


@dataclasses.dataclass(frozen=True)
class ICLGroup:
  """K exemplar (image, caption) pairs of one subject, a target and its prompt.

  Images are encoded PNG/JPEG bytes. Embeddings, when present, are the frozen
  text encoder's outputs: prompt [L, D], captions [K, L, D].
  """

  group_id: str
  subject_id: str
  skill: str
  exemplar_images: list[bytes]
  exemplar_captions: list[str]
  target_image: bytes
  target_prompt: str
  score_subject: float
  score_text: float
  source_urls: list[str]
  expert: str
  pipeline: str
  prompt_embedding: np.ndarray | None = None
  caption_embeddings: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class CaptionExample:
  """A plain (image, caption) pair, e.g. a web pair for base-model training."""

  image: bytes
  caption: str
  url: str = ""
  example_id: str = ""
  caption_embedding: np.ndarray | None = None  # [L, D], the frozen text encoder's output.


def encode_png(image: np.ndarray) -> bytes:
  """Encodes uint8 [H, W, 3] as PNG bytes.

  Args:
    image: uint8 [H, W, 3].

  Returns:
    PNG bytes.
  """
  buffer = io.BytesIO()
  PIL.Image.fromarray(images.check_array(image)).save(buffer, format="PNG")
  return buffer.getvalue()


def _bytes(values: Iterable[bytes | str]) -> tf.train.Feature:
  encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=encoded))


def _ints(values: Iterable[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _floats(values: Iterable[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _embedding(features: dict[str, tf.train.Feature], key: str,
               value: np.ndarray | None) -> None:
  if value is not None:
    value = np.asarray(value, np.float32)
    features[key] = _floats(value.ravel())
    features[key + "_shape"] = _ints(value.shape)


def _check_exemplars(source: str, num_images: int, num_captions: int) -> None:
  if num_images != num_captions:
    raise RecordError(source, "exemplar/caption",
                      f"{num_captions} captions for {num_images} exemplar images")
  if num_images == 0:
    raise RecordError(source, "exemplar/image", "no exemplars (need 1..K)")


def serialize_icl_group(group: ICLGroup) -> bytes:
  """Serialises an ICL group as a tf.train.Example.

  Args:
    group: the group; it must have 1..K exemplars with one caption each.

  Returns:
    The serialised Example.

  Raises:
    RecordError: exemplar image/caption counts differ or are 0.
  """
  _check_exemplars(f"group {group.group_id!r}", len(group.exemplar_images),
                   len(group.exemplar_captions))
  features = {
      "schema_version": _ints([SCHEMA_VERSION]),
      "group_id": _bytes([group.group_id]),
      "subject_id": _bytes([group.subject_id]),
      "skill": _bytes([group.skill]),
      "exemplar/image": _bytes(group.exemplar_images),
      "exemplar/caption": _bytes(group.exemplar_captions),
      "target/image": _bytes([group.target_image]),
      "target/prompt": _bytes([group.target_prompt]),
      "score/subject": _floats([group.score_subject]),
      "score/text": _floats([group.score_text]),
      "provenance/source_urls": _bytes(group.source_urls),
      "provenance/expert": _bytes([group.expert]),
      "provenance/pipeline": _bytes([group.pipeline]),
  }
  _embedding(features, "embedding/prompt", group.prompt_embedding)
  _embedding(features, "embedding/captions", group.caption_embeddings)
  example = tf.train.Example(features=tf.train.Features(feature=features))
  return example.SerializeToString(deterministic=True)


def serialize_caption_example(example: CaptionExample) -> bytes:
  """Serialises an image-caption pair as a tf.train.Example."""
  features = {
      "schema_version": _ints([SCHEMA_VERSION]),
      "image": _bytes([example.image]),
      "caption": _bytes([example.caption]),
      "url": _bytes([example.url]),
      "example_id": _bytes([example.example_id]),
  }
  _embedding(features, "embedding/caption", example.caption_embedding)
  proto = tf.train.Example(features=tf.train.Features(feature=features))
  return proto.SerializeToString(deterministic=True)


class _Reader:
  """Typed, validated access to one Example's features."""

  def __init__(self, serialized: bytes, source: str):
    self.source = source
    try:
      self.features = tf.train.Example.FromString(serialized).features.feature
    except message.DecodeError as e:
      raise RecordError(source, "<example>",
                        f"not a serialized tf.train.Example ({e})") from e
    version = self.scalar("schema_version", "int64")
    if version != SCHEMA_VERSION:
      raise RecordError(source, "schema_version",
                        f"version {version}; this reader reads {SCHEMA_VERSION}")

  def has(self, key: str) -> bool:
    return key in self.features

  def values(self, key: str, kind: str) -> list:
    """All values of `key`; `kind` is 'bytes', 'float' or 'int64'."""
    if key not in self.features:
      raise RecordError(self.source, key, "missing field")
    feature = self.features[key]
    which = feature.WhichOneof("kind")
    if which is None:  # A feature with no list set holds no values.
      return []
    if which != f"{kind}_list":
      raise RecordError(self.source, key, f"expected {kind}_list, got {which}")
    return list(getattr(feature, which).value)

  def scalar(self, key: str, kind: str):
    values = self.values(key, kind)
    if len(values) != 1:
      raise RecordError(self.source, key, f"expected 1 value, got {len(values)}")
    return values[0]

  def texts(self, key: str, *, scalar: bool = False) -> list[str]:
    raw = [self.scalar(key, "bytes")] if scalar else self.values(key, "bytes")
    try:
      return [v.decode("utf-8") for v in raw]
    except UnicodeDecodeError as e:
      raise RecordError(self.source, key, f"not UTF-8 text ({e})") from e

  def image(self, data: bytes, field: str) -> bytes:
    try:
      images.decode_array(data, field=field)
    except images.ImageError as e:
      raise RecordError(self.source, field, e.problem) from e
    return data

  def embedding(self, key: str) -> np.ndarray | None:
    if not self.has(key) and not self.has(key + "_shape"):
      return None
    values = np.asarray(self.values(key, "float"), np.float32)
    shape = tuple(self.values(key + "_shape", "int64"))
    if int(np.prod(shape)) != values.size:
      raise RecordError(self.source, key,
                        f"{values.size} values do not fill shape {shape}")
    return values.reshape(shape)


def parse_icl_group(serialized: bytes, *, source: str = "<bytes>") -> ICLGroup:
  """Parses and fully validates one ICL group (host-side, for tools and tests).

  Args:
    serialized: a serialised tf.train.Example.
    source: where it came from, `record_source(path, index)`; prefixes errors.

  Returns:
    The group, with every image checked to decode.

  Raises:
    RecordError: naming `source` and the field (missing field, wrong type or
      schema_version, undecodable image, exemplar count mismatch or 0).
  """
  reader = _Reader(serialized, source)
  exemplar_images = reader.values("exemplar/image", "bytes")
  exemplar_captions = reader.texts("exemplar/caption")
  _check_exemplars(source, len(exemplar_images), len(exemplar_captions))
  return ICLGroup(
      group_id=reader.texts("group_id", scalar=True)[0],
      subject_id=reader.texts("subject_id", scalar=True)[0],
      skill=reader.texts("skill", scalar=True)[0],
      exemplar_images=[reader.image(data, f"exemplar/image[{i}]")
                       for i, data in enumerate(exemplar_images)],
      exemplar_captions=exemplar_captions,
      target_image=reader.image(reader.scalar("target/image", "bytes"),
                                "target/image"),
      target_prompt=reader.texts("target/prompt", scalar=True)[0],
      score_subject=reader.scalar("score/subject", "float"),
      score_text=reader.scalar("score/text", "float"),
      source_urls=reader.texts("provenance/source_urls"),
      expert=reader.texts("provenance/expert", scalar=True)[0],
      pipeline=reader.texts("provenance/pipeline", scalar=True)[0],
      prompt_embedding=reader.embedding("embedding/prompt"),
      caption_embeddings=reader.embedding("embedding/captions"),
  )


def parse_caption_example(serialized: bytes, *,
                          source: str = "<bytes>") -> CaptionExample:
  """Parses and validates one image-caption record (host-side).

  Args:
    serialized: a serialised tf.train.Example.
    source: where it came from, `record_source(path, index)`; prefixes errors.

  Returns:
    The example, its image checked to decode.

  Raises:
    RecordError: naming `source` and the offending field.
  """
  reader = _Reader(serialized, source)
  return CaptionExample(
      image=reader.image(reader.scalar("image", "bytes"), "image"),
      caption=reader.texts("caption", scalar=True)[0],
      url=reader.texts("url", scalar=True)[0],
      example_id=reader.texts("example_id", scalar=True)[0],
      caption_embedding=reader.embedding("embedding/caption"),
  )


def embedded_texts(serialized: bytes, *, source: str = "<bytes>") -> dict[str, str | list[str]]:
  """The texts whose T5 embeddings a record can carry, by embedding field.

  Args:
    serialized: an ICL group or caption example.
    source: `record_source(path, index)`; prefixes errors.

  Returns:
    ICL: {'embedding/prompt': prompt, 'embedding/captions': [caption, ...]};
    caption: {'embedding/caption': caption}. A str field holds one [L, D]
    embedding, a list field [K, L, D].
  """
  reader = _Reader(serialized, source)
  if reader.has("target/prompt"):
    return {"embedding/prompt": reader.texts("target/prompt", scalar=True)[0],
            "embedding/captions": reader.texts("exemplar/caption")}
  return {"embedding/caption": reader.texts("caption", scalar=True)[0]}


def with_embeddings(serialized: bytes, embeddings: dict[str, np.ndarray]) -> bytes:
  """The record with `embeddings` (field -> float array) set; other fields byte-identical."""
  example = tf.train.Example.FromString(serialized)
  features: dict[str, tf.train.Feature] = {}
  for key, value in embeddings.items():
    _embedding(features, key, value)
  for key, feature in features.items():
    example.features.feature[key].CopyFrom(feature)
  return example.SerializeToString(deterministic=True)


def check_embeddings(record: ICLGroup | CaptionExample, source: str, text_len: int,
                     text_dim: int) -> None:
  """Raises RecordError unless `record` carries embeddings of the expected shapes.

  Args:
    record: a parsed ICL group or caption example.
    source: `record_source(path, index)`, prefixes the error.
    text_len: L, the text config's max_length.
    text_dim: D, the text encoder's d_model.
  """
  if isinstance(record, ICLGroup):
    fields = {"embedding/prompt": (record.prompt_embedding, (text_len, text_dim)),
              "embedding/captions": (record.caption_embeddings,
                                     (len(record.exemplar_captions), text_len, text_dim))}
  else:
    fields = {"embedding/caption": (record.caption_embedding, (text_len, text_dim))}
  for key, (value, shape) in fields.items():
    if value is None:
      raise RecordError(source, key, "missing: data.precomputed_embeddings needs every record "
                        "to carry T5 embeddings (write them with launch.embed_text)")
    if value.shape != shape:
      raise RecordError(source, key, f"shape {value.shape}, expected {shape} "
                        "(text max_length, d_model)")


def write_tfrecords(path_prefix: str, serialized_iter: Iterable[bytes],
                    num_shards: int) -> list[str]:
  """Writes records round-robin into `{prefix}-00000-of-0000N` shards.

  Args:
    path_prefix: output path without the shard suffix; its folder must exist.
    serialized_iter: serialised records, in order.
    num_shards: number of files (>= 1); round-robin keeps their sizes equal.

  Returns:
    The shard paths, in shard order (every shard is created, maybe empty).
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  paths = [f"{path_prefix}-{i:05d}-of-{num_shards:05d}"
           for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  try:
    for i, record in enumerate(serialized_iter):
      writers[i % num_shards].write(record)
  finally:
    for writer in writers:
      writer.close()
  return paths


def read_tfrecords(paths: Sequence[str]) -> Iterable[tuple[str, bytes]]:
  """Yields (`record_source`, serialised record) of each file in order."""
  for path in paths:
    for i, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
      yield record_source(path, i), record
