"""The training loop of one cascade stage: mesh, sharded state, resume (own
checkpoint -> init_from -> scratch), compiled step, metrics read one step late,
checkpoints, sample grids, the NaN halt and preemption.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from suti_jax import compile_cache
from suti_jax.data import input as input_lib
from suti_jax.data import synthetic
from suti_jax.models import surgery
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import tokenizers
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import experiment as experiment_lib
from suti_jax.train import metrics as metrics_lib
from suti_jax.train import preemption as preemption_lib
from suti_jax.train import samples as samples_lib
from suti_jax.train import step as step_lib
from suti_jax.train.state import TrainState, create_state

# Synthetic caption examples per epoch when run() gets no `input_source`.
SYNTHETIC_EPOCH_EXAMPLES = 512
# Images per periodic sample grid.
NUM_SAMPLES = 4
# Allowed excess of per-device param bytes over an even fsdp x tensor split
# (replicated norms and biases); above it the run logs a warning.
SHARDING_TOLERANCE = 0.1


class NonFiniteError(FloatingPointError):
  """A step produced a NaN/Inf loss or gradient norm; its update was not applied."""


def _input(exp: experiment_lib.Experiment, source: Any) -> input_lib.InputIterator:
  """This process's share of the input (make_input splits by process)."""
  sec = exp.sec
  if sec.data.kind == "synthetic" and source is None:
    if experiment_lib.max_exemplars(sec) is not None:
      raise ValueError("data.kind='synthetic' for a SuTI stage needs run(input_source=...)")
    source = lambda: synthetic.caption_dataset(  # noqa: E731
        sec.data.seed, sec.model.image_size, range(sec.data.num_subjects),
        num_examples=SYNTHETIC_EPOCH_EXAMPLES)
  return input_lib.make_input(
      sec.data, image_size=sec.model.image_size, text_len=sec.text.max_length,
      max_exemplars=experiment_lib.max_exemplars(sec),
      batch_size=experiment_lib.per_process_batch_size(sec, jax.process_count()),
      tokenizer=tokenizers.build_tokenizer(sec.text), process_index=jax.process_index(),
      process_count=jax.process_count(), seed=sec.train.seed, source=source,
      text_dim=sec.text.d_model if experiment_lib.precomputed(sec) else None)


def _text_params(exp: experiment_lib.Experiment, ckpt: checkpoint_lib.Checkpointer,
                 abstract_text: Any) -> Any:
  """The step's frozen T5: the one this run saved (or an older run kept in its
  state), else `text.weights_path` or the seed's random init, saved once."""
  if abstract_text is None:
    return None  # Precomputed embeddings: the run holds no T5.
  text = None
  if ckpt.latest_step() is not None:
    text = checkpoint_lib.load_text_params(ckpt.directory, abstract_text, ckpt.latest_step())
  if text is None:
    text = experiment_lib.create_text_params(exp, abstract_text)
  ckpt.save_text_encoder(text)
  return text


def _init_from(exp: experiment_lib.Experiment, state: TrainState,
               abstract: TrainState) -> TrainState:
  """SuTI from an Imagen run: Imagen's EMA weights fill every non-exemplar param."""
  imagen_cfg = dataclasses.replace(exp.sec.model, exemplar=None)
  imagen = nn.unbox(jax.eval_shape(
      lambda k: unet_lib.init_params(imagen_cfg, k, exp.sec.text.max_length)["params"],
      jax.random.PRNGKey(0)))
  suti = {jax.tree_util.keystr(p): x.sharding
          for p, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
  target = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=suti[jax.tree_util.keystr(p)]),
      imagen)
  source = checkpoint_lib.restore_params(exp.sec.init_from, target, use_ema=True)
  params = surgery.suti_from_imagen(source, state.params)
  # A separate copy: the donated train step must not see one buffer twice.
  return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


