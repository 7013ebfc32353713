"""The demo: stage runner skip/resume, the report writer, the world split, and (slow)
the whole demo at `configs/demo.py:small`, twice (the second run skips every stage)."""

import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from suti_jax.data import synthetic
from suti_jax.demo import evaluate
from suti_jax.demo import report
from suti_jax.demo import world
from suti_jax.demo.stages import Stage, StageRunner, fingerprint_of


def _stage(name, calls, tmp_path, fingerprint=None, fail=False):
  def fn():
    calls.append(name)
    if fail:
      raise RuntimeError(f"{name} interrupted")
    path = tmp_path / f"{name}.out"
    path.write_text(name)
    return {"paths": {"out": str(path)}, "value": len(calls)}
  return Stage(name, fn, fingerprint)


def test_runner_skips_done_stages_and_resumes(tmp_path):
  workdir = str(tmp_path / "wd")
  calls = []
  log = []
  stages = [_stage("a", calls, tmp_path), _stage("b", calls, tmp_path, fail=True),
            _stage("c", calls, tmp_path)]
  with pytest.raises(RuntimeError, match="b interrupted"):
    StageRunner(workdir, log.append).run(stages)
  assert calls == ["a", "b"]
  assert os.path.exists(os.path.join(workdir, "markers", "a.json"))
  assert not os.path.exists(os.path.join(workdir, "markers", "b.json"))

  # Resume: 'a' is skipped, 'b' and 'c' run.
  calls.clear()
  stages[1] = _stage("b", calls, tmp_path)
  markers = StageRunner(workdir, log.append).run(stages)
  assert calls == ["b", "c"]
  assert markers["a"]["skipped"] and not markers["b"]["skipped"]
  assert markers["a"]["outputs"]["value"] == 1
  assert any("a: done already" in line for line in log)

  # Everything done: nothing runs.
  calls.clear()
  markers = StageRunner(workdir, log.append).run(stages)
  assert calls == [] and all(m["skipped"] for m in markers.values())


def test_runner_reruns_on_missing_output_or_new_fingerprint(tmp_path):
  workdir = str(tmp_path / "wd")
  calls = []
  StageRunner(workdir, lambda _: None).run([_stage("a", calls, tmp_path, {"steps": 1}),
                                           _stage("b", calls, tmp_path)])
  os.remove(tmp_path / "b.out")
  calls.clear()
  StageRunner(workdir, lambda _: None).run([_stage("a", calls, tmp_path, {"steps": 1}),
                                           _stage("b", calls, tmp_path)])
  assert calls == ["b"]
  calls.clear()
  StageRunner(workdir, lambda _: None).run([_stage("a", calls, tmp_path, {"steps": 2})])
  assert calls == ["a"]
  with pytest.raises(ValueError, match="duplicate"):
    StageRunner(workdir, lambda _: None).run([_stage("a", calls, tmp_path)] * 2)


def test_a_changed_recipe_starts_from_empty_folders_and_a_resume_keeps_them(tmp_path):
  """A stage's folders survive an interruption under the same fingerprint (a
  trainer resumes) but not a new fingerprint (stale checkpoints would resume)."""
  workdir = tmp_path / "wd"
  seen = []

  def stage(fingerprint, fail=False):
    def fn():
      ckpt = workdir / "train" / "step"
      seen.append(ckpt.exists())
      ckpt.parent.mkdir(parents=True, exist_ok=True)
      ckpt.write_text(str(fingerprint))
      if fail:
        raise RuntimeError("preempted")
      return {"paths": {"train": "train"}}
    return Stage("train", fn, fingerprint, folders=("train",))

  log = []
  with pytest.raises(RuntimeError, match="preempted"):
    StageRunner(str(workdir), log.append).run([stage(1, fail=True)])
  StageRunner(str(workdir), log.append).run([stage(1)])
  assert seen == [False, True]  # The interrupted run's checkpoint was resumed from.
  StageRunner(str(workdir), log.append).run([stage(2)])
  assert seen == [False, True, False]  # The new recipe did not see the old one's.
  assert (workdir / "train" / "step").read_text() == "2"
  assert any("written by another recipe" in line for line in log)
  # Folders of unknown origin (no record of who wrote them) count as stale too.
  os.remove(workdir / "markers" / "train.started")
  StageRunner(str(workdir), log.append).run([stage(3)])
  assert seen[-1] is False


