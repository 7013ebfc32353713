"""Input sources: ICL / caption TFRecords and in-memory examples -> tf.data pipelines.

Each source shards its elements per process, shuffles each epoch as a pure
function of (seed, epoch), parses and validates elements in-graph and, for
TFRecords, names a rejected record host-side; `input.InputIterator` batches them.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow as tf
from absl import logging

from suti_jax.data import images
from suti_jax.data import records

# Each TFRecord is framed by 16 bytes (u64 length, u32 CRC, data, u32 CRC), so
# a file was read to its end iff the framed record sizes add up to its size.
_FRAMING_BYTES = 16
_OK, _TRUNCATED, _END = 0, 1, 2
_MAX_PARALLEL_FILES = 16


def _crc32c_table() -> tuple[int, ...]:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), which TFRecord uses."""
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C (only ever of an 8-byte length header here)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def count_records_from(path: str, offset: int, size: int) -> tuple[int, bool]:
  """Counts the TFRecord frames from byte `offset` to the end of the file.

  The reader stops at the first unreadable record, so this is what a damaged
  file loses: the bad record and every record after it. Only length headers
  (and their CRCs) are read.

  Args:
    path: a TFRecord file.
    offset: where the unreadable record starts.
    size: the file's size in bytes.

  Returns:
    (records, exact): `exact` is False when the walk met a frame cut off by
    the end of the file or a bad length header; records in the missing or
    unreadable bytes beyond it cannot be counted.
  """
  count = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while offset < size:
      count += 1
      f.seek(offset)
      header = f.read(12)
      if len(header) < 12 or struct.unpack("<I", header[8:])[0] != _masked_crc32c(header[:8]):
        return count, False
      offset += struct.unpack("<Q", header[:8])[0] + _FRAMING_BYTES
      if offset > size:
        return count, False
  return count, True


class DamagedFiles:
  """The TFRecord files whose reading stopped early, each logged once.

  A file can be cut short (a copy or write that did not finish) or hold a bad
  record mid-way; either way the reader delivers nothing after the damage.
  """

  def __init__(self):
    self._lost: dict[str, int] = {}

  def __len__(self) -> int:
    return len(self._lost)

  def lost_records(self, path: str, read: int, offset: int, size: int) -> int:
    """The records `path` loses from byte `offset` (after `read` good ones)."""
    if path not in self._lost:
      lost, exact = count_records_from(path, offset, size)
      self._lost[path] = lost
      logging.warning(
          "%s: unreadable from record %d (byte %d of %d): %d records read, %d lost%s", path,
          read, offset, size, read, lost,
          " (the rest of the file is intact, but the reader stops at the damage)" if exact else
          " at least: the file is cut short or its framing is broken, so records in the "
          "missing bytes cannot be counted")
    return self._lost[path]


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """What one source kind plugs into the shared epoch pipeline.

  Attributes:
    epoch_plan: epoch -> the epoch's randomness drawn on the host (numpy arrays
      of one shape for every epoch: file order, and 'seed', the epoch's
      `epoch_seed`, which shuffles it and draws its exemplar choices); a pure
      function of (seed, epoch), so an epoch can be rebuilt to resume or to explain.
    raw_from_plan: a plan, as tensors -> this process's raw elements of that
      epoch, shuffled. Built in-graph, so one tf.data stream can run many epochs
      (`InputIterator`) without building a pipeline per epoch.
    process: in-graph raw element -> {image, prompt[, exemplar_images,
      exemplar_captions]} with all exemplars present, plus `prompt_emb` [L, D]
      (and `exemplar_caption_embs` [K, L, D]) when the source reads precomputed
      embeddings; fails on a bad record.
    explain: host-side, raises RecordError for a raw element `process`
      rejected; None for trusted in-memory sources (errors always propagate).
    damaged: TFRecord files found damaged so far; None for in-memory sources.
  """

  epoch_plan: Callable[[int], dict[str, np.ndarray]]
  raw_from_plan: Callable[[dict[str, tf.Tensor]], tf.data.Dataset]
  process: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
  explain: Callable[[dict[str, Any]], None] | None
  damaged: DamagedFiles | None = None

  def raw_epoch(self, epoch: int) -> tf.data.Dataset:
    """Epoch `epoch`'s raw elements on their own (to cache, resume or explain)."""
    return self.raw_from_plan(tf.nest.map_structure(tf.constant, self.epoch_plan(epoch)))