def _initial_state(exp: experiment_lib.Experiment, ckpt: checkpoint_lib.Checkpointer,
                   abstract: TrainState, shardings: TrainState,
                   data: input_lib.InputIterator) -> tuple[TrainState, int]:
  """Resume order: own checkpoint in workdir (latest or train.restore_step) ->
  init_from -> scratch."""
  restore_step, latest = exp.sec.train.restore_step, ckpt.latest_step()
  if restore_step < 0:
    raise checkpoint_lib.CheckpointError(
        f"train.restore_step={restore_step}: use 0 (the latest) or one of the saved steps "
        f"{ckpt.all_steps()} in {ckpt.directory}")
  if latest is not None:
    step = restore_step or latest
    state, data_state, _ = ckpt.restore(abstract, step)
    ckpt.discard_after(step)
    data.set_state(data_state)
    logging.info("resumed from %s step %d", ckpt.directory, step)
    return state, step
  if restore_step:
    raise checkpoint_lib.CheckpointError(
        f"train.restore_step={restore_step}: no checkpoint in {ckpt.directory}")
  state = create_state(exp.init, shardings, jax.random.PRNGKey(exp.sec.train.seed), exp.sec.rules)
  if exp.sec.init_from:
    state = _init_from(exp, state, abstract)
  return state, 0


@dataclasses.dataclass
class _Run:
  """What the loop body needs besides the state."""

  exp: experiment_lib.Experiment
  mesh: Mesh
  compiled: Any
  data: input_lib.InputIterator
  ckpt: checkpoint_lib.Checkpointer
  writer: metric_writers.MetricWriter
  watcher: preemption_lib.PreemptionWatcher
  throughput: metrics_lib.Throughput
  config_json: dict[str, Any]
  meta: dict[str, Any]
  workdir: str
  text_params: Any = None  # The step's frozen T5; None with precomputed embeddings.
  sampler: Any = None


def _report(run: _Run, step: int, metrics: dict[str, jax.Array]) -> dict[str, float] | None:
  """Halts on a non-finite step; writes the scalars on log steps.

  Called one step late, so reading the flag waits only for a step the device
  has already finished while the next one is queued.
  """
  if not bool(jax.device_get(metrics["train/finite"])):
    raise NonFiniteError(
        f"non-finite loss or gradient norm at step {step}: update not applied, nothing "
        f"saved; latest complete checkpoint: step {run.ckpt.latest_step()} in {run.ckpt.directory}")
  train = run.exp.sec.train
  if step % train.log_every_steps and step != train.total_steps:
    return None
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  scalars.update(run.throughput.measure(step))
  scalars.update(run.data.stats())  # Skipped corrupt records and damaged files.
  run.writer.write_scalars(step, scalars)
  return scalars


def _write_samples(run: _Run, state: TrainState, batch: dict[str, jax.Array], step: int) -> None:
  if run.sampler is None:
    run.sampler = samples_lib.make_sampler(run.exp, run.mesh, NUM_SAMPLES)
  key = jax.random.fold_in(jax.random.PRNGKey(run.exp.sec.train.seed + 1), step)
  grid = metrics_lib.image_grid(np.asarray(run.sampler(state, run.text_params, batch, key)))
  run.writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    metrics_lib.save_png(grid, os.path.join(run.workdir, "samples", f"step_{step:08d}.png"))


def _train(run: _Run, state: TrainState, start: int) -> dict[str, float]:
  """Steps from `start` to total_steps (or a preemption); returns the last scalars."""
  train, rules = run.exp.sec.train, run.exp.sec.rules
  pending, last, step = None, {}, start
  run.throughput.start(start)
  progress = tqdm.tqdm(total=train.total_steps, initial=start, disable=jax.process_index() > 0)
  for step in range(start + 1, train.total_steps + 1):
    batch = sharding_lib.global_batch(next(run.data), run.mesh, rules)
    state, metrics = run.compiled(state, batch, run.text_params)
    if pending is not None:
      last = _report(run, *pending) or last
    pending = (step, metrics)
    stop = run.watcher.should_stop(step)
    if run.ckpt.should_save(step) or step == train.total_steps or stop:
      last = _report(run, *pending) or last  # Never save after a non-finite step.
      pending = None
      run.ckpt.save(step, state, data_iter=run.data.get_state(), config=run.config_json,
                    meta=run.meta)
    if train.sample_every_steps > 0 and step % train.sample_every_steps == 0:
      _write_samples(run, state, batch, step)
    progress.update(1)
    if stop:
      logging.warning("preempted: saved step %d in %s; exiting", step, run.ckpt.directory)
      break
  if pending is not None:
    last = _report(run, *pending) or last
  progress.close()
  return {"step": float(step), "preempted": float(step < train.total_steps), **last}