def test_parallel_runner_overlaps_independent_stages_and_orders_dependent_ones(tmp_path):
  workdir = str(tmp_path / "wd")
  events = {name: threading.Event() for name in ("a", "b")}
  order = []

  def meet(name, other):
    def fn():
      order.append(f"{name} start")
      events[name].set()
      # Only returns True if the other stage runs at the same time.
      met = events[other].wait(timeout=10)
      order.append(f"{name} end")
      return {"met": met}
    return fn

  def after():
    order.append("c start")
    return {}

  stages = [Stage("a", meet("a", "b")), Stage("b", meet("b", "a")),
            Stage("c", after, deps=("a", "b"))]
  markers = StageRunner(workdir, lambda _: None).run(stages, workers=2)
  assert markers["a"]["outputs"]["met"] and markers["b"]["outputs"]["met"]
  assert order[-1] == "c start" and order.index("c start") > order.index("a end")
  # The two overlapped in time, and c started after both ended.
  a, b, c = (markers[n] for n in "abc")
  assert max(a["start_time"], b["start_time"]) < min(a["end_time"], b["end_time"])
  assert c["start_time"] >= max(a["end_time"], b["end_time"])
  assert list(markers) == ["a", "b", "c"]


def test_exclusive_stage_runs_alone_and_before_later_stages(tmp_path):
  def busy():
    time.sleep(0.2)
    return {}

  stages = [Stage("before", busy), Stage("solo", busy, exclusive=True), Stage("after", busy),
            Stage("also_after", busy)]
  markers = StageRunner(str(tmp_path / "wd"), lambda _: None).run(stages, workers=2)
  solo = markers["solo"]
  for name in ("before", "after", "also_after"):
    other = markers[name]
    assert other["end_time"] <= solo["start_time"] or other["start_time"] >= solo["end_time"]
  # Ready from the start, it goes before the stages listed after it.
  assert markers["after"]["start_time"] >= solo["end_time"]
  # Stages that are not exclusive still overlap.
  assert markers["after"]["start_time"] < markers["also_after"]["end_time"]
  assert markers["also_after"]["start_time"] < markers["after"]["end_time"]


def test_parallel_runner_lets_running_stages_finish_after_a_failure(tmp_path):
  workdir = str(tmp_path / "wd")
  calls = []
  slow_started = threading.Event()

  def slow():
    slow_started.set()
    time.sleep(0.3)
    calls.append("slow")
    return {}

  def failing():
    slow_started.wait(timeout=10)
    raise RuntimeError("failing stage broke")

  stages = [Stage("slow", slow), Stage("failing", failing),
            _stage("later", calls, tmp_path)]
  with pytest.raises(RuntimeError, match="failing stage broke"):
    StageRunner(workdir, lambda _: None).run(stages, workers=2)
  assert calls == ["slow"]  # 'later' never started; 'slow' finished and kept its marker.
  assert os.path.exists(os.path.join(workdir, "markers", "slow.json"))
  with pytest.raises(ValueError, match="depends on"):
    StageRunner(workdir, lambda _: None).run([Stage("x", dict, deps=("y",)), Stage("y", dict)])


def _fabricated_metrics():
  skills = ("recontextualization", "stylization", "novel_view", "attribute_modification",
            "accessorization")
  values = {m: {k: 0.1 * i + 0.01 * j for j, k in enumerate(evaluate.METRICS)}
            for i, m in enumerate(evaluate.METHODS)}
  return {
      "methods": values,
      "per_skill": {m: {s: dict(v) for s in skills} for m, v in values.items()},
      "personalization_s": {"suti_v2": 2.0, "suti_v1": 2.0, "dreambooth": 30.0},
      "judges": {"subject_pair_accuracy": 0.9, "text_attribute_accuracy": 0.8},
      "data": {"ICL v2": {"groups_written": 40, "drops": {"low_text_fidelity": 3}}},
      "stages": {"train_base": {"wall_s": 12.5, "cpu_s": 20.0, "start_time": 100.0,
                                "end_time": 112.5},
                 "train_sr": {"wall_s": 5.0, "cpu_s": 9.0, "start_time": 104.0,
                              "end_time": 109.0}},
      "eval_set": {"num_subjects": 2, "num_prompts": 10},
      "training": {"train_base": {"step": 400.0, "train/loss": 0.05}},
      "scale": "fabricated",
  }


