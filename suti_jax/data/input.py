"""tf.data input: the pipelines of `sources` -> numpy training batches.

Owns `batch_spec` (the data -> train contract), exemplar selection, the
corrupt-record policy and `InputIterator`, whose JSON state resumes exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from suti_jax.config import DataConfig
from suti_jax.data import cached
from suti_jax.data import records
from suti_jax.data import sources

STATE_VERSION = 1
KINDS = ("synthetic", "caption_tfrecord", "icl_tfrecord")
# Epochs one tf.data stream runs before the iterator builds the next. Building a
# stream (tracing its functions, creating its iterator) cost 0.4 s of CPU for the
# tiny SuTI config: once per epoch, it was 3% of an epoch of 1,024 groups.
EPOCHS_PER_STREAM = 64


class Tokenizer(Protocol):
  """What the pipeline needs from suti_jax.models.text.tokenizers."""

  def encode(self, texts: Sequence[str],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [N, L], mask bool [N, L])."""


def batch_spec(image_size: int, text_len: int, max_exemplars: int | None,
               batch_size: int, text_dim: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of one host-local batch (docs/architecture.md).

  Args:
    image_size: H = W of the stage, in px.
    text_len: L, tokens per text (`TextEncoderConfig.max_length`).
    max_exemplars: K (`ExemplarConfig.max_exemplars`); None = no exemplar keys.
    batch_size: B, the per-process batch size.
    text_dim: D of precomputed T5 embeddings (`text_emb`, `exemplar_text_emb`);
      None = the batch carries none.

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
  if text_dim is not None:
    spec["text_emb"] = jax.ShapeDtypeStruct((b, l, text_dim), np.float32)
    if max_exemplars is not None:
      spec["exemplar_text_emb"] = jax.ShapeDtypeStruct((b, max_exemplars, l, text_dim),
                                                       np.float32)
  return spec


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
  chosen_out = dict(exemplar_images=exemplars, exemplar_captions=captions,
                    exemplar_mask=tf.range(max_exemplars) < count)
  if "exemplar_caption_embs" in out:
    embs = tf.pad(tf.gather(out["exemplar_caption_embs"], chosen), [[0, pad], [0, 0], [0, 0]])
    embs.set_shape([max_exemplars] + out["exemplar_caption_embs"].shape[1:].as_list())
    chosen_out["exemplar_caption_embs"] = embs
  return dict(out, **chosen_out)


class InputIterator:
  """Host-local numpy batches (see `batch_spec`), resumable from JSON state.

  State is (epoch, position): each epoch's pipeline is a pure function of
  (seed, epoch), and `position` counts this process's shuffled raw elements
  consumed by the batches handed out. Resuming rebuilds the epoch and skips
  `position` raw elements before any parsing or decoding. (tf.data's own
  iterator checkpoints hold the shuffle buffer: large, binary, not JSON.)
  One tf.data stream runs up to `EPOCHS_PER_STREAM` epochs, each built in-graph
  from its host-drawn plan (`sources.Pipeline.epoch_plan`), so the next epoch's
  first batches are prefetched while this one ends.
  """

  def __init__(self, pipeline: sources.Pipeline, *, tokenizer: Tokenizer,
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
    self._stream_end = 0  # The first epoch the current stream does not run.
    # A tf.function traces once per iterator, not once per epoch's dataset.
    self._transform = tf.function(self._transform_record)

  @property
  def num_skipped(self) -> int:
    """Corrupt records dropped so far (corrupt_policy='skip'); a metric."""
    return self._num_skipped

  @property
  def epoch(self) -> int:
    return self._epoch

  def stats(self) -> dict[str, float]:
    """This process's input metrics, named like the train step's scalars.

    Returns:
      'data/skipped_records': records dropped under corrupt_policy='skip': bad
        records, and all records from where a damaged file became unreadable
        (those in bytes missing from a cut-short file cannot be counted);
      'data/damaged_files': files whose reading stopped early (logged by path).
    """
    damaged = self._pipeline.damaged
    return {"data/skipped_records": float(self._num_skipped),
            "data/damaged_files": float(len(damaged) if damaged is not None else 0)}

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
        self._batches = self._stream(self._position).as_numpy_iterator()
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
      self._epoch, self._position, self._fresh_epoch = self._epoch + 1, 0, True
      if self._epoch >= self._stream_end:
        self._batches = None

  def _stream(self, start: int) -> tf.data.Dataset:
    """Batches of epochs `self._epoch`.. (up to EPOCHS_PER_STREAM of them, and
    `num_epochs`), the first from raw position `start` on."""
    first = self._epoch
    self._stream_end = first + EPOCHS_PER_STREAM
    if self._num_epochs is not None:
      self._stream_end = min(self._stream_end, self._num_epochs)
    epochs = range(first, self._stream_end)
    plans = [self._pipeline.epoch_plan(e) for e in epochs]
    rows = dict(plan={k: np.stack([p[k] for p in plans]) for k in plans[0]},
                start=np.array([start] + [0] * (len(plans) - 1), np.int64))
    ds = tf.data.Dataset.from_tensor_slices(rows).flat_map(
        lambda row: self._epoch_batches(row["plan"], row["start"]))
    options = tf.data.Options()
    options.deterministic = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

  def _epoch_batches(self, plan: dict[str, tf.Tensor], start: tf.Tensor) -> tf.data.Dataset:
    """In-graph: the batches of one epoch (`plan`; its seed also draws the
    exemplar choices) from raw position `start` on.

    The raw stream ends with a marker whose position is the epoch's length,
    so records skipped after the last full batch are counted too; the last,
    partial batch holds the marker and is dropped on the host.
    """
    key = plan["seed"]

    def zeros(spec):
      return tf.nest.map_structure(
          lambda s: tf.zeros([d or 0 for d in s.shape], s.dtype), spec)

    raw = self._pipeline.raw_from_plan(plan)
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
    return ds.batch(self._batch_size)

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
    skipped = consumed - self._position - (len(raw["end"]) - end)
    if skipped:
      self._num_skipped += skipped
      logging.warning("corrupt_policy='skip': skipped %d records in epoch %d (%d in all)",
                      skipped, self._epoch, self._num_skipped)
    self._position = consumed
    if end:
      return None
    text_ids, text_mask = self._encode(raw["prompt"])
    batch = {"image": raw["image"], "text_ids": text_ids,
             "text_mask": text_mask}
    if "prompt_emb" in raw:
      batch["text_emb"] = raw["prompt_emb"]
    if self._max_exemplars is not None:
      slot_mask = raw["exemplar_mask"]
      ids, mask = self._encode(raw["exemplar_captions"])
      # Padded slots carry no text: all-False masks, zero ids.
      mask &= slot_mask[..., None]
      batch.update(exemplar_images=raw["exemplar_images"],
                   exemplar_text_ids=np.where(mask, ids, 0),
                   exemplar_text_mask=mask, exemplar_mask=slot_mask)
      if "exemplar_caption_embs" in raw:
        batch["exemplar_text_emb"] = raw["exemplar_caption_embs"]
    return batch


def make_input(data_cfg: DataConfig, *, image_size: int, text_len: int,
               max_exemplars: int | None, batch_size: int,
               tokenizer: Tokenizer, process_index: int | None = None,
               process_count: int | None = None, seed: int = 0,
               source: Callable[[], Iterable[Any]] | Iterable[Any] | None = None,
               num_epochs: int | None = None,
               text_dim: int | None = None) -> InputIterator | cached.CachedInput:
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
    text_dim: D of the records' T5 embeddings; required by (and only read
      with) `data_cfg.precomputed_embeddings`.

  Returns:
    The iterator; batches match `batch_spec(image_size, text_len,
    max_exemplars, batch_size, text_dim)`.
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
  embedding_shape = None
  if data_cfg.precomputed_embeddings:
    if data_cfg.kind == "synthetic" or text_dim is None:
      raise ValueError("data.precomputed_embeddings reads T5 embeddings from TFRecords: it "
                       f"needs a tfrecord data.kind (got {data_cfg.kind!r}) and text_dim")
    embedding_shape = (text_len, text_dim)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  mixed_seed = int(np.random.SeedSequence([data_cfg.seed, seed])
                   .generate_state(1)[0])
  common = dict(icl=icl, image_size=image_size, process_index=process_index,
                process_count=process_count, seed=mixed_seed,
                shuffle_buffer=data_cfg.shuffle_buffer)
  if data_cfg.kind == "synthetic":
    pipeline = sources.memory_pipeline(source, **common)
  else:
    pipeline = sources.tfrecord_pipeline(data_cfg.pattern, embedding_shape=embedding_shape,
                                         **common)
  identity = dict(kind=data_cfg.kind, seed=mixed_seed, batch_size=batch_size,
                  process_index=process_index, process_count=process_count)
  reader = cached.CachedInput if data_cfg.cache else InputIterator
  return reader(
      pipeline, tokenizer=tokenizer, text_len=text_len, batch_size=batch_size,
      max_exemplars=max_exemplars,
      skip_corrupt=data_cfg.corrupt_policy == "skip", num_epochs=num_epochs,
      identity=identity)