def _meta(sec: experiment_lib.Sections, mesh: Mesh) -> dict[str, Any]:
  return {"git": checkpoint_lib.git_hash(), "stage": sec.stage,
          "mesh": dict(mesh.shape), "mesh_description": mesh_lib.describe(mesh),
          "process_count": jax.process_count()}


def run(config: ml_collections.ConfigDict, workdir: str, *, input_source: Any = None,
        watcher: preemption_lib.PreemptionWatcher | None = None,
        allow_unsharded_params: bool = False) -> dict[str, float]:
  """Trains one stage; resumes from `<workdir>/checkpoints` if present.

  Args:
    config: a `configs/*.py` config (converted to typed sections once here).
    workdir: checkpoints, `metrics.jsonl`, TensorBoard events, samples.
    input_source: in-memory examples for data.kind='synthetic' (see
      `suti_jax.data.input.make_input`); default: synthetic captions.
    watcher: preemption watcher; default one with a SIGTERM handler.
    allow_unsharded_params: train even when parameters of 1 GiB or more are
      split over fsdp x tensor more than 10% less evenly than an even split
      (the check then only warns).

  Returns:
    The last logged scalars plus 'step' and 'preempted' (1.0 if stopped early).
  """
  sec = experiment_lib.sections(config)
  exp = experiment_lib.build(sec)
  mesh = mesh_lib.make_mesh(sec.mesh)
  shapes = experiment_lib.sharded_shapes(exp, mesh)
  logging.info("stage %s; mesh %s; %d params; text embeddings %s", sec.stage,
               mesh_lib.describe(mesh), sum(x.size for x in jax.tree.leaves(shapes.state.params)),
               "precomputed" if shapes.text is None else "encoded in the step")
  try:
    sharding_lib.assert_params_sufficiently_sharded(
        shapes.state.params, mesh, tolerance=SHARDING_TOLERANCE,
        raise_error=not allow_unsharded_params,
        raise_above_bytes=sharding_lib.RAISE_ABOVE_PARAM_BYTES)
  except sharding_lib.UnshardedParamsError as e:
    raise sharding_lib.UnshardedParamsError(
        f"{e}; to train anyway: launch.train --allow_unsharded_params") from None
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     every_steps=sec.train.checkpoint_every_steps,
                                     keep=sec.train.keep_checkpoints)
  data = _input(exp, input_source)
  own_watcher = watcher is None
  if own_watcher:
    watcher = preemption_lib.PreemptionWatcher(sec.train.log_every_steps).install()
  writer = metrics_lib.make_writer(workdir)
  try:
    text_params = _text_params(exp, ckpt, shapes.text)
    with compile_cache.one_at_a_time():
      state, start = _initial_state(exp, ckpt, shapes.state, shapes.shardings, data)
      compiled = step_lib.compile_train_step(exp.step_fn, shapes.state, shapes.batch,
                                             shapes.text, mesh, sec.rules)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                             sec.train.peak_flops_per_device)
    flops = metrics_lib.train_step_flops(compiled, sec.optimizer.grad_accum_steps)
    logging.info("step: %.3g FLOPs per device; memory %s", flops,
                 metrics_lib.memory_summary(compiled))
    config_json = json.loads(config.to_json_best_effort())
    writer.write_hparams({k: str(v) for k, v in config_json.items()})
    run_ = _Run(exp=exp, mesh=mesh, compiled=compiled, data=data, ckpt=ckpt, writer=writer,
                watcher=watcher, throughput=metrics_lib.Throughput(sec.train.batch_size, flops, peak),
                config_json=config_json, meta=_meta(sec, mesh), workdir=workdir,
                text_params=text_params)
    return _train(run_, state, start)
  finally:
    ckpt.close()
    writer.close()
    if own_watcher:
      watcher.close()