def test_grid_image_titles_tiles_and_prompts():
  exemplars = np.stack([np.full((16, 16, 3), 10 * (k + 1), np.uint8) for k in range(3)])
  rows = [[np.full((16, 16, 3), 100 + 10 * m + r, np.uint8) for m in range(5)]
          for r in range(2)]
  grid = report.grid_image(exemplars, rows, ["a badge on the beach", "a red badge"])
  tile, cell, title = 64, 72, report._TITLE_PX
  assert grid.dtype == np.uint8 and grid.shape[0] == title + 2 * cell
  dark = lambda region: (region < 128).any()
  # Titles over the exemplars and over each method column; nothing above the spacer.
  assert dark(grid[:title, :3 * cell])
  methods_x = [3 * cell + cell // 2 + m * cell for m in range(5)]
  for x in methods_x:
    assert dark(grid[:title, x:x + tile])
  assert not dark(grid[:title, 3 * cell:3 * cell + cell // 2])
  # Every tile is its image upscaled x4, exemplars first (no blank slots), then methods.
  for r in range(2):
    top = title + r * cell
    for k in range(3):
      np.testing.assert_array_equal(grid[top:top + tile, k * cell:k * cell + tile],
                                    10 * (k + 1))
    for m, x in enumerate(methods_x):
      np.testing.assert_array_equal(grid[top:top + tile, x:x + tile], 100 + 10 * m + r)
    # The prompt is written right of the last method, within its row's band.
    assert dark(grid[top:top + tile, methods_x[-1] + cell:])
  assert not dark(grid[title + tile:title + cell, methods_x[-1] + cell:])
  # No prompts: the title band alone.
  assert report.grid_image(exemplars, [], []).shape[0] == title
  with pytest.raises(ValueError, match="2 rows but 1 prompts"):
    report.grid_image(exemplars, rows, ["one"])
  with pytest.raises(ValueError, match="5 images"):
    report.grid_image(exemplars, [row[:4] for row in rows], ["a", "b"])


def test_report_writer_tables(tmp_path):
  metrics = _fabricated_metrics()
  grid = report.grid_image(np.zeros((3, 16, 16, 3), np.uint8),
                           [[np.full((16, 16, 3), 9, np.uint8)] * 5] * 2, ["p one", "p two"])
  paths = report.write(str(tmp_path), metrics, [("s002000", grid, ["p one", "p two"])])
  text = open(paths["REPORT.md"]).read()
  for method in evaluate.METHODS:
    row = next(line for line in text.splitlines()
               if line.startswith(f"| {evaluate.METHOD_LABELS[method]} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 1 + len(evaluate.METRICS)
    assert cells[1:] == [f"{v:.3f}" for v in metrics["methods"][method].values()]
  # The v2 method (0.01 * j) trails v1 (0.1 + ...) on subject fidelity: said plainly.
  assert "SuTI v2 (expert targets) does not beat SuTI v1" in text
  assert "15.0x" in text  # 30 s DreamBooth vs 2 s SuTI.
  assert "| subject_pair_accuracy | 0.900 |" in text
  assert "| ICL v2 | 40 | low_text_fidelity: 3 |" in text
  assert "| train_base | 12.5 | 20.0 |" in text
  assert "| all stages, first start to last end | 12.5 | |" in text  # Overlap counted once.
  assert "| train_base | 400 | 0.050 |" in text
  assert "![s002000](grid_s002000.png)" in text and "2. p two" in text
  saved = json.load(open(paths["metrics.json"]))
  assert saved["methods"] == metrics["methods"]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid_s002000.png")), grid)


def test_heldout_subjects_are_disjoint_and_have_ground_truth():
  pairs = world.make_web(8, seed=0, size_px=16)
  seen = world.web_subject_ids(pairs)
  seeds = world.heldout_subject_seeds(3, seen, judge_seed=7)
  subjects = world.make_eval_set(seeds, image_size=16, min_exemplars=3, max_exemplars=5,
                                 prompts_per_skill=1, identifier="sks")
  assert {s.subject_id for s in subjects}.isdisjoint(seen)
  assert not any(world.in_judge_block(s, 7) for s in seeds)
  for s in subjects:
    assert 3 <= len(s.exemplar_images) == len(s.exemplar_captions) <= 5
    assert sorted({p.skill for p in s.prompts}) == sorted(synthetic.SKILLS)
    for p in s.prompts:
      assert s.description in p.prompt and "sks" in p.expert_prompt
      assert synthetic.parse_prompt(p.prompt) == synthetic.parse_prompt(
          p.class_prompt)
      assert p.target.shape == (16, 16, 3)


def test_demo_texts_fit_the_text_encoder(tmp_path):
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel

  cfg = demo_config.get_config()
  room = demo_config.TEXT_BYTES - 1  # eos takes one token
  assert {cfg[s].text.max_length for s in ("base", "sr", "suti")} == {demo_config.TEXT_BYTES}
  demo = recipe.Demo(cfg, str(tmp_path / "work"), str(tmp_path / "report"))
  # The base's corpus: the first 2000 captions of its generator (all 12000 render slowly).
  corpus = synthetic.caption_dataset(cfg.corpus.seed, cfg.world.image_size,
                                     range(cfg.corpus.num_subjects), num_examples=2000)
  texts = ([p.caption for p in demo.web] + [c for _, c in corpus]
           + [c for s in demo.eval_set for c in s.exemplar_captions]
           + [t for s in demo.eval_set for p in s.prompts
              for t in (p.prompt, p.class_prompt, p.expert_prompt)])
  longest = max(texts, key=lambda t: len(t.encode()))
  assert len(longest.encode()) <= room, longest


def test_demo_rejects_suti_steps_set_through_the_shared_suti_section(tmp_path):
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel

  config = demo_config.get_config("small")
  config.suti.train.total_steps = 99
  demo = recipe.Demo(config, str(tmp_path / "wd"), str(tmp_path / "report"))
  with pytest.raises(ValueError, match="suti_steps.v2"):
    demo.train_suti("v2")


def _stage_fingerprints(tmp_path, config) -> dict[str, str]:
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel
  demo = recipe.Demo(config, str(tmp_path / "wd"), str(tmp_path / "report"))
  return {s.name: fingerprint_of(s.fingerprint) for s in demo.stages()}


def _stages_changed_by(tmp_path, config, change) -> set[str]:
  """The stages whose fingerprint `change(config)` changes (config is changed)."""
  before = _stage_fingerprints(tmp_path, config)
  change(config)
  after = _stage_fingerprints(tmp_path, config)
  return {name for name in before if before[name] != after[name]}


def test_suti_guidance_fingerprints_the_stages_that_sample_not_the_training(tmp_path):
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel

  config = demo_config.get_config("small")
  changed = _stages_changed_by(
      tmp_path, config, lambda c: setattr(c.suti.sampling, "text_guidance_scale",
                                          c.suti.sampling.text_guidance_scale + 1.0))
  assert changed == {"generate_suti_v2", "generate_suti_v1", "curve_suti_v2",
                     "curve_suti_v1", "time_personalization", "evaluate", "report"}
  changed = _stages_changed_by(
      tmp_path, config, lambda c: setattr(c.suti.optimizer, "learning_rate",
                                          2 * c.suti.optimizer.learning_rate))
  assert "train_suti_v2" in changed


def test_eval_sampler_fingerprints_every_evaluation_render_and_nothing_upstream(tmp_path):
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel

  config = demo_config.get_config("small")
  changed = _stages_changed_by(
      tmp_path, config, lambda c: setattr(c.eval, "sampler", "dpm_solver_2m"))
  assert changed == {
      "generate_suti_v2", "generate_suti_v1", "generate_dreambooth", "generate_text_only",
      "curve_suti_v2", "curve_suti_v1", "time_personalization", "evaluate", "report"}
  # Every method's stage then samples with it, the SuTI guidance kept.
  from suti_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from suti_jax.inference import StageModel  # pylint: disable=import-outside-toplevel
  from suti_jax.inference.stage import StageSpec  # pylint: disable=import-outside-toplevel
  spec = StageSpec(config_lib.UNetConfig(), config_lib.TextEncoderConfig(),
                   config_lib.DiffusionConfig(),
                   config_lib.SamplingConfig(guidance="interleaved", num_steps=3))
  demo = recipe.Demo(config, str(tmp_path / "wd"), str(tmp_path / "report"))
  sampling = demo.eval_stage(StageModel("suti_base64", spec, {}, {})).spec.sampling
  assert (sampling.sampler, sampling.guidance, sampling.num_steps) == (
      "dpm_solver_2m", "interleaved", 3)


def test_v2_pipeline_parts_are_stages_that_the_merge_waits_for(tmp_path):
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel

  config = demo_config.get_config("small")
  config.pipeline.v2_parts = 3
  demo = recipe.Demo(config, str(tmp_path / "wd"), str(tmp_path / "report"))
  stages = {s.name: s for s in demo.stages()}
  parts = [f"icl_v2_part{i}" for i in range(3)]
  assert [stages[p].folders for p in parts] == [(f"icl_v2_parts/part{i}",) for i in range(3)]
  # The merge owns a folder of its own: emptying it never deletes the parts'.
  assert stages["icl_v2"].deps == tuple(parts) and stages["icl_v2"].folders == ("icl_v2",)
  assert "icl_v2" in stages["train_suti_v2"].deps and "icl_v1" in stages
  assert demo.icl_pattern("v2") == str(tmp_path / "wd" / "icl_v2" / "icl-*")
  # The parts render different batches, so each has its own fingerprint; the v1
  # pipeline does not depend on how v2 is split.
  assert len({fingerprint_of(stages[p].fingerprint) for p in parts}) == 3
  config.pipeline.v2_parts = 1
  one = {s.name: s for s in recipe.Demo(config, str(tmp_path / "wd"),
                                        str(tmp_path / "report")).stages()}
  assert one["icl_v2"].folders == ("icl_v2",) and "icl_v2_part0" not in one
  assert fingerprint_of(one["icl_v1"].fingerprint) == fingerprint_of(stages["icl_v1"].fingerprint)


def test_v2_pipeline_parts_take_both_slots_when_the_web_is_written(tmp_path):
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel

  config = demo_config.get_config()
  stages = recipe.Demo(config, str(tmp_path / "wd"), str(tmp_path / "report")).stages()
  deps = {}
  for stage in stages:
    deps[stage.name] = set(stage.deps).union(*(deps[d] for d in stage.deps))
  # Only the shipped artefacts (installed in seconds) can start beside "web"; the
  # runner starts ready stages in list order, so the parts, listed first among the
  # stages that wait for the web, take both slots when it is written.
  assert {n for n, d in deps.items() if "web" not in d} == {"web", "train_base",
                                                             "train_judges"}
  waiting = [s.name for s in stages if "web" in deps[s.name]]
  assert waiting[:config.workers] == [f"icl_v2_part{i}" for i in range(config.workers)]
  assert config.pipeline.v2_parts == config.workers


def test_default_recipe_installs_the_shipped_base_sr_and_judges(tmp_path):
  """A config change that reaches the base, SR or judge recipe (a new model key, say)
  would make `make demo` retrain them (an hour on 2 cores): ship new ones with it."""
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from launch.demo import recipe  # pylint: disable=import-outside-toplevel
  from suti_jax.demo import pretrained  # pylint: disable=import-outside-toplevel

  config = demo_config.get_config()
  demo = recipe.Demo(config, str(tmp_path / "wd"), str(tmp_path / "report"))
  assert (pretrained.read_recipe(config.base_pretrained)["fingerprint"]
          == fingerprint_of(demo.base_fingerprint()))
  assert (pretrained.read_recipe(config.judges_pretrained)["fingerprint"]
          == fingerprint_of(config.judges.to_dict()))
  assert (pretrained.read_recipe(config.sr_pretrained)["fingerprint"]
          == fingerprint_of(demo.sr_fingerprint()))


def test_demo_full_recipe_scales_the_default_and_excludes_small():
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel

  default, full = demo_config.get_config(), demo_config.get_config("full")
  assert full.world.num_clusters == demo_config.FULL_CLUSTERS > default.world.num_clusters
  assert all(full.suti_steps[v] == demo_config.FULL_SUTI_STEPS > default.suti_steps[v]
             for v in ("v2", "v1"))
  # Same shipped base and judges: their recipes must not change with the option.
  assert full.base.to_dict() == default.base.to_dict()
  assert full.judges.to_dict() == default.judges.to_dict()
  with pytest.raises(ValueError, match="exclusive"):
    demo_config.get_config("small,full")


@pytest.mark.slow
def test_demo_small_end_to_end_then_skips(tmp_path):
  from configs import demo as demo_config
  from launch.demo import recipe

  workdir, report_dir = str(tmp_path / "wd"), str(tmp_path / "report")
  markers = recipe.run(demo_config.get_config("small"), workdir, report_dir)
  assert not any(m["skipped"] for m in markers.values())
  text = open(os.path.join(report_dir, "REPORT.md")).read()
  metrics = json.load(open(os.path.join(report_dir, "metrics.json")))
  assert set(metrics["methods"]) == set(evaluate.METHODS)
  for method, values in metrics["methods"].items():
    assert set(values) == set(evaluate.METRICS)
    assert all(np.isfinite(v) for v in values.values())
    assert f"| {evaluate.METHOD_LABELS[method]} |" in text
  assert metrics["methods"]["ground_truth"]["pixel_mse"] == 0.0
  assert set(metrics["personalization_s"]) == {"suti_v2", "dreambooth"}
  assert all(v > 0 for v in metrics["personalization_s"].values())
  timing = markers["time_personalization"]
  assert all(m["end_time"] <= timing["start_time"] or m["start_time"] >= timing["end_time"]
             for name, m in markers.items() if name != "time_personalization")
  assert "subject_pair_accuracy" in metrics["judges"]
  # Four saved points per SuTI model, and an interval around every mean.
  assert [len(metrics["learning_curve"][v]) for v in ("v2", "v1")] == [4, 4]
  for method, intervals in metrics["intervals"].items():
    for metric, (low, high) in intervals.items():
      assert low <= metrics["methods"][method][metric] + 1e-9 <= high + 2e-9, (method, metric)
  assert "## Targets" in text and "## Learning curve" in text
  assert metrics["data"]["ICL v2"]["groups_written"] > 0
  # SuTI trained on the groups with precomputed T5 embeddings, not encoding in the step.
  assert os.listdir(os.path.join(workdir, "suti_v2", "groups_embedded"))
  assert not os.path.exists(os.path.join(workdir, "suti_v2", "checkpoints", "text_encoder"))
  assert os.path.exists(os.path.join(report_dir, metrics["grids"][0]["path"]))

  start = time.time()
  again = recipe.run(demo_config.get_config("small"), workdir, report_dir)
  assert all(m["skipped"] for m in again.values())
  assert time.time() - start < 60


def _target_metrics():
  methods = {m: {k: 0.0 for k in evaluate.METRICS} for m in evaluate.METHODS}
  methods["suti_v2"].update(subject_fidelity=0.6, subject_match=0.7, text_fidelity=0.4,
                            nearest_exemplar_mse=0.05)
  methods["suti_v1"].update(text_fidelity=0.3, nearest_exemplar_mse=0.02)
  methods["dreambooth"].update(subject_fidelity=0.6)
  methods["text_only"].update(subject_fidelity=0.3, text_fidelity=0.2)
  return {"methods": methods, "personalization_s": {"suti_v2": 1.0, "dreambooth": 25.0},
          "judges": {"subject_pair_accuracy": 0.95, "text_attribute_accuracy": 0.85},
          "eval_set": {"num_subjects": 12, "num_prompts": 120}}


def test_target_checks_follow_the_numbers():
  metrics = _target_metrics()
  assert all(met for _, _, met in report.target_checks(metrics))
  metrics["methods"]["suti_v2"]["subject_fidelity"] = 0.45  # < text-only + 0.2, < 0.9 x DB
  metrics["personalization_s"]["dreambooth"] = 10.0
  unmet = [name for name, _, met in report.target_checks(metrics) if not met]
  assert len(unmet) == 3 and any("20x" in name for name in unmet)
  del metrics["judges"]["subject_pair_accuracy"]
  assert not dict((n, m) for n, _, m in report.target_checks(metrics))[
      "judges: held-out subject-pair accuracy >= 0.9"]


def test_demo_targets_check_exits_by_the_targets(tmp_path):
  from bench import demo_targets

  path = tmp_path / "metrics.json"
  path.write_text(json.dumps(_target_metrics()))
  assert demo_targets.main([f"--metrics={path}", f"--out_dir={tmp_path}"]) == 0
  bad = _target_metrics()
  bad["methods"]["suti_v2"]["subject_match"] = 0.5
  path.write_text(json.dumps(bad))
  assert demo_targets.main([f"--metrics={path}", f"--out_dir={tmp_path}"]) == 1
  assert json.load(open(tmp_path / "demo_targets.json"))["results"]["met"] == 8


def test_personalization_timing_leaves_out_the_warm_up_subject(monkeypatch):
  clock, calls = [0.0], []

  def method(subjects):
    # The first call stands for the compiles: 10 s on the fake clock, then 1 s each.
    clock[0] += 10.0 if not calls else 1.0
    calls.append(subjects[0])
    return evaluate.Generated(np.zeros((1, 4, 4, 3), np.uint8))

  monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])
  subjects = ["s0", "s1", "s2", "s3"]
  assert evaluate.time_personalization({"m": method}, subjects, num_timed=2) == {"m": 1.0}
  assert calls == ["s0", "s1", "s2"]
  with pytest.raises(ValueError, match="needs 5 held-out subjects"):
    evaluate.time_personalization({"m": method}, subjects, num_timed=4)


def test_bootstrap_interval_resamples_subjects():
  values = np.array([0.0, 0.0, 1.0, 1.0, 0.5, 0.5])
  groups = np.array(["a", "a", "b", "b", "c", "c"])
  low, high = evaluate.bootstrap_interval(values, groups)
  assert 0.0 <= low < 0.5 < high <= 1.0
  assert evaluate.bootstrap_interval(values, groups) == (low, high)  # Seeded.
  # Identical subjects: no spread at all.
  assert evaluate.bootstrap_interval(np.full(6, 0.3), groups) == pytest.approx((0.3, 0.3))


def test_shipped_artefact_exports_and_installs_whole(tmp_path):
  from suti_jax.demo import pretrained

  source = tmp_path / "trained" / "7"
  source.mkdir(parents=True)
  (source / "weights").write_text("w7")
  shipped = str(tmp_path / "shipped")
  pretrained.export(str(source), shipped, "checkpoints/7", {"fingerprint": "abc", "step": 7})
  assert pretrained.read_recipe(shipped) == {"fingerprint": "abc", "step": 7}
  target = tmp_path / "wd" / "checkpoints"
  target.mkdir(parents=True)
  (target / "stale").write_text("old run")
  assert pretrained.install(shipped, "checkpoints", str(target))["step"] == 7
  assert sorted(os.listdir(target)) == ["7"]
  assert (target / "7" / "weights").read_text() == "w7"
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".shipped-")]

  assert pretrained.read_recipe(str(tmp_path / "nothing")) is None
  with pytest.raises(FileNotFoundError, match="no judges/ folder"):
    pretrained.install(shipped, "judges", str(tmp_path / "j"))
  with pytest.raises(FileNotFoundError, match="recipe.json"):
    pretrained.install(str(tmp_path / "nothing"), "checkpoints", str(target))
  with pytest.raises(FileNotFoundError, match="nothing to ship"):
    pretrained.export(str(tmp_path / "missing"), shipped, "checkpoints/1", {"fingerprint": ""})


def test_demo_installs_shipped_judges_only_for_their_recipe(tmp_path):
  from configs import demo as demo_config
  from launch.demo import recipe

  shipped = str(tmp_path / "shipped_judges")
  trained = recipe.Demo(demo_config.get_config("small"), str(tmp_path / "a"), str(tmp_path / "r"),
                        save_to={"judges": shipped}).train_judges()
  assert "installed_from" not in trained

  config = demo_config.get_config("small")
  config.judges_pretrained = shipped
  installed = recipe.Demo(config, str(tmp_path / "b"), str(tmp_path / "r")).train_judges()
  assert installed["installed_from"] == shipped
  assert installed["report"] == json.loads(json.dumps(trained["report"]))
  for judge in ("subject", "text"):
    for name in ("config.json", "params.msgpack"):
      a = open(os.path.join(trained["paths"][judge], name), "rb").read()
      assert open(os.path.join(installed["paths"][judge], name), "rb").read() == a

  config.judges.steps += 1  # Another recipe: the shipped judges do not fit it.
  retrained = recipe.Demo(config, str(tmp_path / "c"), str(tmp_path / "r")).train_judges()
  assert "installed_from" not in retrained
  with pytest.raises(ValueError, match="unknown shipped artefacts"):
    recipe.Demo(config, str(tmp_path / "d"), str(tmp_path / "r"), retrain=("judge",))


def test_demo_installs_a_shipped_checkpoint_only_for_its_recipe(tmp_path, monkeypatch):
  """The SR stage (as the base) trains, exports with `save_to`, then installs the
  exported checkpoint under the same recipe and trains again under another."""
  from configs import demo as demo_config
  from launch.demo import recipe

  trained_in = []

  def fake_train(cfg, workdir, watcher, source):
    del watcher
    trained_in.append(workdir)
    step_dir = os.path.join(workdir, "checkpoints", str(cfg.train.total_steps))
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "state"), "w") as f:
      f.write(f"{len(source)} pairs")
    return {"paths": {"checkpoints": os.path.join(workdir, "checkpoints")},
            "final": {"step": float(cfg.train.total_steps), "train/loss": 0.25}}

  monkeypatch.setattr(recipe, "_train", fake_train)
  shipped = str(tmp_path / "shipped_sr")
  config = demo_config.get_config("small")
  trained = recipe.Demo(config, str(tmp_path / "a"), str(tmp_path / "r"),
                        save_to={"sr": shipped}).train_sr()
  assert "installed_from" not in trained and len(trained_in) == 1

  config.sr_pretrained = shipped
  demo = recipe.Demo(config, str(tmp_path / "b"), str(tmp_path / "r"))
  installed = demo.train_sr()
  assert len(trained_in) == 1, "installed, not trained"
  assert installed["installed_from"] == shipped
  assert installed["final"] == trained["final"]
  state = os.path.join(str(config.sr.train.total_steps), "state")
  assert (open(os.path.join(installed["paths"]["checkpoints"], state)).read()
          == f"{len(demo.web)} pairs")

  retrain = recipe.Demo(config, str(tmp_path / "c"), str(tmp_path / "r"), retrain=("sr",))
  assert "installed_from" not in retrain.train_sr()
  config.world.num_clusters += 1  # Another web: the shipped SR does not fit it.
  assert "installed_from" not in recipe.Demo(config, str(tmp_path / "d"),
                                             str(tmp_path / "r")).train_sr()
  assert len(trained_in) == 3


def test_threads_compile_in_turn():
  from suti_jax import compile_cache  # pylint: disable=import-outside-toplevel

  inside, seen = [], []

  def build():
    with compile_cache.one_at_a_time():
      inside.append(threading.get_ident())
      seen.append(len(inside))
      time.sleep(0.05)
      inside.pop()

  threads = [threading.Thread(target=build) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # Never two threads inside at once; each entered once.
  assert seen == [1, 1, 1]
