"""tf.data input: ICL / caption TFRecords and in-memory sources -> numpy batches.

Owns `batch_spec` (the data -> train contract), per-process sharding, the
corrupt-record policy and `InputIterator`, whose JSON state resumes exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Protocol, Sequence

import jax
import numpy as np
import tensorflow as tf

from suti_jax.config import DataConfig
from suti_jax.data import images
from suti_jax.data import records

STATE_VERSION = 1
KINDS = ("synthetic", "caption_tfrecord", "icl_tfrecord")
# Each TFRecord is framed by 16 bytes (u64 length, u32 CRC, data, u32 CRC), so
# a file was read to its end iff the framed record sizes add up to its size.
_FRAMING_BYTES = 16
_OK, _TRUNCATED, _END = 0, 1, 2
_MAX_PARALLEL_FILES = 16


class Tokenizer(Protocol):
  """What the pipeline needs from suti_jax.models.text.tokenizers."""

  def encode(self, texts: Sequence[str],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [N, L], mask bool [N, L])."""


def batch_spec(image_size: int, text_len: int, max_exemplars: int | None,
               batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of one host-local batch (docs/architecture.md).

  Args:
    image_size: H = W of the stage, in px.
    text_len: L, tokens per text (`TextEncoderConfig.max_length`).
    max_exemplars: K (`ExemplarConfig.max_exemplars`); None = no exemplar keys.
    batch_size: B, the per-process batch size.

  Returns:
    key -> jax.ShapeDtypeStruct.
  """
  b, s, l = batch_size, image_size, text_len
  spec = {
      "image": jax.ShapeDtypeStruct((b, s, s, 3), np.float32),
      "text_ids": jax.ShapeDtypeStruct((b, l), np.int32),
      "text_mask": jax.ShapeDtypeStruct((b, l), np.bool_),
  }
  if max_exemplars is not None:
    k = max_exemplars
    spec.update(
        exemplar_images=jax.ShapeDtypeStruct((b, k, s, s, 3), np.float32),
        exemplar_text_ids=jax.ShapeDtypeStruct((b, k, l), np.int32),
        exemplar_text_mask=jax.ShapeDtypeStruct((b, k, l), np.bool_),
        exemplar_mask=jax.ShapeDtypeStruct((b, k), np.bool_))
  return spec


@dataclasses.dataclass(frozen=True)
class _Pipeline:
  """What one source kind plugs into the shared epoch pipeline.

  Attributes:
    raw_epoch: epoch -> this process's raw elements, shuffled; a pure function
      of (seed, epoch), so an epoch can be rebuilt to resume or to explain.
    process: in-graph raw element -> {image, prompt[, exemplar_images,
      exemplar_captions]} with all exemplars present; fails on a bad record.
    explain: host-side, raises RecordError for a raw element `process`
      rejected; None for trusted in-memory sources (errors always propagate).
  """

  raw_epoch: Callable[[int], tf.data.Dataset]
  process: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
  explain: Callable[[dict[str, Any]], None] | None


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _shuffle(ds: tf.data.Dataset, buffer: int, seed: int) -> tf.data.Dataset:
  if buffer <= 1:
    return ds
  return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)


def _checked(asserts: list[tf.Operation], fn: Callable[[], Any]) -> Any:
  """Runs `fn` after `asserts` (tf.data functions may prune unused asserts)."""
  with tf.control_dependencies(asserts):
    return fn()


def _read_file(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
  """One file's records as {file, index, kind, record}, plus a truncation mark."""
  # A DataLoss error (truncated file, bad CRC) ends the file under
  # ignore_errors; the byte count then tells it apart from a clean end.
  records_ds = tf.data.TFRecordDataset(path).ignore_errors()
  records_ds = records_ds.map(lambda r: (r, tf.constant(False)))
  end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))

  def step(state, item):
    index, consumed = state
    record, is_end = item
    kind = tf.where(is_end, tf.where(consumed == size, _END, _TRUNCATED), _OK)
    length = tf.cast(tf.strings.length(record), tf.int64) + _FRAMING_BYTES
    element = dict(file=path, index=index, kind=kind, record=record)
    return (index + 1, consumed + length), element

  zero = tf.constant(0, tf.int64)
  marked = records_ds.concatenate(end).scan((zero, zero), step)
  return marked.filter(lambda e: e["kind"] != _END)


def _parse_tf(raw: dict[str, tf.Tensor], features: dict[str, Any],
              image_size: int, icl: bool) -> dict[str, tf.Tensor]:
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
  return out


