"""One Orbax CheckpointManager per stage directory with items `state` (sharded
arrays), `data_iter`, `config` and `meta` (JSON); async, atomic saves and
restores straight into the target shardings of any mesh.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from suti_jax.train.state import TrainState

ITEMS = ("state", "data_iter", "config", "meta")


class Checkpointer:
  """Saves and restores train states under `directory` (one dir per stage).

  Orbax writes each step to a temporary directory and renames it when every
  item is complete, so `latest_step()` never names a partial checkpoint.
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: e.g. '<workdir>/checkpoints'.
      every_steps: periodic save interval; 0 = only forced saves.
      keep: checkpoints to keep (oldest deleted first).
      async_save: write in a background thread after the device-to-host copy.
    """
    self.directory = os.path.abspath(directory)
    self._every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        save_interval_steps=1)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """True on periodic save steps."""
    return self._every_steps > 0 and step % self._every_steps == 0

  def save(self, step: int, state: TrainState, *, data_iter: dict[str, Any],
           config: dict[str, Any], meta: dict[str, Any]) -> None:
    """Starts saving `state` as checkpoint `step` (returns before it is written).

    Args:
      step: the number of updates in `state`.
      state: the sharded TrainState; every process passes its shards.
      data_iter: the input iterator's JSON state after this step's batch.
      config: the whole config as JSON-friendly dict.
      meta: git hash, mesh, stage, ...
    """
    if step in self._manager.all_steps():
      return  # Already saved (e.g. a preemption right after a periodic save).
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=ocp.args.JsonSave(data_iter),
        config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: TrainState,
              step: int | None = None) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """Restores a checkpoint onto the shardings in `abstract_state`.

    Args:
      abstract_state: ShapeDtypeStructs with the target shardings (any mesh).
      step: default the latest.

    Returns:
      (state, data_iter state, meta).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data_iter"], out["meta"]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, abstract_params: Any, *, use_ema: bool = False) -> Any:
  """Reads only the (EMA) params of the latest checkpoint in `directory`.

  Used by `init_from` (SuTI from an Imagen run): the other state fields of the
  source run (optimizer, text encoder) are not needed.

  Args:
    directory: a Checkpointer directory.
    abstract_params: ShapeDtypeStructs (with shardings) of the source params.
    use_ema: read `ema_params` instead of `params`.

  Returns:
    The params tree laid out per `abstract_params`.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from: checkpoint directory {directory!r} does not exist")
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"init_from: no complete checkpoint in {directory!r}")
  field = "ema_params" if use_ema else "params"
  target = {field: abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
          partial_restore=True)))
  manager.close()
  logging.info("init_from: %s params of %s step %d", field, directory, step)
  return restored["state"][field]


def git_hash() -> str:
  """The source tree's git commit, or '' outside a git checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""
