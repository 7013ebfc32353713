"""One Orbax CheckpointManager per stage directory with items `state` (sharded
arrays), `data_iter`, `config` and `meta` (JSON); async, atomic saves and
restores straight into the target shardings of any mesh.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, NamedTuple

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
    directory: a Checkpointer directory or the workdir holding it.
    abstract_params: ShapeDtypeStructs (with shardings) of the source params.
    use_ema: read `ema_params` instead of `params`.

  Returns:
    The params tree laid out per `abstract_params`.
  """
  loaded = load_params(directory, abstract_params, use_ema=use_ema)
  logging.info("init_from: %s params of %s step %d", "ema_params" if use_ema else "params",
               directory, loaded.step)
  return loaded.params


def checkpoint_directory(path: str) -> str:
  """`<path>/checkpoints` when `path` is a training workdir, else `path` itself (absolute)."""
  nested = os.path.join(path, "checkpoints")
  directory = nested if os.path.isdir(nested) else path
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  return os.path.abspath(directory)


def _read_only_step(path: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """A read-only manager on `path`'s checkpoints and the step to read (default latest)."""
  directory = checkpoint_directory(path)
  manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  if not steps:
    manager.close()
    raise FileNotFoundError(f"no complete checkpoint in {directory!r}")
  step = steps[-1] if step is None else step
  if step not in steps:
    manager.close()
    raise FileNotFoundError(f"step {step} not in {directory!r}; steps: {steps}")
  return manager, step


def read_config(path: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """The `config` JSON item of a checkpoint.

  Args:
    path: a workdir or its `checkpoints` directory.
    step: default the latest.

  Returns:
    (the config as the trainer saved it, the step read).
  """
  manager, step = _read_only_step(path, step)
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  return dict(config["config"]), step


class LoadedParams(NamedTuple):
  """What `load_params` read: UNet params, text params (or None) and their step."""

  params: Any
  text_params: Any
  step: int


def load_params(path: str, abstract_params: Any, *, use_ema: bool,
                abstract_text_params: Any = None, step: int | None = None) -> LoadedParams:
  """Reads a trained stage's params, and nothing else, onto the given shardings.

  The one way to restore params for sampling, export, experts and `init_from`:
  the optimizer state stays on disk, so callers never build an optimizer.

  Args:
    path: a workdir or its `checkpoints` directory.
    abstract_params: ShapeDtypeStructs with shardings of the UNet params (any mesh).
    use_ema: read `ema_params` (what the trainer samples with) instead of `params`.
    abstract_text_params: also read the frozen T5 params onto these; None = skip.
    step: default the latest.

  Returns:
    LoadedParams laid out per the abstract trees.
  """
  manager, step = _read_only_step(path, step)
  field = "ema_params" if use_ema else "params"
  target = {field: abstract_params}
  if abstract_text_params is not None:
    target["text_params"] = abstract_text_params
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target,
      restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
      partial_restore=True)))["state"]
  manager.close()
  return LoadedParams(restored[field], restored.get("text_params"), step)


def git_hash() -> str:
  """The source tree's git commit, or '' outside a git checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""
