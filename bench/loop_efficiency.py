"""Does the training loop keep the compiled step busy, and how fast does SuTI sample?

Side by side in one run: (1) examples/s of `launch.train`'s loop (`train.loop.run`:
input, host->device, metrics, checkpoints) against the compiled step alone at the
same config, for the demo's tiny base and SuTI stages with `data.cache` on and off;
(2) images/s of batched SuTI personalisation (one subject, all prompts in one call)
at 16 and 64 px.

  python -m bench.loop_efficiency [--smoke]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from bench import common

common.configure_host(num_devices=1)

import jax  # noqa: E402  (after configure_host on purpose)
import numpy as np  # noqa: E402

from bench import suti_step  # noqa: E402
from configs import imagen_base64  # noqa: E402
from configs import suti_base64  # noqa: E402
from suti_jax.data import records  # noqa: E402
from suti_jax.inference import Pipeline, random_stage  # noqa: E402
from suti_jax.train import experiment as experiment_lib  # noqa: E402
from suti_jax.train import loop  # noqa: E402

NAME = "loop_efficiency"
QUESTION = ("What share of the compiled step's examples/s does the training loop deliver "
            "(tiny base and SuTI, in-memory cache on and off), and how many images/s does "
            "batched SuTI personalisation draw at 16 and 64 px?")
# The loop runs this many epochs and logs once per epoch: every rate it reports
# spans one whole epoch, the move into the next one included.
EPOCHS = 4


def _config(stage: str, smoke: bool, cache: bool, num_examples: int):
  """The tiny stage config, logging once per epoch of `num_examples` for EPOCHS epochs."""
  parent = suti_base64 if stage == "suti" else imagen_base64
  c = parent.get_config("tiny")
  batch = 4 if smoke else (16 if stage == "suti" else 32)
  epoch = num_examples // batch
  c.train.update(batch_size=batch, total_steps=EPOCHS * epoch, checkpoint_every_steps=EPOCHS * epoch,
                 log_every_steps=epoch)
  c.data.update(cache=cache, shuffle_buffer=256)
  c.mesh.update(ici_data=-1, ici_fsdp=1)
  return c


def _source(stage: str, num: int, size: int) -> list[Any]:
  """Random images and captions (an ICL group per example for SuTI), like the demo's sets."""
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (size, size, 3), np.uint8)  # noqa: E731
  if stage != "suti":
    return [(image(), f"a red and blue toy number {i}") for i in range(num)]
  return [{"target_image": image(), "target_prompt": f"the toy on a beach {i}",
           "exemplar_images": [image() for _ in range(3)],
           "exemplar_captions": [f"a toy {i} {j}" for j in range(3)]} for i in range(num)]


def _write_records(source: list[Any], prefix: str) -> None:
  """`source` as the pipeline's TFRecord shards (caption examples or ICL groups)."""
  png = records.encode_png
  if isinstance(source[0], tuple):
    serialized = [records.serialize_caption_example(records.CaptionExample(png(im), text))
                  for im, text in source]
  else:
    serialized = [records.serialize_icl_group(records.ICLGroup(
        group_id=str(i), subject_id=str(i), skill="recontextualization",
        exemplar_images=[png(im) for im in g["exemplar_images"]],
        exemplar_captions=g["exemplar_captions"], target_image=png(g["target_image"]),
        target_prompt=g["target_prompt"], score_subject=1.0, score_text=1.0, source_urls=[],
        expert="", pipeline="bench")) for i, g in enumerate(source)]
  records.write_tfrecords(prefix, serialized, num_shards=2)


def loop_examples_per_s(config, source: list[Any]) -> float:
  """Examples/s of `loop.run` between its first and last log step (compile excluded),
  reading `source` from TFRecord shards as a real run does."""
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "records")
    _write_records(source, prefix)
    config.data.kind = "icl_tfrecord" if isinstance(source[0], dict) else "caption_tfrecord"
    config.data.pattern = prefix + "-*"
    workdir = os.path.join(tmp, "run")
    loop.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
  rates = [r["perf/examples_per_s"] for r in rows if "perf/examples_per_s" in r][1:]
  return float(np.median(rates)) if rates else float("nan")


