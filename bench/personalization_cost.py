"""What does personalising to a new subject cost? SuTI renders it in context;
DreamBooth fine-tunes an expert first. Wall time per subject and subject fidelity.

  python -m bench.personalization_cost [--smoke] [--suti_checkpoint=workdirs/demo/suti_v2]
      [--base_checkpoint=workdirs/demo/base] [--judges=workdirs/demo/judges]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from bench import common

common.configure_host(num_devices=1)

import jax  # noqa: E402  (after configure_host on purpose)
import numpy as np  # noqa: E402

from configs import imagen_base64  # noqa: E402
from configs import suti_base64  # noqa: E402
from suti_jax.demo import evaluate  # noqa: E402
from suti_jax.demo import world  # noqa: E402
from suti_jax.experts import dreambooth  # noqa: E402
from suti_jax.experts import judges as judges_lib  # noqa: E402
from suti_jax.inference import StageModel, load_stage, random_stage  # noqa: E402
from suti_jax.train import experiment as experiment_lib  # noqa: E402

NAME = "personalization_cost"
QUESTION = ("For one new subject, how long does SuTI take to render N images in context "
            "(exemplar features encoded once per call) against a DreamBooth expert's class "
            "images + fine-tune + render, and what subject fidelity does each reach?")
DEMO = os.path.join("workdirs", "demo")
# Above every seed the demo's web and judges use (see demo/world.py).
NEW_SUBJECT_SEED = 3_000_017


def _micro(c) -> None:
  """The test suite's micro UNet, in place (--smoke)."""
  c.model.update(base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1),
                 attention_resolutions=(8,))
  c.text.update(num_layers=1, max_length=8)


def stage(path: str, config, key: jax.Array) -> tuple[StageModel, str]:
  """The trained stage at `path`, or a random-init one from `config` if `path` is ''."""
  if path:
    return load_stage(path), path
  return random_stage(experiment_lib.sections(config), key), "random init"


def judges(path: str, smoke: bool) -> tuple[judges_lib.SubjectJudge, judges_lib.TextJudge, str]:
  """The demo's judges at `path` (with subject/ and text/), or freshly trained ones."""
  if path:
    return (judges_lib.SubjectJudge.load(os.path.join(path, "subject")),
            judges_lib.TextJudge.load(os.path.join(path, "text")), path)
  sizes = (dict(num_subjects=4, steps=2, scenes_per_subject=2, num_heldout_subjects=2,
                batch_size=4) if smoke else
           dict(num_subjects=48, steps=300, scenes_per_subject=8, num_heldout_subjects=8))
  subject, text, _ = judges_lib.train_judges(16, seed=7, **sizes)
  return subject, text, f"trained here ({sizes['steps']} steps)"


def _default(flag: str, demo_dir: str, smoke: bool) -> str:
  """A flag's value, else the demo's output if present (full runs only)."""
  if flag or smoke:
    return flag
  return demo_dir if os.path.isdir(demo_dir) else ""