def epoch_seed(seed: int, epoch: int) -> int:
  """The seed of one epoch's shuffle and exemplar choices."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _shuffle(ds: tf.data.Dataset, buffer: int, seed: tf.Tensor) -> tf.data.Dataset:
  if buffer <= 1:
    return ds
  return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)


def _checked(asserts: list[tf.Operation], fn: Callable[[], Any]) -> Any:
  """Runs `fn` after `asserts` (tf.data functions may prune unused asserts)."""
  with tf.control_dependencies(asserts):
    return fn()


def _read_file(path: tf.Tensor, size: tf.Tensor, damaged: DamagedFiles) -> tf.data.Dataset:
  """One file's records as {file, index, kind, record}; a damaged file ends in
  one truncation mark per record lost (so corrupt_policy='skip' counts them)."""
  # A DataLoss error (truncated file, bad CRC) ends the file under
  # ignore_errors; the byte count then tells it apart from a clean end.
  records_ds = tf.data.TFRecordDataset(path).ignore_errors()
  records_ds = records_ds.map(lambda r: (r, tf.constant(False)))
  end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))

  def lost(index, consumed):
    return tf.py_function(
        lambda p, i, c, s: damaged.lost_records(p.numpy().decode(), int(i), int(c), int(s)),
        [path, index, consumed, size], tf.int64)

  def step(state, item):
    index, consumed = state
    record, is_end = item
    kind = tf.where(is_end, tf.where(consumed == size, _END, _TRUNCATED), _OK)
    length = tf.cast(tf.strings.length(record), tf.int64) + _FRAMING_BYTES
    # Elements as [n] rows, unbatched below: n = 1, or the records lost.
    n = tf.cond(tf.equal(kind, _TRUNCATED), lambda: lost(index, consumed),
                lambda: tf.constant(1, tf.int64))
    element = dict(file=tf.fill([n], path), index=index + tf.range(n),
                   kind=tf.fill([n], kind), record=tf.fill([n], record))
    return (index + 1, consumed + length), element

  zero = tf.constant(0, tf.int64)
  marked = records_ds.concatenate(end).scan((zero, zero), step).unbatch()
  return marked.filter(lambda e: e["kind"] != _END)


def _embedding_tf(parsed: dict[str, tf.Tensor], key: str, shape: tf.Tensor,
                  checks: list[tf.Operation]) -> tf.Tensor:
  """A parsed embedding field reshaped to `shape`; appends the check that it has it."""
  values = tf.sparse.to_dense(parsed[key])
  saved = tf.sparse.to_dense(parsed[key + "_shape"])
  want = tf.cast(shape, tf.int64)
  padded = lambda s: tf.pad(s, [[0, 3]])[:3]  # noqa: E731  (ranks 2 and 3)
  same = tf.logical_and(tf.equal(tf.size(saved), tf.size(want)),
                        tf.reduce_all(tf.equal(padded(saved), padded(want))))
  checks.append(tf.debugging.Assert(
      tf.logical_and(same, tf.equal(tf.cast(tf.size(values), tf.int64), tf.reduce_prod(want))),
      [f"field '{key}': missing or not of shape", want]))
  return _checked(checks, lambda: tf.reshape(values, shape))


def _parse_tf(raw: dict[str, tf.Tensor], features: dict[str, Any],
              image_size: int, icl: bool,
              embedding_shape: tuple[int, int] | None) -> dict[str, tf.Tensor]:
  """In-graph parse, validation, decode and resize of one TFRecord record."""
  readable = tf.debugging.Assert(
      tf.equal(raw["kind"], _OK), ["truncated or corrupt TFRecord data"])
  parsed = _checked([readable], lambda: tf.io.parse_single_example(
      raw["record"], features))
  checks = [tf.debugging.Assert(
      tf.equal(parsed["schema_version"], records.SCHEMA_VERSION),
      ["field 'schema_version': unsupported version"])]
  image_key, prompt_key = ("target/image", "target/prompt") if icl else (
      "image", "caption")
  if icl:
    exemplar_bytes = tf.sparse.to_dense(parsed["exemplar/image"])
    captions = tf.sparse.to_dense(parsed["exemplar/caption"])
    count = tf.size(exemplar_bytes)
    checks += [
        tf.debugging.Assert(tf.equal(count, tf.size(captions)),
                            ["field 'exemplar/caption': count mismatch"]),
        tf.debugging.Assert(count > 0, ["field 'exemplar/image': none"])]

  def decode(data, field):
    return images.preprocess_tf(images.decode_tf(data, field), image_size)

  out = {"image": _checked(checks, lambda: decode(parsed[image_key], image_key)),
         "prompt": parsed[prompt_key]}
  if icl:
    out["exemplar_images"] = _checked(checks, lambda: tf.map_fn(
        lambda data: decode(data, "exemplar/image"), exemplar_bytes,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                          tf.float32)))
    out["exemplar_captions"] = captions
  if embedding_shape is not None:
    prompt_key = "embedding/prompt" if icl else "embedding/caption"
    out["prompt_emb"] = _embedding_tf(parsed, prompt_key, embedding_shape, checks)
    if icl:
      out["exemplar_caption_embs"] = _embedding_tf(
          parsed, "embedding/captions", tf.concat([[count], embedding_shape], 0), checks)
  return out


def tfrecord_pipeline(pattern: str, *, icl: bool, image_size: int,
                       process_index: int, process_count: int, seed: int,
                       shuffle_buffer: int,
                       embedding_shape: tuple[int, int] | None = None) -> Pipeline:
  """Files sharded per process (records, if there are fewer files).

  `embedding_shape` (L, D): also read each text's precomputed T5 embedding; a
  record without one, or of another shape, is rejected like any bad record.
  """
  files = sorted(tf.io.gfile.glob(pattern)) if pattern else []
  if not files:
    raise FileNotFoundError(f"data.pattern {pattern!r} matches no files")
  by_record = len(files) < process_count
  mine = files if by_record else files[process_index::process_count]
  sizes = np.array([tf.io.gfile.stat(f).length for f in mine], np.int64)
  damaged = DamagedFiles()

  def epoch_plan(epoch: int) -> dict[str, np.ndarray]:
    return {"order": np.random.default_rng([seed, epoch]).permutation(len(mine)),
            "seed": np.int64(epoch_seed(seed, epoch))}

  def raw_from_plan(plan: dict[str, tf.Tensor]) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.gather(mine, plan["order"]), tf.gather(sizes, plan["order"])))
    ds = ds.interleave(functools.partial(_read_file, damaged=damaged),
                       cycle_length=min(len(mine), _MAX_PARALLEL_FILES),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if by_record:
      ds = ds.filter(lambda e: e["index"] % process_count == process_index)
    return _shuffle(ds, shuffle_buffer, plan["seed"])

  parse = records.parse_icl_group if icl else records.parse_caption_example

  def explain(raw: dict[str, Any]) -> None:
    source = records.record_source(raw["file"].decode(), int(raw["index"]))
    if raw["kind"] == _TRUNCATED:
      raise records.RecordError(source, "<tfrecord>",
                                "truncated or corrupt TFRecord data; the rest "
                                "of the file is unreadable")
    record = parse(raw["record"], source=source)
    if embedding_shape is not None:
      records.check_embeddings(record, source, *embedding_shape)

  features = dict(records.ICL_FEATURES if icl else records.CAPTION_FEATURES)
  if embedding_shape is not None:
    features.update(records.embedding_features(
        records.ICL_EMBEDDINGS if icl else records.CAPTION_EMBEDDINGS))
  return Pipeline(
      epoch_plan, raw_from_plan,
      lambda raw: _parse_tf(raw, features, image_size, icl, embedding_shape), explain, damaged)


def _memory_element(example: Any, icl: bool, index: int) -> dict[str, Any]:
  """Checks one in-memory example and converts it to a generator element."""
  where = f"source[{index}]"
  if not icl:
    image, caption = example
    return {"image": images.check_array(image, field=f"{where}.image"),
            "prompt": str(caption)}
  exemplars = [images.check_array(e, field=f"{where}.exemplar_images[{i}]")
               for i, e in enumerate(example["exemplar_images"])]
  captions = [str(c) for c in example["exemplar_captions"]]
  if not exemplars or len(exemplars) != len(captions):
    raise ValueError(f"{where}: {len(exemplars)} exemplar images and "
                     f"{len(captions)} captions (need 1..K, one caption each)")
  if len({e.shape for e in exemplars}) > 1:
    raise ValueError(f"{where}.exemplar_images: one group's exemplars must "
                     f"share a shape, got {[e.shape for e in exemplars]}")
  return {"image": images.check_array(example["target_image"],
                                      field=f"{where}.target_image"),
          "prompt": str(example["target_prompt"]),
          "exemplar_images": np.stack(exemplars),
          "exemplar_captions": np.array(captions, dtype=object)}


def memory_pipeline(source: Callable[[], Iterable[Any]] | Iterable[Any], *,
                     icl: bool, image_size: int, process_index: int,
                     process_count: int, seed: int,
                     shuffle_buffer: int) -> Pipeline:
  """Examples sharded round-robin across processes, then shuffled."""
  if not callable(source) and iter(source) is source:
    raise TypeError("source: a one-shot iterator can not be replayed each "
                    "epoch; pass a callable returning an iterable, or a list")
  signature = {"image": tf.TensorSpec([None, None, 3], tf.uint8),
               "prompt": tf.TensorSpec([], tf.string)}
  if icl:
    signature.update(
        exemplar_images=tf.TensorSpec([None, None, None, 3], tf.uint8),
        exemplar_captions=tf.TensorSpec([None], tf.string))

  def generate():
    examples = source() if callable(source) else source
    for i, example in enumerate(examples):
      if i % process_count == process_index:
        yield _memory_element(example, icl, i)

  def epoch_plan(epoch: int) -> dict[str, np.ndarray]:
    return {"seed": np.int64(epoch_seed(seed, epoch))}

  def raw_from_plan(plan: dict[str, tf.Tensor]) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return _shuffle(ds, shuffle_buffer, plan["seed"])

  def process(raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = dict(raw, image=images.preprocess_tf(raw["image"], image_size))
    if icl:
      out["exemplar_images"] = images.preprocess_tf(raw["exemplar_images"],
                                                    image_size)
    return out

  return Pipeline(epoch_plan, raw_from_plan, process, None)
