"""One Orbax CheckpointManager per stage directory with items `state` (sharded
arrays), `data_iter`, `config` and `meta` (JSON), plus the run's frozen T5 saved
once beside the steps; async, atomic saves and restores straight into the
target shardings of any mesh.
"""

from __future__ import annotations

import glob
import logging as py_logging
import os
import shutil
import subprocess
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from suti_jax.models.text import weights
from suti_jax.train.state import TrainState

ITEMS = ("state", "data_iter", "config", "meta")
# Inside the checkpoint directory (Orbax's step listing skips it): the frozen T5
# of a run that encodes text in the step, written once, read by every sampler.
TEXT_ENCODER_DIR = "text_encoder"
# The field where checkpoints written before the T5 left the TrainState keep it.
LEGACY_TEXT_FIELD = "text_params"
# Orbax writes step N to 'N<suffix>' and renames it when complete; one left
# behind is a save cut short by a crash.
PARTIAL_SAVE_GLOB = "*.orbax-checkpoint-tmp*"
# Next to the checkpoint directory: steps after a chosen `restore_step`.
DISCARDED_DIR = "discarded_checkpoints"
# Characters of Orbax's error kept in CheckpointError (TensorStore appends
# kilobytes of JSON spec).
MAX_CAUSE_CHARS = 400


class CheckpointError(RuntimeError):
  """A checkpoint step cannot be restored: damaged, incomplete or not there."""


class Checkpointer:
  """Saves and restores train states under `directory` (one dir per stage).

  Orbax writes each step to a temporary directory and renames it when every
  item is complete, so `latest_step()` never names a partial checkpoint.
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    """Opens (or creates) the checkpoint directory of the run that writes it.

    Deletes step directories a crashed save left half-written, so a reader of
    another run's checkpoints uses `load_params` / `read_config` instead.

    Args:
      directory: e.g. '<workdir>/checkpoints'.
      every_steps: periodic save interval; 0 = only forced saves.
      keep: checkpoints to keep (oldest deleted first).
      async_save: write in a background thread after the device-to-host copy.
    """
    self.directory = os.path.abspath(directory)
    self._every_steps = every_steps
    if jax.process_index() == 0:
      _remove_partial_saves(self.directory)
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
        state=ocp.args.PyTreeSave(state), data_iter=ocp.args.JsonSave(data_iter),
        config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: TrainState,
              step: int | None = None) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """Restores a checkpoint onto the shardings in `abstract_state`.

    Args:
      abstract_state: ShapeDtypeStructs with the target shardings (any mesh).
      step: default the latest.

    Returns:
      (state, data_iter state, meta).

    Raises:
      FileNotFoundError: the directory holds no complete checkpoint.
      CheckpointError: `step` is not there or cannot be read; the message
        names its directory and the other steps, to pass as
        `--config.train.restore_step`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"no checkpoint step {step} in {self.directory}; steps there: {steps}")
    cause = None
    try:
      # Partial: a checkpoint from before the T5 left the state also holds
      # `text_params` (`load_text_params` reads them).
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=_partial_restore(abstract_state), data_iter=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
      _check_restored(out["state"])
    # Orbax and TensorStore raise ValueError, KeyError, OSError, ... for
    # damaged files, and tree errors for a missing _METADATA: any of them means
    # this step cannot be used.
    except Exception as e:  # pylint: disable=broad-exception-caught
      cause = _short_cause(e)
    if cause is not None:
      # Raised outside the `except` so that Orbax's exception (and the pending
      # TensorStore reads its traceback keeps alive) is freed now: otherwise each
      # read prints 'RuntimeError: Event loop is closed' at exit.
      raise CheckpointError(self._damaged_message(step, steps, cause))
    return out["state"], out["data_iter"], out["meta"]

  def _damaged_message(self, step: int, steps: list[int], cause: str) -> str:
    earlier = [s for s in steps if s < step]
    offer = (f"earlier steps available: {earlier}; resume from one with "
             f"--config.train.restore_step={earlier[-1]}" if earlier else
             "no earlier step is available; move it aside to start from scratch")
    return (f"checkpoint step {step} ({os.path.join(self.directory, str(step))}) cannot be "
            f"restored: damaged, or written for a different model ({cause}); {offer}")

  def save_text_encoder(self, text_params: Any) -> None:
    """Writes the run's frozen T5 params once (a no-op when already there)."""
    path = os.path.join(self.directory, TEXT_ENCODER_DIR)
    if not os.path.isdir(path):
      weights.save_params(path, text_params)

  def discard_after(self, step: int) -> list[int]:
    """Moves steps after `step` out of the directory, to resume from `step`.

    Left in place, a later (e.g. damaged) step would stay the latest and block
    the save of its own step number. They go to `../discarded_checkpoints/`.

    Args:
      step: the step training resumes from.

    Returns:
      The steps moved.
    """
    later = [s for s in self.all_steps() if s > step]
    if later and jax.process_index() == 0:
      dest = os.path.join(os.path.dirname(self.directory), DISCARDED_DIR,
                          time.strftime("%Y%m%d-%H%M%S"))
      os.makedirs(dest, exist_ok=True)
      for s in later:
        shutil.move(os.path.join(self.directory, str(s)), os.path.join(dest, str(s)))
      logging.warning("resuming from step %d: moved later steps %s to %s", step, later, dest)
    if later:
      ocp.multihost.sync_global_processes("suti_discard_after")
      self._manager.reload()
    return later

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _partial_restore(target: Any) -> ocp.args.PyTreeRestore:
  """Restores the fields of `target` (ShapeDtypeStructs with shardings) only."""
  return ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target))


