"""Stage 4: recaption every image of a kept cluster (SuTI: PaLI).

The captioner is pluggable; the default keeps the web caption.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from data_pipeline import counters
from suti_jax.data import images
from suti_jax.data.pipeline_interfaces import Captioner, Cluster


class KeepCaption(Captioner):
  """The default captioner: returns the source caption unchanged."""

  needs_image = False

  def caption(self, image, source_caption: str) -> str:
    return source_caption


class _RecaptionFn(beam.DoFn):

  def __init__(self, captioner: Captioner):
    self._captioner = captioner

  def setup(self):
    self._captioner.setup()

  def process(self, cluster: Cluster):
    members = []
    for m in cluster.members:
      image = images.decode_array(m.image) if self._captioner.needs_image else None
      caption = self._captioner.caption(image, m.caption)
      if caption != m.caption:
        counters.count("recaption/changed")
      members.append(dataclasses.replace(m, caption=caption))
    yield dataclasses.replace(cluster, members=tuple(members))


class Recaption(beam.PTransform):
  """PCollection[Cluster] -> the same clusters with new captions."""

  def __init__(self, captioner: Captioner = KeepCaption()):
    super().__init__()
    self._captioner = captioner

  def expand(self, clusters):
    return clusters | "Recaption" >> beam.ParDo(_RecaptionFn(self._captioner))
