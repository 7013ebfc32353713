"""Metric writing (clu: TensorBoard + `metrics.jsonl`, process 0 only), step
throughput / TFLOP/s / MFU from the compiled step, and PNG sample grids.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from PIL import Image

# Dense bf16 peak FLOP/s per device, by `device_kind` substring (lower case).
# Longer names first: 'tpu v5 lite' must win over 'tpu v5'.
PEAK_FLOPS_PER_DEVICE = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("h100", 989e12),
)


def peak_flops_per_device(device_kind: str, fallback: float = 0.0) -> float:
  """Peak FLOP/s of one device of `device_kind`, else `fallback` (0 = unknown)."""
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS_PER_DEVICE:
    if name in kind:
      return flops
  return fallback


def compiled_flops(compiled: Any) -> float:
  """FLOPs per device of one call of a compiled (SPMD-partitioned) program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def train_step_flops(compiled: Any, grad_accum_steps: int) -> float:
  """FLOPs per device of one compiled train step with `grad_accum_steps` microbatches.

  XLA's cost analysis counts a loop body once, however many times it runs, so a
  step that scans over N microbatches reports about 1/N of its work. The
  forward and backward passes are all inside that loop; what runs once (the
  optimizer and EMA updates, tens of FLOPs per parameter) is scaled by N too,
  an overcount below 0.1% for any UNet on its training batch.
  """
  return compiled_flops(compiled) * max(1, grad_accum_steps)


def memory_summary(compiled: Any) -> dict[str, int]:
  """Per-device bytes of the compiled program's arguments, outputs and temps."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {name: int(getattr(stats, f"{name}_size_in_bytes", 0))
          for name in ("argument", "output", "alias", "temp", "generated_code")}


class Throughput:
  """perf/* metrics between two log steps, from host wall-clock time.

  The host only blocks at log steps, so time / steps between two log steps is
  the true device step time even though single steps are dispatched async.
  """

  def __init__(self, global_batch: int, flops_per_device: float, peak_flops: float):
    self._global_batch = global_batch
    self._flops = flops_per_device
    self._peak = peak_flops
    self._last = None

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def measure(self, step: int) -> dict[str, float]:
    """perf/* scalars for the steps since the last call; resets the window."""
    if self._last is None:
      self.start(step)
      return {}
    last_step, last_time = self._last
    now = time.perf_counter()
    self._last = (step, now)
    if step <= last_step:
      return {}
    step_s = (now - last_time) / (step - last_step)
    out = {"perf/step_s": step_s, "perf/examples_per_s": self._global_batch / step_s}
    if self._flops:
      out["perf/tflops_per_device"] = self._flops / step_s / 1e12
      if self._peak:
        out["perf/mfu"] = self._flops / step_s / self._peak
    return out


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON line per write_scalars call: {"step": s, "name": value, ...}."""

  def __init__(self, path: str):
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._file.write(json.dumps({"hparams": dict(hparams)}, default=str) + "\n")

  # Images, texts and histograms live in TensorBoard; the JSONL log is scalars.
  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + log + `<workdir>/metrics.jsonl` on process 0; log-only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  os.makedirs(workdir, exist_ok=True)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def image_grid(images: np.ndarray, columns: int = 0) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, columns*W, C] grid."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  pixels = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(pixels):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def save_png(grid: np.ndarray, path: str) -> None:
  """Writes a uint8 [H, W, 3] array as PNG."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid).save(path)
