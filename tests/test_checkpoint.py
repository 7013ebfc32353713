"""Checkpoints: bitwise round trip, restore onto other meshes, exact resume,
the NaN halt that keeps the last good checkpoint, SIGTERM -> save, exit 0, resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax.config import MeshConfig
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import experiment
from suti_jax.train import loop
from suti_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if '"train/loss"' in line]
  return {r["step"]: r["train/loss"] for r in rows}


def test_round_trip_and_restore_onto_other_meshes(tmp_path):
  exp = experiment.build(experiment.sections(tl.micro_config()))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=8))
  _, shardings = state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=2)
  ckpt.save(7, state, data_iter={"position": 3}, config={"a": 1}, meta={"stage": "x"})
  ckpt.wait()
  host = jax.device_get(state)
  targets = [MeshConfig(ici_data=1, ici_fsdp=8), MeshConfig(ici_data=2, ici_fsdp=4)]
  for cfg, devices in [(targets[0], None), (targets[1], None),
                       (MeshConfig(), jax.devices()[:1])]:
    other = mesh_lib.make_mesh(cfg, devices=devices)
    abstract, _ = state_lib.abstract_sharded_state(exp.init, other, exp.sec.rules)
    restored, data_iter, meta = ckpt.restore(abstract)
    assert data_iter == {"position": 3} and meta == {"stage": "x"}
    for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(host), jax.tree.leaves(abstract)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
      assert a.sharding == t.sharding
  assert ckpt.latest_step() == 7
  ckpt.close()


def test_exact_resume_matches_uninterrupted_run(tmp_path):
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  out = loop.run(tl.micro_config(total_steps=4), whole, input_source=tl.caption_source())
  assert out["step"] == 4 and not out["preempted"]
  loop.run(tl.micro_config(total_steps=2), split, input_source=tl.caption_source())
  loop.run(tl.micro_config(total_steps=4), split, input_source=tl.caption_source())
  assert _losses(whole) == _losses(split) and sorted(_losses(split)) == [1, 2, 3, 4]
  exp = experiment.build(experiment.sections(tl.micro_config()))
  abstract, _ = state_lib.abstract_sharded_state(
      exp.init, mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=8)), exp.sec.rules)
  states = [checkpoint_lib.Checkpointer(os.path.join(w, "checkpoints"), every_steps=0, keep=3)
            for w in (whole, split)]
  a, b = [jax.device_get(c.restore(abstract, 4)[0]) for c in states]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  for c in states:
    c.close()


def test_resume_from_a_checkpoint_with_t5_in_its_state(tmp_path):
  """A run resumed from the old layout (T5 inside the state item) continues with
  that T5, exactly as if uninterrupted, and from then on keeps it in text_encoder/."""
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  loop.run(tl.micro_config(total_steps=4), whole, input_source=tl.caption_source())
  loop.run(tl.micro_config(total_steps=2), split, input_source=tl.caption_source())
  directory = os.path.join(split, "checkpoints")
  exp = experiment.build(experiment.sections(tl.micro_config()))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=8))
  abstract, _ = state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=0, keep=3)
  state, data_iter, meta = ckpt.restore(abstract, 2)
  ckpt.close()
  text = checkpoint_lib.load_text_params(directory, experiment.abstract_text(exp, mesh))
  config = checkpoint_lib.read_config(directory)[0]
  for name in ("2", checkpoint_lib.TEXT_ENCODER_DIR):
    shutil.rmtree(os.path.join(directory, name))
  tl.write_legacy_checkpoint(directory, 2, state, text, data_iter=data_iter, config=config,
                             meta=meta)
  loop.run(tl.micro_config(total_steps=4), split, input_source=tl.caption_source())
  assert _losses(whole) == _losses(split) and sorted(_losses(split)) == [1, 2, 3, 4]
  assert os.path.isdir(os.path.join(directory, checkpoint_lib.TEXT_ENCODER_DIR))


def test_non_finite_step_halts_and_keeps_last_good_checkpoint(tmp_path):
  config = tl.micro_config(total_steps=4, checkpoint_every_steps=1)
  config.optimizer.learning_rate = 1e38  # Step 1 is finite, its update overflows step 2.
  with pytest.raises(loop.NonFiniteError, match="at step 2"):
    loop.run(config, str(tmp_path), input_source=tl.caption_source())
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), every_steps=0, keep=3)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  exp = experiment.build(experiment.sections(config))
  abstract, _ = state_lib.abstract_sharded_state(
      exp.init, mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=8)), exp.sec.rules)
  state, _, _ = ckpt.restore(abstract)
  assert int(state.step) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  ckpt.close()


def test_unevenly_sharded_params_stop_the_run_unless_allowed(tmp_path, monkeypatch):
  # The micro UNet on fsdp=8 leaves most arrays replicated (8-channel kernels, biases);
  # treated as paper size, the trainer refuses it before writing anything.
  monkeypatch.setattr(sharding_lib, "RAISE_ABOVE_PARAM_BYTES", 0)
  config = tl.micro_config(total_steps=1)
  with pytest.raises(sharding_lib.UnshardedParamsError,
                     match="more bytes per device.*--allow_unsharded_params"):
    loop.run(config, str(tmp_path / "strict"), input_source=tl.caption_source())
  assert not (tmp_path / "strict" / "checkpoints").exists()
  out = loop.run(config, str(tmp_path / "allowed"), input_source=tl.caption_source(),
                 allow_unsharded_params=True)
  assert out["step"] == 1.0


def test_loop_writes_metrics_sample_grids_and_tensorboard_images(tmp_path):
  config = tl.micro_config(total_steps=2, log_every_steps=1, sample_every_steps=2,
                           checkpoint_every_steps=2)
  loop.run(config, str(tmp_path), input_source=tl.caption_source())
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  scalars = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in scalars] == [1, 2]
  for key in ("train/grad_norm", "train/lr", "perf/step_s", "perf/examples_per_s",
              "perf/tflops_per_device", "perf/mfu"):
    assert np.isfinite(scalars[-1][key]), key
  # The PNG grid: NUM_SAMPLES images of the stage's size, 2x2.
  size = config.model.image_size
  grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
  assert grid.shape == (2 * size, 2 * size, 3) and grid.dtype == np.uint8
  assert grid.std() > 0  # Samples, not a blank canvas.
  # The same grid as a TensorBoard image summary at step 2 (clu writes images as
  # tensor summaries).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  events = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  assert "samples" in events.Tags()["tensors"], events.Tags()
  assert [e.step for e in events.Tensors("samples")] == [2]


def _train_cmd(workdir, total_steps):
  overrides = {"model.base_channels": 8, "model.channel_mults": "(1,2)",
               "model.num_res_blocks": "(1,1)", "text.num_layers": 1, "text.max_length": 8,
               "train.batch_size": 2, "train.log_every_steps": 1,
               "train.checkpoint_every_steps": 1000, "train.total_steps": total_steps,
               "optimizer.warmup_steps": 0}
  return ([sys.executable, "-m", "launch.train", "--config=configs/imagen_base64.py:tiny",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_train_cmd(workdir, 100000), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and '"train/loss"' in metrics.read_text():
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  stopped = int(re.search(r"preempted at step (\d+)", out).group(1))
  assert os.path.isdir(workdir / "checkpoints" / str(stopped))
  done = subprocess.run(_train_cmd(workdir, stopped + 1), cwd=ROOT, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:]
  assert f"done at step {stopped + 1}" in done.stdout
  assert "resumed from" in done.stdout
