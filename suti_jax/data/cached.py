"""In-memory input for data sets that fit in host RAM (`data.cache=True`).

The source is read, validated, decoded and tokenised once; each epoch is then a
seeded permutation and exemplar choice in numpy. A small data set under the
tf.data path rebuilds its epoch pipeline every few batches, which costs as much
as a tiny model's train step; here a batch is an index gather.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from suti_jax.data import records
from suti_jax.data import sources

STATE_VERSION = 1


def _materialise(pipeline: sources.Pipeline, skip_corrupt: bool
                 ) -> tuple[list[dict[str, np.ndarray]], int]:
  """This process's processed elements (in epoch-0 order) and the records dropped."""
  ds = pipeline.raw_epoch(0).enumerate().map(
      lambda index, raw: dict(pipeline.process(raw), index=index))
  if skip_corrupt:
    ds = ds.ignore_errors()
  elements, consumed = [], 0
  try:
    for element in ds.as_numpy_iterator():
      elements.append(element)
      consumed = int(element["index"]) + 1
  except tf.errors.OpError as error:
    if pipeline.explain is not None:
      for raw in pipeline.raw_epoch(0).skip(consumed).as_numpy_iterator():
        pipeline.explain(raw)
    raise records.RecordError(f"element {consumed} of the cached input", "<unknown>",
                              f"tf.data failed: {error.message}") from error
  total = sum(1 for _ in pipeline.raw_epoch(0)) if skip_corrupt else len(elements)
  return elements, total - len(elements)