def _timed(fn, *args) -> tuple[Any, float, float]:
  wall0, cpu0 = time.perf_counter(), time.process_time()
  out = fn(*args)
  wall = time.perf_counter() - wall0
  return out, wall, (time.process_time() - cpu0) / wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(QUESTION)
  p.add_argument("--suti_checkpoint", default="", help="SuTI stage workdir (default: demo's).")
  p.add_argument("--base_checkpoint", default="", help="Imagen base workdir (default: demo's).")
  p.add_argument("--judges", default="", help="Folder with subject/ and text/ judges.")
  p.add_argument("--prompts_per_skill", type=int, default=None,
                 help="N = 5 skills x this (default 2; smoke 1).")
  args = p.parse_args(argv)
  key = jax.random.PRNGKey(0)
  suti_cfg, base_cfg = suti_base64.get_config("tiny"), imagen_base64.get_config("tiny")
  expert_cfg = dreambooth.ExpertConfig.tiny()
  sampling_steps = int(suti_cfg.sampling.num_steps)
  if args.smoke:
    _micro(suti_cfg)
    _micro(base_cfg)
    suti_cfg.model.exemplar.max_exemplars = 2
    expert_cfg = dataclasses.replace(expert_cfg, num_steps=2, num_class_images=2,
                                     class_sampling_steps=2)
    sampling_steps = 2
  suti, suti_src = stage(_default(args.suti_checkpoint, os.path.join(DEMO, "suti_v2"), args.smoke),
                         suti_cfg, key)
  base, base_src = stage(_default(args.base_checkpoint, os.path.join(DEMO, "base"), args.smoke),
                         base_cfg, jax.random.fold_in(key, 1))
  subject_judge, text_judge, judge_src = judges(
      _default(args.judges, os.path.join(DEMO, "judges"), args.smoke), args.smoke)
  k_max = suti.max_exemplars
  subject = world.make_eval_subject(
      NEW_SUBJECT_SEED, image_size=suti.image_size, min_exemplars=min(3, k_max),
      max_exemplars=k_max, prompts_per_skill=args.prompts_per_skill or (1 if args.smoke else 2),
      identifier=expert_cfg.identifier)
  n = len(subject.prompts)
  runs = {
      "SuTI (in context)": _timed(evaluate.suti, suti, [subject], key, sampling_steps),
      "DreamBooth expert": _timed(evaluate.dreambooth_experts, base, [subject], expert_cfg, key,
                                  sampling_steps),
  }
  table = common.Table(
      f"One new subject, {len(subject.exemplar_images)} exemplars, N = {n} images, "
      f"{sampling_steps} sampling steps, {suti.image_size}px",
      ["method", "s per subject (compile included)", "s per image", "DreamBooth / method",
       "subject fidelity (judge cosine)", "same-subject rate", "text fidelity",
       "CPU/wall incl. compile"])
  results = {"num_images": n, "sampling_steps": sampling_steps,
             "expert_steps": expert_cfg.num_steps,
             "sources": {"suti": suti_src, "base": base_src, "judges": judge_src}, "methods": {}}
  dreambooth_s = runs["DreamBooth expert"][0].seconds_per_subject
  for method, (generated, _, cpu_wall) in runs.items():
    scores = evaluate.score(generated.images, [subject], subject_judge, text_judge)
    seconds = generated.seconds_per_subject
    row = {"seconds_per_subject": seconds, "seconds_per_image": seconds / n,
           "dreambooth_over_method": dreambooth_s / seconds,
           **{m: float(np.mean(scores[m])) for m in ("subject_fidelity", "subject_match",
                                                     "text_fidelity")},
           "cpu_wall_ratio": cpu_wall}
    results["methods"][method] = row
    table.rows.append([method, seconds, row["seconds_per_image"], row["dreambooth_over_method"],
                       row["subject_fidelity"], row["subject_match"], row["text_fidelity"],
                       cpu_wall])
  results["dreambooth_over_suti"] = dreambooth_s / runs["SuTI (in context)"][0].seconds_per_subject
  notes = [f"Models: SuTI {suti_src}; DreamBooth base {base_src}; judges {judge_src}. "
           "Random-init models make the fidelity columns meaningless; pass the demo's "
           "checkpoints (`make demo` writes them under workdirs/demo/).",
           f"DreamBooth: {expert_cfg.num_class_images} class-prior images, "
           f"{expert_cfg.num_steps} {expert_cfg.optimizer} steps at lr "
           f"{expert_cfg.learning_rate:g}, then "
           "render; SuTI: one `Pipeline.personalize` call for all N prompts. Timings come "
           "from suti_jax.demo.evaluate, the same code the demo report uses: each is one "
           "subject's whole run, its XLA compiles included."]
  return common.write_report(NAME, QUESTION, [table], results, smoke=args.smoke,
                             out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main(sys.argv[1:])
