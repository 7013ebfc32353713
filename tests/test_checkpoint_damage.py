"""Damaged or half-written checkpoints: one clear error naming the step and the
earlier steps, `train.restore_step` to resume from one, partial saves removed."""

import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _State(struct.PyTreeNode):
  """A dataclass state, like TrainState: its restore needs the _METADATA file."""

  w: jax.Array
  b: jax.Array


def _shardings():
  mesh = Mesh(np.array(jax.devices()), ("x",))
  return _State(w=NamedSharding(mesh, PartitionSpec("x")), b=NamedSharding(mesh, PartitionSpec()))


def _save_steps(directory, steps):
  """A small sharded tree saved at `steps`; returns its abstract target."""
  shardings = _shardings()
  tree = _State(w=jax.device_put(jnp.arange(8 * 1024, dtype=jnp.float32).reshape(8, 1024),
                                 shardings.w),
                b=jax.device_put(jnp.ones(3), shardings.b))
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=5)
  for step in steps:
    ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, tree), data_iter={"position": step},
              config={}, meta={})
  ckpt.close()
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _halve_data_files(step_dir):
  """Cuts each OCDBT data file of the `state` item in half (a copy cut short).

  Every file, not just the largest: which file a given array lives in varies.
  """
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(d) == "d":
      for f in files:
        os.truncate(os.path.join(d, f), os.path.getsize(os.path.join(d, f)) // 2)


def test_damaged_latest_step_names_it_and_the_earlier_steps(tmp_path):
  directory = str(tmp_path / "checkpoints")
  abstract = _save_steps(directory, [1, 2, 3])
  _halve_data_files(os.path.join(directory, "3"))
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=0, keep=5)
  with pytest.raises(checkpoint_lib.CheckpointError) as err:
    ckpt.restore(abstract)
  message = str(err.value)
  assert f"checkpoint step 3 ({os.path.join(directory, '3')}) cannot be restored" in message
  assert "earlier steps available: [1, 2]" in message
  assert "--config.train.restore_step=2" in message
  assert "tensorstore_spec" not in message and "\n" not in message
  state, data_iter, _ = ckpt.restore(abstract, 2)
  assert data_iter == {"position": 2} and float(state.w[0, 0]) == 2.0
  ckpt.close()


def test_missing_metadata_names_the_step(tmp_path):
  directory = str(tmp_path / "checkpoints")
  abstract = _save_steps(directory, [1])
  os.remove(os.path.join(directory, "1", "state", "_METADATA"))
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=0, keep=5)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"checkpoint step 1 \(.*/checkpoints/1\) cannot be restored.*"
                           r"no earlier step is available"):
    ckpt.restore(abstract)
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"no checkpoint step 5 .* \[1\]"):
    ckpt.restore(abstract, 5)
  ckpt.close()


def test_partial_saves_are_removed_at_start_up_with_a_log_line(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _save_steps(str(directory), [1])
  partial = directory / "2.orbax-checkpoint-tmp-1712345678"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"x" * 10)
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoint_lib.Checkpointer(str(directory), every_steps=0, keep=5)
  assert not partial.exists() and (directory / "1").is_dir()
  assert f"removed {partial}" in caplog.text
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_discard_after_moves_later_steps_aside(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [1, 2, 3])
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=0, keep=5)
  assert ckpt.discard_after(1) == [2, 3]
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  (moved,) = os.listdir(tmp_path / checkpoint_lib.DISCARDED_DIR)
  assert sorted(os.listdir(tmp_path / checkpoint_lib.DISCARDED_DIR / moved)) == ["2", "3"]
  assert ckpt.discard_after(1) == []
  ckpt.close()


def test_damaged_run_fails_in_one_line_and_resumes_from_restore_step(tmp_path):
  """End to end: the CLI names the damaged step in one line with no traceback of its
  own, and restore_step=1 continues from step 1, setting the damaged step 2 aside."""
  workdir = str(tmp_path / "run")
  config = tl.micro_config(total_steps=2, checkpoint_every_steps=1)
  loop.run(config, workdir, input_source=tl.caption_source())
  _halve_data_files(os.path.join(workdir, "checkpoints", "2"))
  # tl.micro_config as flags (the launcher reads only config files).
  micro = ["--config.model.base_channels=8", "--config.text.num_layers=1",
           "--config.text.max_length=8", "--config.mesh.ici_data=1", "--config.mesh.ici_fsdp=-1",
           "--config.train.total_steps=2"]
  out = subprocess.run([sys.executable, "-m", "launch.train",
                        "--config=configs/imagen_base64.py:tiny", f"--workdir={workdir}", *micro],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  step_dir = os.path.join(workdir, "checkpoints", "2")
  assert f"checkpoint step 2 ({step_dir}) cannot be restored" in out.stderr
  assert "--config.train.restore_step=1" in out.stderr
  assert out.stderr.count("FATAL CheckpointError") == 1
  # No traceback of ours: the error is one line. TensorStore may still complete the
  # failed restore's other reads after Orbax closed its event loop, and each such
  # read prints an asyncio 'Event loop is closed' traceback from its own thread,
  # framed in asyncio only (a race in the libraries, not something the CLI raises).
  for frame in re.findall(r'File "([^"]+)"', out.stderr):
    assert "asyncio" in frame, (frame, out.stderr)

  config = tl.micro_config(total_steps=3, checkpoint_every_steps=1, restore_step=1)
  result = loop.run(config, workdir, input_source=tl.caption_source())
  assert result["step"] == 3
  # The input's counters join the logged scalars (here: nothing skipped).
  assert result["data/skipped_records"] == 0 and result["data/damaged_files"] == 0
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=0, keep=5)
  assert ckpt.all_steps() == [1, 2, 3]  # Step 2 written again, from step 1.
  ckpt.close()
  assert os.listdir(os.path.join(workdir, checkpoint_lib.DISCARDED_DIR))