def _tfrecord_pipeline(pattern: str, *, icl: bool, image_size: int,
                       process_index: int, process_count: int, seed: int,
                       shuffle_buffer: int) -> _Pipeline:
  """Files sharded per process (records, if there are fewer files)."""
  files = sorted(tf.io.gfile.glob(pattern)) if pattern else []
  if not files:
    raise FileNotFoundError(f"data.pattern {pattern!r} matches no files")
  by_record = len(files) < process_count
  mine = files if by_record else files[process_index::process_count]
  sizes = np.array([tf.io.gfile.stat(f).length for f in mine], np.int64)

  def raw_epoch(epoch: int) -> tf.data.Dataset:
    order = np.random.default_rng([seed, epoch]).permutation(len(mine))
    ds = tf.data.Dataset.from_tensor_slices(
        ([mine[i] for i in order], sizes[order]))
    ds = ds.interleave(_read_file,
                       cycle_length=min(len(mine), _MAX_PARALLEL_FILES),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if by_record:
      ds = ds.filter(lambda e: e["index"] % process_count == process_index)
    return _shuffle(ds, shuffle_buffer, _epoch_seed(seed, epoch))

  parse = records.parse_icl_group if icl else records.parse_caption_example

  def explain(raw: dict[str, Any]) -> None:
    source = records.record_source(raw["file"].decode(), int(raw["index"]))
    if raw["kind"] == _TRUNCATED:
      raise records.RecordError(source, "<tfrecord>",
                                "truncated or corrupt TFRecord data; the rest "
                                "of the file is unreadable")
    parse(raw["record"], source=source)

  features = records.ICL_FEATURES if icl else records.CAPTION_FEATURES
  return _Pipeline(
      raw_epoch, lambda raw: _parse_tf(raw, features, image_size, icl), explain)


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


def _memory_pipeline(source: Callable[[], Iterable[Any]] | Iterable[Any], *,
                     icl: bool, image_size: int, process_index: int,
                     process_count: int, seed: int,
                     shuffle_buffer: int) -> _Pipeline:
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

  def raw_epoch(epoch: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return _shuffle(ds, shuffle_buffer, _epoch_seed(seed, epoch))

  def process(raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = dict(raw, image=images.preprocess_tf(raw["image"], image_size))
    if icl:
      out["exemplar_images"] = images.preprocess_tf(raw["exemplar_images"],
                                                    image_size)
    return out

  return _Pipeline(raw_epoch, process, None)


def _select_exemplars(out: dict[str, tf.Tensor], max_exemplars: int,
                      seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """A seeded random subset (1..K_max) and order of the exemplars, padded."""
  captions = out["exemplar_captions"]
  present = tf.size(captions)
  order = tf.argsort(tf.random.stateless_uniform([present], seed[0]))
  count = tf.random.stateless_uniform(
      [], seed[1], minval=1, maxval=tf.minimum(present, max_exemplars) + 1,
      dtype=tf.int32)
  chosen = order[:count]
  pad = max_exemplars - count
  exemplars = tf.pad(tf.gather(out["exemplar_images"], chosen),
                     [[0, pad], [0, 0], [0, 0], [0, 0]])
  captions = tf.concat([tf.gather(captions, chosen), tf.fill([pad], "")], 0)
  exemplars.set_shape([max_exemplars] + exemplars.shape[1:].as_list())
  captions.set_shape([max_exemplars])
  return dict(out, exemplar_images=exemplars, exemplar_captions=captions,
              exemplar_mask=tf.range(max_exemplars) < count)


class InputIterator:
  """Host-local numpy batches (see `batch_spec`), resumable from JSON state.

  State is (epoch, position): each epoch's pipeline is a pure function of
  (seed, epoch), and `position` counts this process's shuffled raw elements
  consumed by the batches handed out. Resuming rebuilds the epoch and skips
  `position` raw elements before any parsing or decoding. (tf.data's own
  iterator checkpoints hold the shuffle buffer: large, binary, not JSON.)
  """

  def __init__(self, pipeline: _Pipeline, *, tokenizer: Tokenizer,
               text_len: int, batch_size: int, max_exemplars: int | None,
               skip_corrupt: bool, num_epochs: int | None,
               identity: dict[str, Any]):
    self._pipeline = pipeline
    self._tokenizer = tokenizer
    self._text_len = text_len
    self._batch_size = batch_size
    self._max_exemplars = max_exemplars
    self._skip_corrupt = skip_corrupt and pipeline.explain is not None
    self._num_epochs = num_epochs
    self._identity = identity
    self._epoch = self._position = self._num_skipped = 0
    self._fresh_epoch = True
    self._batches = None
    # A tf.function traces once per iterator, not once per epoch's dataset.
    self._transform = tf.function(self._transform_record)

  @property
  def num_skipped(self) -> int:
    """Corrupt records dropped so far (corrupt_policy='skip'); a metric."""
    return self._num_skipped

  @property
  def epoch(self) -> int:
    return self._epoch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state (Orbax: save it as a JSON item)."""
    return dict(self._identity, version=STATE_VERSION, epoch=self._epoch,
                position=self._position, num_skipped=self._num_skipped)

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where the iterator that gave `state` was."""
    expected = dict(self._identity, version=STATE_VERSION)
    mismatched = {k: (state.get(k), v) for k, v in expected.items()
                  if state.get(k) != v}
    if mismatched:
      raise ValueError(f"input state does not fit this input (saved, now): "
                       f"{mismatched}")
    self._epoch = int(state["epoch"])
    self._position = int(state["position"])
    self._num_skipped = int(state["num_skipped"])
    self._batches = None

  def __iter__(self) -> InputIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._batches is None:
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
          raise StopIteration
        self._fresh_epoch = self._position == 0
        self._batches = self._epoch_dataset(self._position).as_numpy_iterator()
      try:
        batch = self._to_batch(next(self._batches))
      except tf.errors.OpError as e:
        self._batches = None
        self._explain(e)
      if batch is not None:
        self._fresh_epoch = False
        return batch
      if self._fresh_epoch:
        raise ValueError(
            f"epoch {self._epoch} gave no full batch of {self._batch_size} "
            f"for process {self._identity['process_index']}")
      self._epoch, self._position, self._batches = self._epoch + 1, 0, None

  def _epoch_dataset(self, start: int) -> tf.data.Dataset:
    """Batches of epoch `self._epoch` from raw position `start` on.

    The raw stream ends with a marker whose position is the epoch's length,
    so records skipped after the last full batch are counted too; the last,
    partial batch holds the marker and is dropped on the host.
    """
    key = tf.constant(_epoch_seed(self._identity["seed"], self._epoch),
                      tf.int64)

    def zeros(spec):
      return tf.nest.map_structure(
          lambda s: tf.zeros([d or 0 for d in s.shape], s.dtype), spec)

    raw = self._pipeline.raw_epoch(self._epoch)
    ds = raw.map(lambda r: (r, False)).concatenate(
        tf.data.Dataset.from_tensors((zeros(raw.element_spec), True)))
    ds = ds.enumerate()
    out_spec = ds.map(
        lambda p, item: self._transform(p, item[0], key)).element_spec

    def transform_or_end(position, item):
      end = dict(zeros(out_spec), position=position, end=tf.constant(True))
      return tf.cond(item[1], lambda: end,
                     lambda: self._transform(position, item[0], key))

    ds = ds.skip(start).map(transform_or_end,
                            num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    if self._skip_corrupt:
      # Dropped records leave gaps in `position`; _to_batch counts them.
      ds = ds.ignore_errors()
    options = tf.data.Options()
    options.deterministic = True
    return ds.batch(self._batch_size).prefetch(
        tf.data.AUTOTUNE).with_options(options)

  def _transform_record(self, position: tf.Tensor, raw: dict[str, tf.Tensor],
                        key: tf.Tensor) -> dict[str, tf.Tensor]:
    """In-graph: one raw element -> a batch row (before tokenisation)."""
    out = self._pipeline.process(raw)
    if self._max_exemplars is not None:
      seeds = tf.stack([[key, 2 * position], [key, 2 * position + 1]])
      out = _select_exemplars(out, self._max_exemplars, seeds)
    return dict(out, position=position, end=tf.constant(False))

  def _explain(self, error: tf.errors.OpError) -> None:
    """Raises a RecordError naming the bad record of the failed batch."""
    if self._pipeline.explain is not None:
      raws = self._pipeline.raw_epoch(self._epoch).skip(self._position)
      for raw in raws.take(self._batch_size).as_numpy_iterator():
        self._pipeline.explain(raw)
    where = (f"epoch {self._epoch}, elements {self._position}.."
             f"{self._position + self._batch_size} of process "
             f"{self._identity['process_index']}")
    raise records.RecordError(where, "<unknown>",
                              f"tf.data failed: {error.message}") from error

  def _encode(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    strings = [t.decode("utf-8") for t in texts.reshape(-1)]
    ids, mask = self._tokenizer.encode(strings, self._text_len)
    shape = texts.shape + (self._text_len,)
    return (np.asarray(ids, np.int32).reshape(shape),
            np.asarray(mask, bool).reshape(shape))

  def _to_batch(self,
                raw: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Counts skipped records; a numpy batch, or None at the epoch's end."""
    end = bool(raw["end"][-1])
    # The end marker is no record; its position is the epoch's length.
    consumed = int(raw["position"][-1]) + 1 - end
    self._num_skipped += consumed - self._position - (len(raw["end"]) - end)
    self._position = consumed
    if end:
      return None
    text_ids, text_mask = self._encode(raw["prompt"])
    batch = {"image": raw["image"], "text_ids": text_ids,
             "text_mask": text_mask}
    if self._max_exemplars is not None:
      slot_mask = raw["exemplar_mask"]
      ids, mask = self._encode(raw["exemplar_captions"])
      # Padded slots carry no text: all-False masks, zero ids.
      mask &= slot_mask[..., None]
      batch.update(exemplar_images=raw["exemplar_images"],
                   exemplar_text_ids=np.where(mask, ids, 0),
                   exemplar_text_mask=mask, exemplar_mask=slot_mask)
    return batch


def make_input(data_cfg: DataConfig, *, image_size: int, text_len: int,
               max_exemplars: int | None, batch_size: int,
               tokenizer: Tokenizer, process_index: int | None = None,
               process_count: int | None = None, seed: int = 0,
               source: Callable[[], Iterable[Any]] | Iterable[Any] | None = None,
               num_epochs: int | None = None) -> InputIterator:
  """Builds this process's input for `data_cfg.kind`.

  Args:
    data_cfg: the data section ('caption_tfrecord' and 'icl_tfrecord' read
      `pattern`; corrupt_policy applies to them).
    image_size: H = W in px.
    text_len: L, tokens per text.
    max_exemplars: K_max for ICL input; None for image-caption input.
    batch_size: per-process batch size (global batch / process_count).
    tokenizer: any object with `encode(texts, max_length) -> (ids, mask)`.
    process_index: this process; default `jax.process_index()`.
    process_count: default `jax.process_count()`.
    seed: the run seed, mixed with `data_cfg.seed`.
    source: 'synthetic' only: a callable returning one epoch's examples (or a
      re-iterable), each an (image uint8 [H, W, 3], caption) pair, or for ICL
      a dict with target_image, target_prompt, exemplar_images (same-shape
      uint8 [H, W, 3] each), exemplar_captions. Same order every call.
    num_epochs: stop after this many epochs; None = forever.

  Returns:
    The iterator; batches match `batch_spec(image_size, text_len,
    max_exemplars, batch_size)`.
  """
  if data_cfg.kind not in KINDS:
    raise ValueError(f"data.kind {data_cfg.kind!r} not in {KINDS}")
  if data_cfg.corrupt_policy not in ("fail", "skip"):
    raise ValueError(f"data.corrupt_policy {data_cfg.corrupt_policy!r} not in "
                     "('fail', 'skip')")
  if (source is not None) != (data_cfg.kind == "synthetic"):
    raise ValueError("source= is required for data.kind 'synthetic' and only "
                     f"for it (kind {data_cfg.kind!r})")
  icl = max_exemplars is not None
  if data_cfg.kind != "synthetic" and icl != (data_cfg.kind == "icl_tfrecord"):
    raise ValueError(f"data.kind {data_cfg.kind!r} does not match "
                     f"max_exemplars={max_exemplars}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  mixed_seed = int(np.random.SeedSequence([data_cfg.seed, seed])
                   .generate_state(1)[0])
  common = dict(icl=icl, image_size=image_size, process_index=process_index,
                process_count=process_count, seed=mixed_seed,
                shuffle_buffer=data_cfg.shuffle_buffer)
  if data_cfg.kind == "synthetic":
    pipeline = _memory_pipeline(source, **common)
  else:
    pipeline = _tfrecord_pipeline(data_cfg.pattern, **common)
  identity = dict(kind=data_cfg.kind, seed=mixed_seed, batch_size=batch_size,
                  process_index=process_index, process_count=process_count)
  return InputIterator(
      pipeline, tokenizer=tokenizer, text_len=text_len, batch_size=batch_size,
      max_exemplars=max_exemplars,
      skip_corrupt=data_cfg.corrupt_policy == "skip", num_epochs=num_epochs,
      identity=identity)
