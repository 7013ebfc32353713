"""Beam-side bookkeeping shared by the stages: drop counters, the dead-letter
output and per-element seeds that are the same on every worker and run.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam

# Beam metrics namespace of every counter; the JSON summary reads it back.
NAMESPACE = "suti_pipeline"
# Tag of the dead-letter output of the stages that can receive invalid input.
DEAD_LETTER = "dead_letter"


def count(name: str, n: int = 1) -> None:
  """Increments the pipeline counter `name` ('<stage>/<what>' or 'drop/<reason>')."""
  beam.metrics.Metrics.counter(NAMESPACE, name).inc(n)


def dead_letter(stage: str, reason: str, example_id: str, url: str, detail: str = ""
                ) -> beam.pvalue.TaggedOutput:
  """A dead-letter element (counted as drop/<reason>) for the JSONL side output."""
  count(f"drop/{reason}")
  return beam.pvalue.TaggedOutput(DEAD_LETTER, {
      "stage": stage, "reason": reason, "id": example_id, "url": url, "detail": detail})


def stable_seed(*parts: object) -> int:
  """A 63-bit seed from strings/ints, the same on every worker and run."""
  digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") >> 1
