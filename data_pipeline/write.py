"""Stage 9: write ICL groups as sharded TFRecords, the dead letters as JSONL, a summary.

Shards are chosen by a hash of the group id and sorted inside, so a re-run on the
same input writes byte-identical files on any runner.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
import tensorflow as tf

from data_pipeline import counters as counters_lib  # `counters` is the function below.
from suti_jax.data import records

SUMMARY_NAME = "summary.json"
DEAD_LETTER_NAME = "dead_letter.jsonl"


def shard_paths(path_prefix: str, num_shards: int) -> list[str]:
  """The shard files, named like `records.write_tfrecords` names them."""
  return [f"{path_prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def _write_shard(element, paths: list[str]) -> int:
  shard, grouped = element
  serialized = sorted(grouped["records"])  # Sorted by group id (the keys).
  with tf.io.TFRecordWriter(paths[shard]) as writer:
    for _, record in serialized:
      # `serialize_icl_group` encodes deterministically, so re-runs are
      # byte-identical on any worker.
      writer.write(record)
  counters_lib.count("write/groups", len(serialized))
  return len(serialized)


class WriteSerializedGroups(beam.PTransform):
  """PCollection[(group id, serialised ICLGroup)] -> `{prefix}-SSSSS-of-NNNNN` TFRecords.

  A group's shard is a hash of its id and each shard is sorted by id, so the
  same groups give the same files whichever runs or parts they come from.
  Outputs the record count of each shard.
  """

  def __init__(self, path_prefix: str, num_shards: int):
    super().__init__()
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    self._paths = shard_paths(path_prefix, num_shards)

  def expand(self, keyed_records):
    n = len(self._paths)
    keyed = keyed_records | "ByShard" >> beam.Map(
        lambda kv: (zlib.crc32(kv[0].encode("utf-8")) % n, kv))
    # Every shard gets a key, so empty shards are still written.
    shards = keyed_records.pipeline | "Shards" >> beam.Create([(i, None) for i in range(n)])
    return ({"records": keyed, "shards": shards}
            | "Join" >> beam.CoGroupByKey()
            | "Write" >> beam.Map(_write_shard, self._paths))


class WriteIclGroups(beam.PTransform):
  """PCollection[ICLGroup] -> `{prefix}-SSSSS-of-NNNNN` TFRecords; outputs record counts."""

  def __init__(self, path_prefix: str, num_shards: int):
    super().__init__()
    self._write = WriteSerializedGroups(path_prefix, num_shards)

  def expand(self, groups):
    return (groups
            | "Serialize" >> beam.Map(lambda g: (g.group_id, records.serialize_icl_group(g)))
            | "Shard" >> self._write)


def write_sorted_jsonl(rows: list[dict[str, Any]], path: str) -> int:
  """Writes `rows` to `path` as JSON lines (keys sorted), in sorted order; returns the count."""
  lines = sorted(json.dumps(r, sort_keys=True) for r in rows)
  with FileSystems.create(path) as f:
    f.write("".join(line + "\n" for line in lines).encode("utf-8"))
  return len(lines)


class WriteSortedJsonl(beam.PTransform):
  """PCollection[dict] -> one JSONL file with sorted lines (for small outputs)."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, rows):
    return (rows | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(write_sorted_jsonl, self._path))


def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
  """The pipeline's counters by name (committed values where the runner has them)."""
  found = result.metrics().query(MetricsFilter().with_namespace(counters_lib.NAMESPACE))
  out: dict[str, int] = {}
  for c in found["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
  return out


def summarize(values: dict[str, int], groups_written: int, options: dict[str, Any]
              ) -> dict[str, Any]:
  """The JSON summary: counts per stage, per drop reason, and the options used.

  Args:
    values: `counters(result)`.
    groups_written: ICL groups in the output shards.
    options: the pipeline's own flags.

  Returns:
    {'stages': {stage: {what: n}}, 'drops': {reason: n}, 'groups_written': n,
     'options': {...}}; dead letters are among the drops (their reasons).
  """
  stages: dict[str, dict[str, int]] = {}
  drops = {}
  for name, value in sorted(values.items()):
    stage, _, what = name.partition("/")
    if stage == "drop":
      drops[what] = value
    else:
      stages.setdefault(stage, {})[what] = value
  return {"stages": stages, "drops": drops, "groups_written": groups_written,
          "options": options}


def write_summary(summary: dict[str, Any], output: str) -> str:
  """Writes `summary` as `output`/summary.json (indented, keys sorted); returns its path."""
  path = FileSystems.join(output, SUMMARY_NAME)
  with FileSystems.create(path) as f:
    f.write(json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"))
  return path
