"""Stage 3: keep clusters that show one subject (SuTI: CLIP-similarity filter).

Removes outlier images, then keeps clusters within size bounds whose mean pairwise
image-embedding similarity reaches a threshold. Owns the default embedder.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np

from data_pipeline import counters
from suti_jax.data import images
from suti_jax.data.pipeline_interfaces import Cluster, ImageEmbedder


class ColourEmbedder(ImageEmbedder):
  """The default embedder: deterministic, cheap, no weights.

  A foreground pixel differs (L1 > `fg_threshold`) from both border pixels of its
  row, which removes the banded backgrounds of product shots. The embedding is the
  square-rooted, normalised histogram of foreground colours (`bins`^3 RGB bins;
  invariant to position, scale and view) concatenated with a mean-centred 4x4
  thumbnail weighted by `thumb_weight` (coarse layout), then L2-normalised.
  """

  def __init__(self, bins: int = 4, fg_threshold: float = 60.0, thumb_weight: float = 0.25):
    self.bins = bins
    self.fg_threshold = fg_threshold
    self.thumb_weight = thumb_weight

  def embed(self, images_u8: np.ndarray) -> np.ndarray:
    x = np.asarray(images_u8, np.float32)
    n, h, w, _ = x.shape
    edges = np.concatenate([x[:, :, :1], x[:, :, -1:]], axis=2)
    dist = np.abs(x[:, :, :, None, :] - edges[:, :, None, :, :]).sum(-1).min(-1)
    fg = (dist > self.fg_threshold).astype(np.float64)
    q = np.minimum((x * self.bins / 256.0).astype(np.int64), self.bins - 1)
    idx = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
    hist = np.stack([np.bincount(idx[i].ravel(), fg[i].ravel(), self.bins ** 3)
                     for i in range(n)])
    hist = np.sqrt(hist / np.maximum(hist.sum(1, keepdims=True), 1.0))
    rows, cols = np.array_split(np.arange(h), 4), np.array_split(np.arange(w), 4)
    thumb = np.stack([x[:, r][:, :, c].mean((1, 2)) for r in rows for c in cols], 1)
    thumb = thumb.reshape(n, -1) / 255.0
    thumb -= thumb.mean(1, keepdims=True)
    thumb /= np.maximum(np.linalg.norm(thumb, axis=1, keepdims=True), 1e-6)
    v = np.concatenate([hist, self.thumb_weight * thumb], 1)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ClusterFilterConfig:
  """Bounds of the cluster filter (flags of the same names).

  Attributes:
    min_images: fewest images a kept cluster has (after outlier removal).
    max_images: most images a cluster may have (larger ones are index pages).
    min_similarity: least mean pairwise embedding similarity of a kept cluster.
    outlier_similarity: an image whose similarity to the mean of the others is
      below this is removed (worst first, one at a time).
  """

  min_images: int = 3
  max_images: int = 64
  min_similarity: float = 0.55
  outlier_similarity: float = 0.45


def decode_members(cluster: Cluster) -> np.ndarray:
  """uint8 [N, S, S, 3] of a cluster's images; S = the first image's shorter side.

  Web images differ in size; embedders need one, so images of another shape are
  centre-cropped and resized (`images.preprocess_array`).
  """
  decoded = [images.decode_array(m.image) for m in cluster.members]
  side = min(decoded[0].shape[:2])
  return np.stack([
      x if x.shape[:2] == (side, side) else
      ((images.preprocess_array(x, side) + 1.0) * 127.5).round().astype(np.uint8)
      for x in decoded])


def _mean_pairwise(emb: np.ndarray) -> float:
  n = len(emb)
  sim = emb @ emb.T
  return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def filter_cluster(cluster: Cluster, emb: np.ndarray, cfg: ClusterFilterConfig
                   ) -> tuple[Cluster | None, int, str]:
  """Applies the filter to one cluster.

  Args:
    cluster: the cluster.
    emb: [N, D] unit embeddings of its members, in order.
    cfg: the bounds.

  Returns:
    (kept cluster or None, number of outlier images removed, drop reason or '').
  """
  n = len(cluster.members)
  if n < cfg.min_images:
    return None, 0, "cluster_too_small"
  if n > cfg.max_images:
    return None, 0, "cluster_too_large"
  keep = list(range(n))
  while len(keep) > cfg.min_images:
    total = emb[keep].sum(0)
    loo = [float(emb[i] @ (total - emb[i])) / max(np.linalg.norm(total - emb[i]), 1e-6)
           for i in keep]
    worst = int(np.argmin(loo))
    if loo[worst] >= cfg.outlier_similarity:
      break
    keep.pop(worst)
  removed = n - len(keep)
  if _mean_pairwise(emb[keep]) < cfg.min_similarity:
    return None, removed, "cluster_low_similarity"
  return dataclasses.replace(cluster, members=tuple(cluster.members[i] for i in keep)), removed, ""


class _FilterFn(beam.DoFn):

  def __init__(self, embedder: ImageEmbedder, cfg: ClusterFilterConfig):
    self._embedder = embedder
    self._cfg = cfg

  def setup(self):
    self._embedder.setup()

  def process(self, cluster: Cluster):
    emb = self._embedder.embed(decode_members(cluster))
    kept, removed, reason = filter_cluster(cluster, emb, self._cfg)
    if removed:
      counters.count("drop/image_outlier", removed)
    if kept is None:
      counters.count(f"drop/{reason}")
      return
    counters.count("cluster_filter/clusters")
    yield kept


class FilterClusters(beam.PTransform):
  """PCollection[Cluster] -> the clusters that pass, outliers removed."""

  def __init__(self, embedder: ImageEmbedder, cfg: ClusterFilterConfig = ClusterFilterConfig()):
    super().__init__()
    self._embedder = embedder
    self._cfg = cfg

  def expand(self, clusters):
    return clusters | "Filter" >> beam.ParDo(_FilterFn(self._embedder, self._cfg))
