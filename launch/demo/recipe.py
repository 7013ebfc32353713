"""The embedded-default demo recipe (`make demo`): the whole SuTI story on the synthetic
world as resumable stages (web -> base -> judges -> Beam ICL groups -> SuTI v2 / v1 ->
held-out evaluation -> reports/demo/REPORT.md); `run` is the entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Collection, Mapping

import jax
import ml_collections
import numpy as np
import tqdm

from data_pipeline import build_icl_groups
from data_pipeline import embed_text
from data_pipeline import merge_parts
from data_pipeline import read as pipeline_read
from data_pipeline import write as pipeline_write
from suti_jax import compile_cache
from suti_jax import config as config_lib
from suti_jax.demo import evaluate
from suti_jax.demo import report
from suti_jax.demo import world as world_lib
from suti_jax.demo import pretrained
from suti_jax.demo.stages import Stage, StageRunner, fingerprint_of
from suti_jax.data import synthetic
from suti_jax.experts import dreambooth
from suti_jax.experts import judges as judges_lib
from suti_jax.inference import StageModel, load_stage
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import loop
from suti_jax.train import preemption


# Artefacts the repository ships pretrained: name -> (config key of the shipped
# folder, payload folder inside it). Each is installed when its recipe fingerprint
# matches the config, else trained (and exported with `save_to`).
SHIPPED = {"base": ("base_pretrained", "checkpoints"), "sr": ("sr_pretrained", "checkpoints"),
           "judges": ("judges_pretrained", "judges")}


class Preempted(RuntimeError):
  """A training stage stopped early (SIGTERM); re-running resumes it."""


def _train(cfg: ml_collections.ConfigDict, workdir: str, watcher: preemption.PreemptionWatcher,
           source: Any = None) -> dict[str, Any]:
  result = loop.run(cfg, workdir, input_source=source, watcher=watcher)
  if result.get("preempted"):
    raise Preempted(f"training in {workdir} was preempted at step {result['step']:.0f}; "
                    "run the demo again to resume")
  return {"paths": {"checkpoints": os.path.join(workdir, "checkpoints")},
          "final": {k: v for k, v in result.items() if k.startswith(("train/", "step"))}}


class Demo:
  """The demo's stages over one config, workdir and report folder."""

  # The workdir folders each stage writes: emptied when the stage runs under a
  # new recipe, so a trainer never resumes another recipe's checkpoints.
  # (The v2 pipeline's parts' folders come from `icl_parts`.)
  FOLDERS = {"web": ("web",), "train_base": ("base",), "train_sr": ("sr",),
             "train_judges": ("judges",), "icl_v2": ("icl_v2",), "icl_v1": ("icl_v1",),
             "train_suti_v2": ("suti_v2",), "train_suti_v1": ("suti_v1",)}

  # Stages that run with no other stage beside them: timings comparable across methods.
  EXCLUSIVE = ("time_personalization",)

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, report_dir: str,
               watcher: preemption.PreemptionWatcher | None = None, *,
               retrain: Collection[str] = (), save_to: Mapping[str, str] | None = None):
    """Binds the recipe to its folders.

    Args:
      config: `configs/demo.py` config.
      workdir: intermediate outputs, checkpoints and done-markers.
      report_dir: where REPORT.md, metrics.json and the grids go.
      watcher: the SIGTERM watcher of the training stages (one is made if None).
      retrain: shipped artefacts (`SHIPPED`) to train even where the shipped one
        was made by this config's recipe.
      save_to: artefact name -> folder to export it to after training it.
    """
    self.cfg = config
    unknown = (set(retrain) | set(save_to or {})) - set(SHIPPED)
    if unknown:
      raise ValueError(f"unknown shipped artefacts {sorted(unknown)}; known: {list(SHIPPED)}")
    self.retrain = frozenset(retrain)
    self.save_to = dict(save_to or {})
    # One SIGTERM watcher for every training stage: stages may run on worker
    # threads, and only the main thread can install a signal handler.
    self.watcher = watcher or preemption.PreemptionWatcher()
    self.workdir = os.path.abspath(workdir)
    self.report_dir = os.path.abspath(report_dir)
    self._web = None
    self._eval_set = None

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  # World.
  @property
  def web(self):
    if self._web is None:
      w = self.cfg.world
      self._web = world_lib.make_web(w.num_clusters, self.cfg.seed, w.web_size_px)
    return self._web

  @property
  def eval_set(self) -> list[world_lib.EvalSubject]:
    if self._eval_set is None:
      w = self.cfg.world
      seeds = world_lib.heldout_subject_seeds(
          w.num_heldout_subjects, world_lib.web_subject_ids(self.web), self.cfg.judges.seed)
      self._eval_set = world_lib.make_eval_set(
          seeds, image_size=w.image_size, min_exemplars=w.min_exemplars,
          max_exemplars=w.max_exemplars, prompts_per_skill=w.prompts_per_skill,
          identifier=self.expert_config().identifier)
    return self._eval_set

  def expert_config(self) -> dreambooth.ExpertConfig:
    """The DreamBooth recipe of the pipeline's teachers, and so of the baseline too:
    `ExpertConfig.tiny()` with the config's `experts` overrides."""
    return dataclasses.replace(dreambooth.ExpertConfig.tiny(), **self.cfg.experts.to_dict())

  def write_web(self) -> dict[str, Any]:
    jsonl = pipeline_read.write_jsonl_input(self.web, self.path("web"))
    heldout = [s.subject_id for s in self.eval_set]
    train = sorted(world_lib.web_subject_ids(self.web))
    if set(heldout) & set(train):
      raise AssertionError(f"held-out subjects in the training web: {set(heldout) & set(train)}")
    with open(self.path("web", "split.json"), "w") as f:
      json.dump({"train_subjects": train, "heldout_subjects": heldout}, f, indent=1)
    return {"paths": {"jsonl": jsonl, "split": self.path("web", "split.json")},
            "pairs": len(self.web), "train_subjects": len(train), "heldout_subjects": heldout}

  def caption_source(self) -> list[tuple[np.ndarray, str]]:
    return [(p.image, p.caption) for p in self.web]

  def corpus_source(self) -> list[tuple[np.ndarray, str]]:
    """The base's pretraining captions: many subjects, none of them held out."""
    k = self.cfg.corpus
    return list(synthetic.caption_dataset(k.seed, self.cfg.world.image_size,
                                          range(k.num_subjects), num_examples=k.num_examples))

  # Training.
  def base_fingerprint(self) -> Any:
    """What the base checkpoint depends on: its config and its corpus, not the web."""
    return [self.cfg.base.to_dict(), self.cfg.corpus.to_dict(), self.cfg.world.image_size]

  def sr_fingerprint(self) -> Any:
    """What the SR checkpoint depends on: its config and the web pairs it trains on."""
    w = self.cfg.world
    return [self.cfg.sr.to_dict(), self.cfg.seed, w.num_clusters, w.web_size_px]

  def _install_shipped(self, name: str, target: str, fingerprint: str) -> dict[str, Any] | None:
    """Installs the shipped artefact `name` into `target` and returns its recipe, or
    returns None when the stage must train: nothing shipped, a retrain asked for,
    or a shipped artefact made by another recipe."""
    config_key, payload = SHIPPED[name]
    shipped = self.cfg.get(config_key, "")
    recipe = pretrained.read_recipe(shipped) if shipped else None
    if recipe is None or name in self.retrain:
      return None
    if recipe["fingerprint"] != fingerprint:
      tqdm.tqdm.write(f"{name}: this config's recipe differs from the shipped {shipped}; "
                      "training from scratch")
      return None
    recipe = pretrained.install(shipped, payload, target)
    tqdm.tqdm.write(f"{name}: installed the shipped {shipped}; --retrain={name} trains it "
                    "from scratch")
    return recipe

  def _train_shipped(self, name: str, fingerprint: Any,
                     source: Callable[[], Any]) -> dict[str, Any]:
    """Trains the checkpointed stage `name` (config section and workdir folder of
    that name) on `source()`, or installs its shipped checkpoint when this recipe
    made it; with `save_to[name]`, exports what it trained."""
    checkpoints = self.path(name, "checkpoints")
    fingerprint = fingerprint_of(fingerprint)
    recipe = self._install_shipped(name, checkpoints, fingerprint)
    if recipe is not None:
      return {"paths": {"checkpoints": checkpoints}, "final": recipe["final"],
              "installed_from": self.cfg[SHIPPED[name][0]]}
    cfg = self.cfg[name]
    out = _train(cfg, self.path(name), self.watcher, source())
    if name in self.save_to:
      # The whole checkpoints folder: its one kept step (train.keep_checkpoints=1)
      # and the run's T5 beside it (`checkpoint.TEXT_ENCODER_DIR`).
      pretrained.export(checkpoints, self.save_to[name], SHIPPED[name][1],
                        {"fingerprint": fingerprint, "final": out["final"],
                         "step": cfg.train.total_steps})
    return out

  def train_base(self) -> dict[str, Any]:
    return self._train_shipped("base", self.base_fingerprint(), self.corpus_source)

  def train_sr(self) -> dict[str, Any]:
    return self._train_shipped("sr", self.sr_fingerprint(), self.caption_source)

  def train_judges(self) -> dict[str, Any]:
    j = self.cfg.judges
    paths = {"subject": self.path("judges", "subject"), "text": self.path("judges", "text")}
    fingerprint = fingerprint_of(j.to_dict())
    recipe = self._install_shipped("judges", self.path("judges"), fingerprint)
    if recipe is not None:
      return {"paths": paths, "report": recipe["report"],
              "installed_from": self.cfg.judges_pretrained}
    subject, text, scores = judges_lib.train_judges(
        j.image_size, j.num_subjects, j.steps, j.seed, scenes_per_subject=j.scenes_per_subject,
        num_heldout_subjects=j.num_heldout_subjects, batch_size=j.batch_size)
    subject.save(paths["subject"])
    text.save(paths["text"])
    if "judges" in self.save_to:
      pretrained.export(self.path("judges"), self.save_to["judges"], SHIPPED["judges"][1],
                        {"fingerprint": fingerprint, "report": scores})
    return {"paths": paths, "report": scores}

  def icl_parts(self, version: str) -> list[tuple[str, str]]:
    """(stage name, folder) of each part of the `version` pipeline: the v2 pipeline
    runs as `pipeline.v2_parts` stages that share out its expert renders (so its
    experts can fill both worker slots), then the `icl_v2` stage merges their
    outputs; v1 runs whole."""
    parts = self.cfg.pipeline.v2_parts if version == "v2" else 1
    if parts == 1:
      return [(f"icl_{version}", f"icl_{version}")]
    return [(f"icl_{version}_part{i}", f"icl_{version}_parts/part{i}") for i in range(parts)]

  def icl_pattern(self, version: str) -> str:
    """The glob of the `version` pipeline's ICL-group shards (merged from its parts)."""
    return self.path(f"icl_{version}", f"{build_icl_groups.OUTPUT_PREFIX}-*")

  def build_groups(self, version: str, renderer: str, part: int = 0) -> dict[str, Any]:
    p = self.cfg.pipeline
    parts = self.icl_parts(version)
    output = self.path(parts[part][1])
    args = build_icl_groups.pipeline_args(
        input=self.path("web", "web.jsonl"), output=output, renderer=renderer,
        part=part, num_parts=len(parts),
        num_shards=p.num_shards, seed=self.cfg.seed, prompts_per_cluster=p.prompts_per_cluster,
        subject_scorer=f"judge:{self.path('judges', 'subject')}",
        text_scorer=f"judge:{self.path('judges', 'text')}",
        min_subject_score=p.min_subject_score, min_text_score=p.min_text_score,
        recaption_targets=p.recaption_targets and renderer == "expert",
        max_groups_per_subject=p.max_groups_per_subject if renderer == "expert" else 0)
    if renderer == "expert":
      # kwargs of suti_jax.experts.renderer.ExpertTargetRenderer, as the CLI's JSON.
      args.renderer_options = json.dumps(
          {"workdir": self.path("base"), "expert_cfg": self.cfg.experts.to_dict(),
           "sampling_cfg": {"num_steps": p.render_steps}})
      args.render_batch_size = p.render_batch_size
    summary = build_icl_groups.run_pipeline(args, ["--runner=DirectRunner"])
    return self._groups_outputs(summary, output, whole=len(parts) == 1)

  def merge_groups(self, version: str) -> dict[str, Any]:
    """Joins the outputs of the `version` pipeline's parts into the whole run's."""
    output = self.path(f"icl_{version}")
    summary = merge_parts.merge_parts(
        [self.path(folder) for _, folder in self.icl_parts(version)], output,
        ["--runner=DirectRunner"])
    return self._groups_outputs(summary, output, whole=True)

  @staticmethod
  def _groups_outputs(summary: dict[str, Any], output: str, whole: bool) -> dict[str, Any]:
    path = os.path.join(output, pipeline_write.SUMMARY_NAME)
    if whole and not summary["groups_written"]:
      raise RuntimeError(f"the {summary['options']['renderer']} pipeline wrote no ICL groups; "
                         f"see {path} for the drops")
    return {"paths": {"summary": path},
            "groups_written": summary["groups_written"], "drops": summary["drops"]}

  def train_suti(self, version: str) -> dict[str, Any]:
    cfg = copy.deepcopy(self.cfg.suti)
    if cfg.train.total_steps != self.cfg.suti_steps.v2:
      # `suti.train.total_steps` only mirrors `suti_steps.v2`; an override of it
      # alone would be ignored here.
      raise ValueError(f"suti.train.total_steps={cfg.train.total_steps} differs from "
                       f"suti_steps.v2={self.cfg.suti_steps.v2}: set the SuTI models' "
                       "steps with --config.suti_steps.v2 / --config.suti_steps.v1")
    cfg.train.total_steps = self.cfg.suti_steps[version]
    cfg.train.checkpoint_every_steps = max(1, cfg.train.total_steps // 4)
    cfg.init_from = self.path("base", "checkpoints")
    cfg.data.pattern = self.icl_pattern(version)
    if cfg.data.precomputed_embeddings:
      # SuTI starts from the base, so it reads the texts through the base's frozen T5.
      cfg.text.weights_path = self.path("base", "checkpoints", checkpoint_lib.TEXT_ENCODER_DIR)
      cfg.data.pattern = self._embed_groups(cfg, version)
    return _train(cfg, self.path(f"suti_{version}"), self.watcher)

  def _embed_groups(self, cfg: ml_collections.ConfigDict, version: str) -> str:
    """Writes the groups of `version` again with their texts' T5 embeddings (the
    `launch.embed_text` Beam stage) into the SuTI run's folder; returns their glob."""
    output = self.path(f"suti_{version}", "groups_embedded")
    text = config_lib.section(config_lib.TextEncoderConfig, cfg.text, "suti.text")
    embed_text.run_pipeline(cfg.data.pattern, output, text, batch_size=256,
                            beam_args=["--runner=DirectRunner"])
    return os.path.join(output, "icl-*")

  # Evaluation.
  def suti_stage(self, method: str, step: int | None = None) -> StageModel:
    """A trained SuTI model ('suti_v2' / 'suti_v1') that samples with this config's
    `suti.sampling`, not the one saved with the run: guidance is part of the
    evaluation stages' fingerprints, not the training's, so changing it renders
    again without retraining."""
    stage = load_stage(self.path(method), step=step)
    sampling = config_lib.section(config_lib.SamplingConfig, self.cfg.suti.sampling,
                                  "config.suti.sampling")
    return self.eval_stage(dataclasses.replace(
        stage, spec=dataclasses.replace(stage.spec, sampling=sampling)))

  def eval_stage(self, stage: StageModel) -> StageModel:
    """`stage` sampling with the evaluation's sampler (`eval.sampler`), which
    every method's held-out renders share."""
    sampling = dataclasses.replace(stage.spec.sampling, sampler=self.cfg.eval.sampler)
    return dataclasses.replace(stage, spec=dataclasses.replace(stage.spec, sampling=sampling))

  def base_stage(self) -> StageModel:
    """The text-to-image base as the text-only and DreamBooth baselines render with it."""
    return self.eval_stage(load_stage(self.path("base")))

  def generate(self, method: str) -> dict[str, Any]:
    key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), evaluate.METHODS.index(method))
    steps = self.cfg.eval.sampling_steps
    if method in ("suti_v2", "suti_v1"):
      out = evaluate.suti(self.suti_stage(method), self.eval_set, key, steps)
    elif method == "text_only":
      out = evaluate.text_only(self.base_stage(), self.eval_set, key, steps)
    else:
      out = evaluate.dreambooth_experts(self.base_stage(), self.eval_set,
                                        self.expert_config(), key, steps)
    path = self.images_path(method)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, images=out.images)
    return {"paths": {"images": path}}

  def images_path(self, method: str) -> str:
    """Where `generate(method)` writes the method's eval images (uint8 [N, H, W, 3])."""
    return self.path("eval", f"{method}.npz")

  def judges(self) -> tuple[judges_lib.SubjectJudge, judges_lib.TextJudge]:
    return (judges_lib.SubjectJudge.load(self.path("judges", "subject")),
            judges_lib.TextJudge.load(self.path("judges", "text")))

  def learning_curve(self, version: str) -> dict[str, Any]:
    """Held-out fidelity of SuTI at each of its saved training steps.

    The last step's images are the headline's (`generate`: same checkpoint, key
    and sampler), so they are read back rather than rendered again.
    """
    method = f"suti_{version}"
    key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), evaluate.METHODS.index(method))
    subject_judge, text_judge = self.judges()
    steps = checkpoint_lib.checkpoint_steps(self.path(method))
    points = []
    for step in steps:
      if step == steps[-1]:
        images = np.load(self.images_path(method))["images"]
      else:
        images = evaluate.suti(self.suti_stage(method, step), self.eval_set, key,
                               self.cfg.eval.sampling_steps).images
      scores = evaluate.score(images, self.eval_set, subject_judge, text_judge)
      points.append({"step": step, **{m: float(np.mean(scores[m])) for m in
                                      ("subject_fidelity", "subject_match", "text_fidelity")}})
    return {"points": points}

  def generated(self) -> dict[str, evaluate.Generated]:
    out = {"copy_exemplar": evaluate.copy_nearest_exemplar(self.eval_set),
           "ground_truth": evaluate.ground_truth(self.eval_set)}
    for method in ("suti_v2", "suti_v1", "dreambooth", "text_only"):
      out[method] = evaluate.Generated(np.load(self.images_path(method))["images"])
    return out

  def evaluate(self) -> dict[str, Any]:
    subject_judge, text_judge = self.judges()
    generated = self.generated()
    per_prompt = {m: evaluate.score(generated[m].images, self.eval_set, subject_judge,
                                    text_judge) for m in evaluate.METHODS}
    metrics = evaluate.aggregate(per_prompt, self.eval_set)
    path = self.path("eval", "metrics.json")
    with open(path, "w") as f:
      json.dump(metrics, f, indent=1, sort_keys=True)
    return {"paths": {"metrics": path}}

  def time_personalization(self) -> dict[str, Any]:
    """Seconds per subject to personalise with SuTI v2 (exemplars in context) and
    with a DreamBooth expert (class images, fine-tune, render), in steady state
    (`evaluate.time_personalization`); the stage runs alone."""
    key = jax.random.PRNGKey(self.cfg.seed)
    steps = self.cfg.eval.sampling_steps
    suti, base = self.suti_stage("suti_v2"), self.base_stage()
    expert_cfg = self.expert_config()
    methods = {
        "suti_v2": lambda subjects: evaluate.suti(suti, subjects, key, steps),
        "dreambooth": lambda subjects: evaluate.dreambooth_experts(base, subjects, expert_cfg,
                                                                   key, steps)}
    timed = self.cfg.eval.timed_subjects
    return {"seconds_per_subject": evaluate.time_personalization(methods, self.eval_set, timed),
            "timed_subjects": timed}

  def _marker(self, name: str) -> dict[str, Any]:
    with open(StageRunner(self.workdir).marker_path(name)) as f:
      return json.load(f)

  def write_report(self) -> dict[str, Any]:
    with open(self.path("eval", "metrics.json")) as f:
      metrics = json.load(f)
    prompts = evaluate.flat_prompts(self.eval_set)
    timing = self._marker("time_personalization")["outputs"]
    metrics.update(
        personalization_s=timing["seconds_per_subject"],
        personalization_timed_subjects=timing["timed_subjects"],
        judges=self._marker("train_judges")["outputs"]["report"],
        data={f"ICL {v}": {k: self._marker(f"icl_{v}")["outputs"][k]
                            for k in ("groups_written", "drops")} for v in ("v2", "v1")},
        stages={name: {k: v for k, v in self._marker(name).items()
                       if k in ("wall_s", "cpu_s", "compile_s", "start_time", "end_time")}
                for name in self.stage_names() if name != "report"},
        eval_set={"num_subjects": len(self.eval_set), "num_prompts": len(prompts),
                  "subjects": [s.subject_id for s in self.eval_set]},
        training={name: self._marker(name)["outputs"]["final"]
                  for name in ("train_base", "train_sr", "train_suti_v2", "train_suti_v1")},
        learning_curve={v: self._marker(f"curve_suti_{v}")["outputs"]["points"]
                        for v in ("v2", "v1")},
        scale=self.scale())
    generated = self.generated()
    grids, start = [], 0
    for subject in self.eval_set:
      rows = range(start, start + len(subject.prompts))
      start += len(subject.prompts)
      if len(grids) < self.cfg.eval.num_grid_subjects:
        cells = [[generated[m].images[r] for m in report.GRID_METHODS] for r in rows]
        texts = [prompts[r].prompt for r in rows]
        grids.append((subject.subject_id,
                      report.grid_image(subject.exemplar_images, cells, texts), texts))
    paths = report.write(self.report_dir, metrics, grids)
    return {"paths": paths}

  def scale(self) -> str:
    c = self.cfg
    return (f"{c.world.num_clusters} web clusters ({len(self.web)} pairs); base "
            f"{c.base.model.image_size} px x {c.base.train.total_steps} steps (batch "
            f"{c.base.train.batch_size}), SR {c.sr.model.low_res_size}->{c.sr.model.image_size} "
            f"px x {c.sr.train.total_steps}, SuTI v2 x {c.suti_steps.v2} and v1 x "
            f"{c.suti_steps.v1} steps (batch {c.suti.train.batch_size}), "
            f"experts {self.expert_config().num_steps} steps, "
            f"judges {c.judges.steps} steps, {c.eval.sampling_steps} sampling steps "
            f"({c.eval.sampler}).")

  # The recipe.
  def stages(self) -> list[Stage]:
    """The stages in order, each fingerprinted by its config and its inputs' fingerprints."""
    c = self.cfg.to_dict()
    experts = dataclasses.asdict(self.expert_config())
    world = {"seed": c["seed"], "world": c["world"], "judge_seed": c["judges"]["seed"],
             "identifier": experts["identifier"]}
    steps = [c["eval"]["sampling_steps"], c["eval"]["sampler"]]
    # SuTI's sampler settings fingerprint the stages that sample, not the training.
    suti_training = {k: v for k, v in c["suti"].items() if k != "sampling"}
    suti_sampling = [steps, c["suti"]["sampling"]]
    v2_parts = self.icl_parts("v2")
    v1_pipeline = {k: v for k, v in c["pipeline"].items() if k != "v2_parts"}
    folders = {**self.FOLDERS, **{name: (folder,) for name, folder in v2_parts}}
    specs: list[tuple[str, Callable[[], dict[str, Any]], Any, tuple[str, ...]]] = [
        ("web", self.write_web, world, ()),
        ("train_base", self.train_base, self.base_fingerprint(), ()),
        ("train_judges", self.train_judges, c["judges"], ()),
        *[(name, functools.partial(self.build_groups, "v2", "expert", part),
           [c["pipeline"], experts, part], ("web", "train_base", "train_judges"))
          for part, (name, _) in enumerate(v2_parts)],
        *([("icl_v2", lambda: self.merge_groups("v2"), None,
            tuple(name for name, _ in v2_parts))] if len(v2_parts) > 1 else []),
        ("icl_v1", lambda: self.build_groups("v1", "same_cluster"), v1_pipeline,
         ("web", "train_judges")),
        ("train_suti_v2", lambda: self.train_suti("v2"), [suti_training, c["suti_steps"]["v2"]],
         ("train_base", "icl_v2")),
        ("train_suti_v1", lambda: self.train_suti("v1"), [suti_training, c["suti_steps"]["v1"]],
         ("train_base", "icl_v1")),
        ("generate_suti_v2", lambda: self.generate("suti_v2"), suti_sampling, ("train_suti_v2",)),
        ("generate_suti_v1", lambda: self.generate("suti_v1"), suti_sampling, ("train_suti_v1",)),
        # The baselines render the held-out subjects: after "web", which checks them
        # disjoint from the training web, so the v2 pipeline's parts (the head of the
        # critical path) take both slots first and the baselines fill later slots.
        ("generate_dreambooth", lambda: self.generate("dreambooth"), [steps, experts],
         ("web", "train_base")),
        ("generate_text_only", lambda: self.generate("text_only"), steps,
         ("web", "train_base")),
        ("curve_suti_v2", lambda: self.learning_curve("v2"), suti_sampling,
         ("train_judges", "train_suti_v2", "generate_suti_v2")),
        ("curve_suti_v1", lambda: self.learning_curve("v1"), suti_sampling,
         ("train_judges", "train_suti_v1", "generate_suti_v1")),
        # The SR stage feeds only the report: it runs in a free slot late, not
        # ahead of the v2 pipeline, the head of the critical path.
        ("train_sr", self.train_sr, self.sr_fingerprint(), ("web",)),
        ("time_personalization", self.time_personalization,
         [suti_sampling, experts, c["eval"]["timed_subjects"]], ("train_base", "train_suti_v2")),
        ("evaluate", self.evaluate, None,
         ("train_judges", "generate_suti_v2", "generate_suti_v1", "generate_dreambooth",
          "generate_text_only")),
    ]
    # The report reads every stage's marker (train_sr's too, which no other stage needs).
    specs.append(("report", self.write_report, [self.report_dir, c["eval"]],
                  tuple(name for name, *_ in specs)))
    fingerprints, out = {}, []
    # The base and the judges depend on their own configs only, so a changed
    # world keeps them (and the shipped base stays valid).
    independent = ("train_base", "train_judges")
    for name, fn, own, deps in specs:
      fingerprints[name] = [own, [fingerprints[d] for d in deps]]
      if name not in independent:
        fingerprints[name].append(world)
      out.append(Stage(name, fn, fingerprints[name], deps, folders.get(name, ()),
                       exclusive=name in self.EXCLUSIVE))
    return out

  def stage_names(self) -> list[str]:
    return [s.name for s in self.stages()]


def run(config: ml_collections.ConfigDict, workdir: str, report_dir: str = "reports/demo", *,
        retrain: Collection[str] = (),
        save_to: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
  """Runs (or resumes) the demo.

  Args:
    config: `configs/demo.py` config.
    workdir: intermediate outputs, checkpoints and done-markers.
    report_dir: where REPORT.md, metrics.json and the grids go.
    retrain: shipped artefacts (`SHIPPED`) to train even where they fit.
    save_to: artefact name -> folder to write it to as a shipped artefact after training.

  Returns:
    stage name -> marker (outputs, wall_s, skipped).
  """
  # Workdir-local by default: a re-run whose changed stages reuse programs
  # (same shapes, same code) loads them instead of compiling again.
  compile_cache.enable(os.path.join(workdir, "jax_cache"))
  watcher = preemption.PreemptionWatcher().install()
  try:
    demo = Demo(config, workdir, report_dir, watcher, retrain=retrain, save_to=save_to)
    return StageRunner(demo.workdir).run(demo.stages(), workers=config.get("workers", 1))
  finally:
    watcher.close()
