"""Joins the outputs of one pipeline run split into parts (`build_icl_groups
--num_parts=N --part=i`) into the output of the whole run: the same `icl-*` shards,
byte for byte, its summary.json and its dead_letter.jsonl.

  python -m data_pipeline.merge_parts --input=out/part0 --input=out/part1 --output=out

Every part reads, clusters and writes prompts for every cluster, so the counts and
dead letters of those stages are the same in each part and are taken once; those of
rendering, filtering and writing are each part's own and add up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipeline import build_icl_groups
from data_pipeline import expert_render
from data_pipeline import score_filter
from data_pipeline import write
from suti_jax.data import records

# Stages after the split into parts: their counters and dead letters are per part.
PER_PART_STAGES = ("expert_render", "score_filter", "write")
PER_PART_DROPS = expert_render.DROP_REASONS + score_filter.DROP_REASONS
# Options that differ between the parts of one run.
_PART_OPTIONS = ("part", "output")


def _read_text(path: str) -> str:
  with FileSystems.open(path) as f:
    return f.read().decode("utf-8")


def _is_per_part(counter: str) -> bool:
  stage, _, what = counter.partition("/")
  return stage in PER_PART_STAGES or (stage == "drop" and what in PER_PART_DROPS)


def _split_counters(summary: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
  """A summary's counts back as counter names ('stage/what', 'drop/reason'):
  (those before the split into parts, those after it)."""
  flat = {f"{stage}/{what}": n for stage, counts in summary["stages"].items()
          for what, n in counts.items()}
  flat.update({f"drop/{reason}": n for reason, n in summary["drops"].items()})
  shared = {k: v for k, v in flat.items() if not _is_per_part(k)}
  return shared, {k: v for k, v in flat.items() if k not in shared}


def _shared_options(summary: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in summary["options"].items() if k not in _PART_OPTIONS}


def combine_summaries(summaries: Sequence[dict[str, Any]], output: str) -> dict[str, Any]:
  """The summary of the whole run from its parts' summaries.

  Args:
    summaries: the summary.json of every part, any order.
    output: the merged output folder (recorded in the options).

  Returns:
    A summary as `write.summarize` makes it: the counters before the split taken
    once, the later ones summed; options without `part`.

  Raises:
    ValueError: not exactly parts 0..N-1 of one run, parts run with other options,
      or parts whose shared counts differ (they read different inputs).
  """
  if not summaries:
    raise ValueError("no part summaries to merge")
  num_parts = summaries[0]["options"]["num_parts"]
  parts = sorted(s["options"]["part"] for s in summaries)
  if parts != list(range(num_parts)):
    raise ValueError(f"expected the summaries of parts 0..{num_parts - 1}, got parts {parts}")
  options = _shared_options(summaries[0])
  for s in summaries:
    differing = sorted(k for k in set(options) | set(_shared_options(s))
                       if s["options"].get(k) != options.get(k))
    if differing:
      raise ValueError(f"part {s['options']['part']} ran with other options than part "
                       f"{summaries[0]['options']['part']}: {differing}")
  split = [_split_counters(s) for s in summaries]
  shared = split[0][0]
  values = dict(shared)
  for s, (own_shared, per_part) in zip(summaries, split):
    if own_shared != shared:
      differing = sorted(k for k in set(shared) | set(own_shared)
                         if shared.get(k) != own_shared.get(k))
      raise ValueError(f"part {s['options']['part']}'s counts before rendering differ from "
                       f"the other parts' ({differing}): the parts read different inputs")
    for k, v in per_part.items():
      values[k] = values.get(k, 0) + v
  groups = sum(s["groups_written"] for s in summaries)
  return write.summarize(values, groups, dict(options, output=output))


def _combine_dead_letters(part_dirs: Sequence[str]) -> list[dict[str, Any]]:
  """Dead letters of the shared stages from part 0 (first), the rest from every part."""
  rows = []
  for i, folder in enumerate(part_dirs):
    text = _read_text(FileSystems.join(folder, write.DEAD_LETTER_NAME))
    for line in text.splitlines():
      row = json.loads(line)
      if i == 0 or row["stage"] in PER_PART_STAGES:
        rows.append(row)
  return rows


def _keyed_records(path: str) -> Iterable[tuple[str, bytes]]:
  # A full parse, not just the id: a damaged part record fails here, named.
  for source, raw in records.read_tfrecords([path]):
    yield records.parse_icl_group(raw, source=source).group_id, raw


def merge_parts(part_dirs: Sequence[str], output: str,
                beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Writes the whole run's output into `output` from its parts' output folders.

  Args:
    part_dirs: the output folder of every part (each with its summary.json).
    output: the merged output folder; not one of `part_dirs`.
    beam_args: Beam PipelineOptions flags (runner and its options).

  Returns:
    The merged summary (also written as `output`/summary.json).

  Raises:
    ValueError: see `combine_summaries`; `output` among the parts' folders.
    FileNotFoundError: a part without its summary.json.
  """
  if any(os.path.normpath(d) == os.path.normpath(output) for d in part_dirs):
    raise ValueError(f"--output {output!r} is one of the parts' folders; pick another")
  summaries = []
  for folder in part_dirs:
    path = FileSystems.join(folder, write.SUMMARY_NAME)
    if not FileSystems.exists(path):
      raise FileNotFoundError(f"{path} is missing: part folder {folder!r} holds no finished "
                              "pipeline run")
    summaries.append(json.loads(_read_text(path)))
  summary = combine_summaries(summaries, output)
  by_part = sorted(zip(summaries, part_dirs), key=lambda pair: pair[0]["options"]["part"])
  part_dirs = [folder for _, folder in by_part]
  patterns = [FileSystems.join(folder, f"{build_icl_groups.OUTPUT_PREFIX}-part"
                                       f"{s['options']['part']}-*") for s, folder in by_part]
  shards = sorted(m.path for found in FileSystems.match(patterns) for m in found.metadata_list)
  if not FileSystems.exists(output):
    FileSystems.mkdirs(output)
  p = beam.Pipeline(options=PipelineOptions(list(beam_args)))
  _ = (p
       | "Shards" >> beam.Create(shards)
       | "Read" >> beam.FlatMap(_keyed_records)
       | "Write" >> write.WriteSerializedGroups(
           FileSystems.join(output, build_icl_groups.OUTPUT_PREFIX),
           summary["options"]["num_shards"]))
  result = p.run()
  result.wait_until_finish()
  written = write.counters(result).get("write/groups", 0)
  if written != summary["groups_written"]:
    raise ValueError(f"the parts' shards hold {written} ICL groups, their summaries "
                     f"{summary['groups_written']}")
  write.write_sorted_jsonl(_combine_dead_letters(part_dirs),
                           FileSystems.join(output, write.DEAD_LETTER_NAME))
  write.write_summary(summary, output)
  return summary


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command line: `--input` (repeated, one per part), `--output` and Beam's flags."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--input", action="append", required=True,
                 help="A part's output folder (repeat for every part).")
  p.add_argument("--output", required=True, help="The merged output folder.")
  args, beam_args = p.parse_known_args(list(argv))
  return merge_parts(args.input, args.output, beam_args)


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1:]), indent=2, sort_keys=True))
