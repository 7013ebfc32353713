"""The apprenticeship-data pipeline CLI: web image-text pairs -> sharded ICL-group TFRecords.

  python -m data_pipeline.build_icl_groups --input=web/web.jsonl --output=out \\
      --renderer=oracle [--runner=DirectRunner --direct_num_workers=2 \\
      --direct_running_mode=multi_processing]

Flags not defined here are Beam PipelineOptions and pass through unchanged, so
`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`,
`--runner=FlinkRunner --flink_master=...` or `--runner=SparkRunner ...` need no code
change (input/output may be gs:// paths; workers need this package installed, e.g.
`--setup_file=./setup.py`). Outputs in --output: `icl-SSSSS-of-NNNNN` TFRecords of
`suti_jax.data.records.ICLGroup`, `dead_letter.jsonl` (invalid inputs, with reason
and id/url) and `summary.json` (counts per stage and per drop reason).
`--num_parts=N --part=i` renders only part i's share of the render batches (its
files are `icl-part<i>-SSSSS-of-NNNNN`): N runs split one run's expert renders
between them, render exactly its targets, and `data_pipeline.merge_parts` joins their
outputs into that run's output, byte for byte.
Stages:
read -> cluster by URL -> cluster filter -> recaption -> consolidate -> prompts ->
expert render -> fidelity filter -> write; each is a PTransform in its own module.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipeline import cluster
from data_pipeline import cluster_filter
from data_pipeline import consolidate
from data_pipeline import expert_render
from data_pipeline import prompt_writer
from data_pipeline import read
from data_pipeline import recaption
from data_pipeline import score_filter
from data_pipeline import write

OUTPUT_PREFIX = "icl"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits argv into this pipeline's flags and the Beam PipelineOptions flags."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, help="JSONL or CaptionExample TFRecord glob.")
  p.add_argument("--input_format", default="auto", choices=("auto",) + read.FORMATS)
  p.add_argument("--output", required=True, help="Output folder.")
  p.add_argument("--num_shards", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--url_path_depth", type=int, default=cluster.UrlRules.path_depth)
  p.add_argument("--keep_www", action="store_true")
  defaults = cluster_filter.ClusterFilterConfig()
  p.add_argument("--min_images", type=int, default=defaults.min_images)
  p.add_argument("--max_images", type=int, default=defaults.max_images)
  p.add_argument("--min_similarity", type=float, default=defaults.min_similarity)
  p.add_argument("--outlier_similarity", type=float, default=defaults.outlier_similarity)
  prompt_defaults = prompt_writer.PromptConfig()
  p.add_argument("--prompts_per_cluster", type=int, default=prompt_defaults.prompts_per_cluster)
  p.add_argument("--max_caption_similarity", type=float,
                 default=prompt_defaults.max_caption_similarity)
  p.add_argument("--renderer", default="oracle", choices=expert_render.RENDERERS)
  p.add_argument("--renderer_options", default="{}", help="JSON kwargs of the renderer.")
  p.add_argument("--render_batch_size", type=int, default=1,
                 help="Clusters rendered per call (the expert renderer trains them vmapped).")
  p.add_argument("--subject_scorer", default="embedding", help="'embedding' or 'judge:<path>'.")
  p.add_argument("--text_scorer", default="constant", help="'constant' or 'judge:<path>'.")
  score_defaults = score_filter.ScoreConfig()
  p.add_argument("--min_subject_score", type=float, default=score_defaults.min_subject_score)
  p.add_argument("--min_text_score", type=float, default=score_defaults.min_text_score)
  p.add_argument("--max_exemplars", type=int, default=score_defaults.max_exemplars)
  p.add_argument("--recaption_targets", action="store_true",
                 help="A target's prompt keeps only the modifiers the text scorer sees in it.")
  p.add_argument("--max_groups_per_subject", type=int,
                 default=score_defaults.max_groups_per_subject,
                 help="Keep a subject's N targets that best show their prompts (0: all).")
  p.add_argument("--num_parts", type=int, default=1,
                 help="Split the render batches into this many disjoint parts (every part "
                      "reads, clusters and writes prompts for all clusters).")
  p.add_argument("--part", type=int, default=0,
                 help="The part this run renders (0 <= part < num_parts): the parts' runs "
                      "together render the targets of one run.")
  return p.parse_known_args(list(argv))


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
  """Adds every stage to `p`, reading and writing the paths in `args`."""
  rules = cluster.UrlRules(args.url_path_depth, args.keep_www)
  filter_cfg = cluster_filter.ClusterFilterConfig(
      args.min_images, args.max_images, args.min_similarity, args.outlier_similarity)
  prompt_cfg = prompt_writer.PromptConfig(
      args.prompts_per_cluster, args.max_caption_similarity, seed=args.seed)
  score_cfg = score_filter.ScoreConfig(
      args.min_subject_score, args.min_text_score, args.max_exemplars,
      args.recaption_targets, args.max_groups_per_subject)
  # Built first: it checks the renderer and the part before anything is read.
  render = expert_render.RenderTargets(
      args.renderer, json.loads(args.renderer_options), args.seed, args.render_batch_size,
      args.part, args.num_parts)

  inputs = p | "Read" >> read.ReadWebPairs(args.input, args.input_format)
  clusters = (inputs.records
              | "Cluster" >> cluster.ClusterByUrl(rules)
              | "FilterClusters" >> cluster_filter.FilterClusters(
                  cluster_filter.ColourEmbedder(), filter_cfg)
              | "Recaption" >> recaption.Recaption()
              | "Consolidate" >> consolidate.Consolidate())
  if args.renderer == "same_cluster":
    tasks = prompt_writer.same_cluster_tasks(clusters)
  else:
    tasks = clusters | "Prompts" >> prompt_writer.WritePrompts(cfg=prompt_cfg)
  rendered = tasks | "RenderTargets" >> render
  groups = rendered.candidates | "ScoreFilter" >> score_filter.ScoreAndFilter(
      score_filter.make_scorer("subject", args.subject_scorer),
      score_filter.make_scorer("text", args.text_scorer), score_cfg)
  # A part's files carry its number, so the parts' outputs can be read (and
  # rewritten by name, as `embed_text` does) together.
  prefix = OUTPUT_PREFIX if args.num_parts == 1 else f"{OUTPUT_PREFIX}-part{args.part}"
  _ = groups | "WriteGroups" >> write.WriteIclGroups(
      FileSystems.join(args.output, prefix), args.num_shards)
  _ = ((inputs.dead_letter, rendered.dead_letter)
       | "DeadLetters" >> beam.Flatten()
       | "WriteDeadLetters" >> write.WriteSortedJsonl(
           FileSystems.join(args.output, write.DEAD_LETTER_NAME)))


def pipeline_args(**fields: Any) -> argparse.Namespace:
  """The pipeline's arguments for callers in Python: the flags' defaults, `fields` replaced.

  Args:
    **fields: flag names without dashes (input=, output=, renderer=, ...).

  Raises:
    ValueError: a field that is not one of the pipeline's flags.
  """
  args, _ = parse_args(["--input=", "--output="])
  unknown = sorted(set(fields) - set(vars(args)))
  if unknown:
    raise ValueError(f"unknown pipeline arguments {unknown}; known: {sorted(vars(args))}")
  for name, value in fields.items():
    setattr(args, name, value)
  return args


def run_pipeline(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the pipeline to completion and writes `summary.json`.

  Args:
    args: this pipeline's arguments (`parse_args` or `pipeline_args`).
    beam_args: Beam PipelineOptions flags (runner and its options).

  Returns:
    The summary (see `write.summarize`).
  """
  if not FileSystems.exists(args.output):
    FileSystems.mkdirs(args.output)
  p = beam.Pipeline(options=PipelineOptions(list(beam_args)))
  build(p, args)
  result = p.run()
  result.wait_until_finish()
  values = write.counters(result)
  summary = write.summarize(values, values.get("write/groups", 0), vars(args))
  write.write_summary(summary, args.output)
  return summary


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command line: this pipeline's flags and Beam's -> `run_pipeline`."""
  args, beam_args = parse_args(argv)
  return run_pipeline(args, beam_args)


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1:]), indent=2, sort_keys=True))