class CachedInput:
  """Batches from host memory; the same interface and JSON state as InputIterator.

  Epoch e visits every element once in the order
  `default_rng([seed, e]).permutation(n)`; the last partial batch is dropped.
  An ICL element's exemplars are a random subset (1..K_max) in random order,
  drawn from `default_rng([seed, e, position])`.
  """

  def __init__(self, pipeline: sources.Pipeline, *, tokenizer: Any, text_len: int,
               batch_size: int, max_exemplars: int | None, skip_corrupt: bool,
               num_epochs: int | None, identity: dict[str, Any]):
    elements, self._num_skipped = _materialise(pipeline, skip_corrupt and
                                               pipeline.explain is not None)
    if self._num_skipped:
      logging.warning("corrupt_policy='skip': skipped %d records while caching the input",
                      self._num_skipped)
    self._damaged = pipeline.damaged
    if len(elements) < batch_size:
      raise ValueError(f"the cached input of process {identity['process_index']} holds "
                       f"{len(elements)} examples, fewer than one batch of {batch_size}")
    self._batch_size = batch_size
    self._max_exemplars = max_exemplars
    self._num_epochs = num_epochs
    self._identity = dict(identity, cache=True)
    self._seed = identity["seed"]
    self._epoch = self._position = 0
    self._order_epoch, self._order_cache = -1, np.zeros(0, np.int64)
    self._images = np.stack([e["image"] for e in elements])
    self._text_ids, self._text_mask = _encode(tokenizer, [e["prompt"] for e in elements],
                                              text_len)
    # Precomputed T5 embeddings, when the source reads them (sources.Pipeline).
    self._text_emb = (np.stack([e["prompt_emb"] for e in elements])
                      if "prompt_emb" in elements[0] else None)
    if max_exemplars is not None:
      self._exemplars = self._pack_exemplars(elements, tokenizer, text_len)

  @staticmethod
  def _pack_exemplars(elements: list[dict[str, np.ndarray]], tokenizer: Any,
                      text_len: int) -> dict[str, np.ndarray]:
    """Every element's exemplars (all of them, up to the largest group), padded."""
    counts = np.array([len(e["exemplar_captions"]) for e in elements])
    n, k = len(elements), int(counts.max())
    packed = {"images": np.zeros((n, k) + elements[0]["exemplar_images"].shape[1:], np.float32)}
    if "exemplar_caption_embs" in elements[0]:
      packed["embs"] = np.zeros((n, k) + elements[0]["exemplar_caption_embs"].shape[1:],
                                np.float32)
    sources = {"images": "exemplar_images", "embs": "exemplar_caption_embs"}
    captions = [""] * (n * k)
    for i, e in enumerate(elements):
      for name, array in packed.items():
        array[i, :counts[i]] = e[sources[name]]
      captions[i * k:i * k + counts[i]] = list(e["exemplar_captions"])
    ids, mask = _encode(tokenizer, captions, text_len)
    return {"counts": counts, "ids": ids.reshape(n, k, text_len),
            "mask": mask.reshape(n, k, text_len), **packed}

  @property
  def num_skipped(self) -> int:
    """Records dropped while reading the source (corrupt_policy='skip')."""
    return self._num_skipped

  def stats(self) -> dict[str, float]:
    """The input's metrics, as `InputIterator.stats`: records dropped, damaged files."""
    return {"data/skipped_records": float(self._num_skipped),
            "data/damaged_files": float(len(self._damaged) if self._damaged is not None else 0)}

  @property
  def epoch(self) -> int:
    return self._epoch

  def get_state(self) -> dict[str, Any]:
    return dict(self._identity, version=STATE_VERSION, epoch=self._epoch,
                position=self._position, num_skipped=self._num_skipped)

  def set_state(self, state: dict[str, Any]) -> None:
    expected = dict(self._identity, version=STATE_VERSION)
    mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if mismatched:
      raise ValueError(f"input state does not fit this input (saved, now): {mismatched}")
    self._epoch, self._position = int(state["epoch"]), int(state["position"])

  def __iter__(self) -> CachedInput:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    n = len(self._images)
    if self._position + self._batch_size > n:
      self._epoch, self._position = self._epoch + 1, 0
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    order = self._order()
    positions = range(self._position, self._position + self._batch_size)
    rows = order[positions.start:positions.stop]
    self._position = positions.stop
    batch = {"image": self._images[rows], "text_ids": self._text_ids[rows],
             "text_mask": self._text_mask[rows]}
    if self._text_emb is not None:
      batch["text_emb"] = self._text_emb[rows]
    if self._max_exemplars is not None:
      batch.update(self._choose_exemplars(rows, positions))
    return batch

  def _order(self) -> np.ndarray:
    """This epoch's permutation, drawn once per epoch rather than once per batch."""
    if self._order_epoch != self._epoch:
      self._order_cache = np.random.default_rng([self._seed, self._epoch]).permutation(
          len(self._images))
      self._order_epoch = self._epoch
    return self._order_cache

  def _choose_exemplars(self, rows: np.ndarray, positions: range) -> dict[str, np.ndarray]:
    ex, k_max = self._exemplars, self._max_exemplars
    slots = np.zeros((len(rows), k_max), np.int64)
    slot_mask = np.zeros((len(rows), k_max), bool)
    for i, (row, position) in enumerate(zip(rows, positions)):
      rng = np.random.default_rng([self._seed, self._epoch, position])
      present = int(ex["counts"][row])
      count = int(rng.integers(1, min(present, k_max) + 1))
      slots[i, :count] = rng.permutation(present)[:count]
      slot_mask[i, :count] = True
    gather = lambda a: a[rows[:, None], slots]  # noqa: E731
    mask = gather(ex["mask"]) & slot_mask[..., None]
    out = {"exemplar_images": np.where(slot_mask[..., None, None, None],
                                       gather(ex["images"]), 0.0).astype(np.float32),
           "exemplar_text_ids": np.where(mask, gather(ex["ids"]), 0).astype(np.int32),
           "exemplar_text_mask": mask, "exemplar_mask": slot_mask}
    if "embs" in ex:
      out["exemplar_text_emb"] = np.where(slot_mask[..., None, None], gather(ex["embs"]),
                                          0.0).astype(np.float32)
    return out


def _encode(tokenizer: Any, texts: list[Any], text_len: int) -> tuple[np.ndarray, np.ndarray]:
  strings = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
  ids, mask = tokenizer.encode(strings, text_len)
  return np.asarray(ids, np.int32), np.asarray(mask, bool)