def _check_restored(tree: Any) -> None:
  """A partial restore leaves the ShapeDtypeStruct of a field the checkpoint lacks."""
  missing = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise KeyError(f"not in the checkpoint: {missing[:4]}")


def _remove_partial_saves(directory: str) -> None:
  """Deletes step directories a crash left half-written (Orbax ignores them)."""
  for path in sorted(glob.glob(os.path.join(directory, PARTIAL_SAVE_GLOB))):
    shutil.rmtree(path)
    logging.warning("removed %s: a checkpoint save that did not finish", path)


def _short_cause(error: Exception) -> str:
  """'Type: first part of the message', without TensorStore's JSON spec."""
  text = str(error).split(" [tensorstore_spec=")[0].strip()
  text = " ".join(text.split())  # One line.
  if len(text) > MAX_CAUSE_CHARS:
    text = text[:MAX_CAUSE_CHARS] + "..."
  return f"{type(error).__name__}: {text}"


def restore_params(directory: str, abstract_params: Any, *, use_ema: bool = False) -> Any:
  """Reads only the (EMA) params of the latest checkpoint in `directory`.

  Used by `init_from` (SuTI from an Imagen run): the other state fields of the
  source run (optimizer) are not needed.

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


class _ReadOnlyNoticeFilter(py_logging.Filter):
  """Drops Orbax's warning that a read-only manager's directory is read only.

  Orbax logs it each time a read-only manager opens, and the demo's stages
  restore dozens of checkpoints: the lines buried its progress output.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


py_logging.getLogger("absl").addFilter(_ReadOnlyNoticeFilter())


def _read_only_manager(path: str) -> ocp.CheckpointManager:
  # Orbax would switch saving and creating off itself, with a warning for each.
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  return ocp.CheckpointManager(checkpoint_directory(path), item_names=ITEMS, options=options)


def checkpoint_steps(path: str) -> list[int]:
  """The complete checkpoints' steps of a workdir (or checkpoints directory), ascending."""
  manager = _read_only_manager(path)
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def _read_only_step(path: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """A read-only manager on `path`'s checkpoints and the step to read (default latest)."""
  directory = checkpoint_directory(path)
  manager = _read_only_manager(path)
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
  """What `load_params` read: UNet params and their step."""

  params: Any
  step: int


def load_params(path: str, abstract_params: Any, *, use_ema: bool,
                step: int | None = None) -> LoadedParams:
  """Reads a trained stage's params, and nothing else, onto the given shardings.

  The one way to restore params for sampling, export, experts and `init_from`:
  the optimizer state stays on disk, so callers never build an optimizer.

  Args:
    path: a workdir or its `checkpoints` directory.
    abstract_params: ShapeDtypeStructs with shardings of the UNet params (any mesh).
    use_ema: read `ema_params` (what the trainer samples with) instead of `params`.
    step: default the latest.

  Returns:
    LoadedParams laid out per `abstract_params`.
  """
  manager, step = _read_only_step(path, step)
  field = "ema_params" if use_ema else "params"
  restored = manager.restore(step, args=ocp.args.Composite(
      state=_partial_restore({field: abstract_params})))["state"]
  manager.close()
  return LoadedParams(restored[field], step)


def load_text_params(path: str, abstract_text: Any, step: int | None = None) -> Any | None:
  """The frozen T5 params a run trained with, onto `abstract_text`'s shardings.

  Looks in `<checkpoints>/text_encoder` (runs that encode text in the step),
  then in the `text_params` field of step `step`'s state (checkpoints written
  before the T5 left the TrainState).

  Args:
    path: a workdir or its `checkpoints` directory.
    abstract_text: from `weights.abstract_params` (any mesh).
    step: the step whose state a legacy checkpoint reads; default the latest.

  Returns:
    The params, or None when the run held none (precomputed embeddings: the
    encoder is the config's `text.weights_path`).
  """
  directory = checkpoint_directory(path)
  saved = os.path.join(directory, TEXT_ENCODER_DIR)
  if os.path.isdir(saved):
    return weights.restore_params(saved, abstract_text)
  manager, step = _read_only_step(path, step)
  state_dir = os.path.join(directory, str(step), "state")
  fields = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  if LEGACY_TEXT_FIELD not in fields:
    manager.close()
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=_partial_restore({LEGACY_TEXT_FIELD: abstract_text})))["state"]
  manager.close()
  return restored[LEGACY_TEXT_FIELD]


def git_hash() -> str:
  """The source tree's git commit, or '' outside a git checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""
