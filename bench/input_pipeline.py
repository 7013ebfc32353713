"""Can the input side keep up with training? tf.data ICL read rate and Beam
pipeline rate (ICL groups/s) against the tiny SuTI train step's examples/s.

  python -m bench.input_pipeline [--smoke]
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from typing import Any

from bench import common

common.configure_host(num_devices=1)

from bench import suti_step  # noqa: E402  (after configure_host on purpose)
from configs import suti_base64  # noqa: E402
from data_pipeline import build_icl_groups  # noqa: E402
from data_pipeline import read  # noqa: E402
from suti_jax import config as config_lib  # noqa: E402
from suti_jax.data import input as input_lib  # noqa: E402
from suti_jax.data import synthetic  # noqa: E402
from suti_jax.models.text import tokenizers  # noqa: E402

NAME = "input_pipeline"
QUESTION = ("Do the tf.data ICL reader and the Beam apprenticeship pipeline (DirectRunner) "
            "produce ICL groups faster than the tiny SuTI train step consumes examples?")


def beam_rate(work_dir: str, num_clusters: int, image_size: int, renderer: str) -> dict[str, Any]:
  """Runs the Beam pipeline on a synthetic web set; ICL groups written per second.

  The wall time includes DirectRunner start-up, as a real run's would.
  """
  pairs = synthetic.generate_web_pairs(num_clusters, seed=0, size_px=image_size)
  jsonl = read.write_jsonl_input(pairs, os.path.join(work_dir, "web"))
  out = os.path.join(work_dir, "icl")
  wall0, cpu0 = time.perf_counter(), time.process_time()
  summary = build_icl_groups.run([f"--input={jsonl}", f"--output={out}", f"--renderer={renderer}",
                                  "--num_shards=2", "--runner=DirectRunner"])
  wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  groups = int(summary["groups_written"])
  return {"web_pairs": len(pairs), "groups": groups, "wall_s": wall, "cpu_wall_ratio": cpu / wall,
          "groups_per_s": groups / wall, "pattern": os.path.join(out, "icl-*"),
          "renderer": renderer}


def tfdata_rate(pattern: str, config, batches: int) -> dict[str, Any]:
  """Reads ICL-group batches with the training reader; groups (examples) per second."""
  model_cfg = config_lib.section(config_lib.UNetConfig, config.model)
  text = config_lib.section(config_lib.TextEncoderConfig, config.text)
  data = config_lib.section(config_lib.DataConfig, dict(config.data, pattern=pattern,
                                                        kind="icl_tfrecord"))
  batch_size = int(config.train.batch_size)
  reader = input_lib.make_input(
      data, image_size=model_cfg.image_size, text_len=text.max_length,
      max_exemplars=model_cfg.exemplar.max_exemplars, batch_size=batch_size,
      tokenizer=tokenizers.build_tokenizer(text), process_index=0, process_count=1)
  timing = common.time_calls(lambda: next(reader), warmup=2, calls=batches)
  return {"batch_size": batch_size, "timing": timing.as_dict(),
          "groups_per_s": batch_size / timing.median_s}


def step_rate(config, warmup: int, steps: int) -> dict[str, Any]:
  """Examples/s of the compiled SuTI train step on a random batch."""
  step = suti_step.CompiledStep(config)
  timing = common.time_calls(step, warmup, steps)
  return {"batch_size": int(config.train.batch_size), "timing": timing.as_dict(),
          "examples_per_s": config.train.batch_size / timing.median_s}


def suti_config(smoke: bool):
  """`suti_base64:tiny`, shrunk to the test suite's micro UNet for --smoke."""
  c = suti_base64.get_config("tiny")
  if smoke:
    c.model.update(base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1),
                   attention_resolutions=(8,))
    c.model.exemplar.max_exemplars = 2
    c.text.update(num_layers=1, max_length=8)
    c.train.batch_size = 2
  c.mesh.update(ici_data=-1, ici_fsdp=1)
  return c


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(QUESTION)
  p.add_argument("--renderer", default="oracle", choices=("oracle", "same_cluster"))
  args = p.parse_args(argv)
  config = suti_config(args.smoke)
  size = int(config.model.image_size)
  with tempfile.TemporaryDirectory() as tmp:
    beam = beam_rate(tmp, 6 if args.smoke else 48, size, args.renderer)
    if not glob.glob(beam["pattern"]) or beam["groups"] == 0:
      raise RuntimeError(f"the Beam pipeline wrote no ICL groups under {beam['pattern']}")
    tfdata = tfdata_rate(beam["pattern"], config, 2 if args.smoke else 50)
  step = step_rate(config, *((1, 2) if args.smoke else (3, 20)))
  consume = step["examples_per_s"]
  table = common.Table(
      f"suti_base64:tiny{' (micro)' if args.smoke else ''}, {size}px, "
      f"K={config.model.exemplar.max_exemplars}, batch {config.train.batch_size}; one run",
      ["stage", "rate (groups or examples /s)", "ratio to train step", "CPU/wall", "detail"])
  table.rows += [
      ["train step (consumes)", consume, 1.0, step["timing"]["cpu_wall_ratio"],
       f"median of {step['timing']['calls']} steps"],
      ["tf.data ICL reader", tfdata["groups_per_s"], tfdata["groups_per_s"] / consume,
       tfdata["timing"]["cpu_wall_ratio"], f"median of {tfdata['timing']['calls']} batches"],
      [f"Beam pipeline ({beam['renderer']})", beam["groups_per_s"], beam["groups_per_s"] / consume,
       beam["cpu_wall_ratio"], f"{beam['groups']} groups from {beam['web_pairs']} web pairs "
       f"in {beam['wall_s']:.1f} s"],
  ]
  results = {"train_step": step, "tfdata": tfdata, "beam": beam,
             "tfdata_over_step": tfdata["groups_per_s"] / consume,
             "beam_over_step": beam["groups_per_s"] / consume}
  notes = ["Ratios above 1 mean the producer outruns the consumer on the same cores; the Beam "
           "rate includes DirectRunner start-up and is an offline, once-per-dataset cost.",
           "The tf.data rate includes PNG decoding and tokenisation; the train step reads a "
           "device-resident random batch, so the ratio isolates the reader."]
  return common.write_report(NAME, QUESTION, [table], results, smoke=args.smoke,
                             out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main(sys.argv[1:])