def sampling_images_per_s(size: int, prompts: int, steps: int, calls: int) -> dict[str, Any]:
  """Batched personalisation of one subject: `prompts` images per call."""
  c = suti_base64.get_config("tiny")
  # Attention (self and exemplar) on the lower of the tiny UNet's two levels.
  c.model.update(image_size=size, attention_resolutions=(size // 2,))
  c.model.exemplar.attention_resolutions = (size // 2,)
  stage = random_stage(experiment_lib.sections(c), jax.random.PRNGKey(0))
  pipeline = Pipeline([stage])
  rng = np.random.default_rng(0)
  exemplars = [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(3)]
  texts = [f"the toy on a beach {i}" for i in range(prompts)]
  run = lambda: pipeline.personalize(exemplars, ["a toy"] * 3, texts, 1,  # noqa: E731
                                     jax.random.PRNGKey(1), num_steps=steps)
  timing = common.time_calls(run, 1, calls)
  return {"size": size, "prompts": prompts, "steps": steps, "timing": timing,
          "images_per_s": prompts / timing.median_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = common.base_parser(QUESTION).parse_args(argv)
  num_examples = 8 if args.smoke else 1024
  loop_table = common.Table(
      "Training loop vs compiled step (examples/s, same config, same run)",
      ["stage", "batch", "data.cache", "compiled step ex/s", "loop ex/s", "loop / step"])
  results: dict[str, Any] = {"loop": []}
  for stage in ("base", "suti"):
    for cache in (True, False):
      config = _config(stage, args.smoke, cache, num_examples)
      size = config.model.image_size
      step = suti_step.CompiledStep(config)
      # The step alone is timed just before and just after the loop, so a change
      # of the machine's load during the pair shows in both.
      before = common.time_calls(step, 2, 4 if args.smoke else 20)
      start = time.perf_counter()
      loop_rate = loop_examples_per_s(config, _source(stage, num_examples, size))
      loop_wall_s = time.perf_counter() - start
      after = common.time_calls(step, 2, 4 if args.smoke else 20)
      step_rate = config.train.batch_size / float(np.median(before.wall_s + after.wall_s))
      ratio = loop_rate / step_rate
      loop_table.rows.append([stage, config.train.batch_size, cache, step_rate, loop_rate, ratio])
      results["loop"].append({"stage": stage, "cache": cache, "step_examples_per_s": step_rate,
                              "loop_examples_per_s": loop_rate, "ratio": ratio,
                              "loop_wall_s": loop_wall_s})
  sample_table = common.Table(
      "Batched SuTI personalisation (random tiny weights, one subject per call)",
      ["image px", "prompts per call", "sampling steps", "median s per call", "images/s"])
  results["sampling"] = []
  for size in (16, 64):
    row = sampling_images_per_s(size, 2 if args.smoke else 10, 2 if args.smoke else 16,
                                2 if args.smoke else 5)
    sample_table.rows.append([size, row["prompts"], row["steps"], row["timing"].median_s,
                              row["images_per_s"]])
    results["sampling"].append({k: v for k, v in row.items() if k != "timing"})
  notes = ["Loop ex/s is the trainer's own perf/examples_per_s, logged once per epoch "
           f"of {num_examples:,} examples read from TFRecord shards: the median over epochs "
           f"2-{EPOCHS} (the first holds the compile). The compiled step is timed alone on "
           "the same config just before and just after the loop (median of both). "
           "data.cache=False is the tf.data path (one stream over the epochs, every record "
           "read and decoded again each epoch); data.cache=True reads the shards once and "
           "batches from memory."]
  return common.write_report(NAME, QUESTION, [loop_table, sample_table], results,
                             smoke=args.smoke, out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main()
