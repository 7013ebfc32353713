"""The demo's stage runner: runs named stages in dependency order (several at once
on worker threads when asked), shows progress and writes a done-marker (outputs,
wall time, config fingerprint) per stage, so a re-run skips finished stages and an
interrupted run resumes at the unfinished ones.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import tqdm

from suti_jax import compile_cache

MARKER_DIR = "markers"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of the demo.

  Attributes:
    name: unique, file-name safe ('train_base').
    fn: runs the stage; returns its outputs as a JSON-serialisable dict. Values
      under the key 'paths' are files or folders (relative to the workdir or
      absolute) that must exist for the stage to count as done.
    fingerprint: what the outputs depend on (e.g. the stage's config); a marker
      with another fingerprint is stale and the stage runs again.
    deps: names of the stages whose outputs this one reads; it starts only after
      they are done.
    folders: folders the stage writes (relative to the workdir or absolute).
      A stage that starts under another fingerprint than they were written
      with finds them deleted, so a changed recipe never resumes from stale
      checkpoints; a stage interrupted and started again under the same
      fingerprint keeps them and resumes.
    exclusive: the stage runs with no other stage beside it (timings that
      must not share the cores). Once it is ready, no later stage starts
      before it.
  """

  name: str
  fn: Callable[[], dict[str, Any]]
  fingerprint: Any = None
  deps: tuple[str, ...] = ()
  folders: tuple[str, ...] = ()
  exclusive: bool = False


def fingerprint_of(value: Any) -> str:
  """A short stable hash of a JSON-serialisable value (non-JSON values by repr)."""
  text = json.dumps(value, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class StageRunner:
  """Runs stages once; remembers finished ones in `<workdir>/markers/<name>.json`."""

  def __init__(self, workdir: str, log: Callable[[str], None] = tqdm.tqdm.write):
    self.workdir = workdir
    self._log = log
    os.makedirs(os.path.join(workdir, MARKER_DIR), exist_ok=True)

  def marker_path(self, name: str) -> str:
    return os.path.join(self.workdir, MARKER_DIR, f"{name}.json")

  def started_path(self, name: str) -> str:
    """Where the fingerprint the stage's folders were last written with is kept."""
    return os.path.join(self.workdir, MARKER_DIR, f"{name}.started")

  def _resolve(self, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(self.workdir, path)

  def done(self, stage: Stage) -> dict[str, Any] | None:
    """The marker of `stage` if it finished with this fingerprint and its outputs exist."""
    try:
      with open(self.marker_path(stage.name)) as f:
        marker = json.load(f)
    except (OSError, json.JSONDecodeError):
      return None
    if marker.get("fingerprint") != fingerprint_of(stage.fingerprint):
      return None
    paths = marker["outputs"].get("paths", {})
    if not all(os.path.exists(self._resolve(p)) for p in paths.values()):
      return None
    return marker

  def run(self, stages: Sequence[Stage], workers: int = 1) -> dict[str, dict[str, Any]]:
    """Runs every stage that is not done, each after its dependencies.

    Args:
      stages: the stages; a stage's `deps` must come earlier in the list.
      workers: how many stages may run at once (threads). XLA's CPU kernels for
        small models keep about one core busy, so two independent stages on two
        cores take about the time of one.

    Returns:
      stage name -> its marker: {'outputs', 'wall_s', 'cpu_s', 'compile_s',
      'skipped', 'fingerprint'}; the times are those of the run that produced the
      outputs ('cpu_s' counts the whole process, so it includes any stage that ran
      beside; 'compile_s' counts the XLA compiles of the stage's own thread).

    Raises:
      The first failing stage's exception, after the stages already running
      have finished (their markers are kept).
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
      raise ValueError(f"duplicate stage names in {names}")
    for i, stage in enumerate(stages):
      unknown = set(stage.deps) - set(names[:i])
      if unknown:
        raise ValueError(f"stage {stage.name!r} depends on {sorted(unknown)}, "
                         "which are not earlier stages")
    workers = max(1, workers)
    markers: dict[str, dict[str, Any]] = {}
    progress = tqdm.tqdm(total=len(stages), desc="demo", unit="stage")
    pending = list(stages)
    running: dict[concurrent.futures.Future, Stage] = {}
    failure: Exception | None = None
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      while pending or running:
        if failure is None:
          # Deps come earlier in the list, so one ordered pass also starts the
          # stages that a skip in this pass made ready.
          for stage in list(pending):
            if not all(d in markers for d in stage.deps):
              continue
            label = f"[{names.index(stage.name) + 1}/{len(stages)}] {stage.name}"
            marker = self.done(stage)
            if marker is not None:
              self._log(f"{label}: done already ({marker['wall_s']:.0f} s when it ran), skipped")
              markers[stage.name] = dict(marker, skipped=True)
              pending.remove(stage)
              progress.update()
            elif stage.exclusive and running:
              break  # It starts next, alone, once the running stages end.
            elif len(running) < workers and not any(s.exclusive for s in running.values()):
              self._log(f"{label}: running")
              running[pool.submit(self._run_one, stage)] = stage
              pending.remove(stage)
        if not running:  # Everything is done, or a failure stopped new starts.
          break
        finished, _ = concurrent.futures.wait(
            running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
          stage = running.pop(future)
          try:
            markers[stage.name] = dict(future.result(), skipped=False)
          except Exception as e:  # pylint: disable=broad-except
            failure = failure or e
            continue
          m = markers[stage.name]
          self._log(f"[{names.index(stage.name) + 1}/{len(stages)}] {stage.name}: finished in "
                    f"{m['wall_s']:.0f} s ({m['cpu_s']:.0f} CPU s)")
          progress.update()
    progress.close()
    if failure is not None:
      raise failure
    return {name: markers[name] for name in names}

  def _claim_folders(self, stage: Stage) -> None:
    """Deletes the stage's folders unless they were started with its fingerprint,
    then records that fingerprint (folders of unknown origin count as stale)."""
    fingerprint = fingerprint_of(stage.fingerprint)
    try:
      with open(self.started_path(stage.name)) as f:
        started = f.read()
    except OSError:
      started = None
    if started != fingerprint:
      for folder in map(self._resolve, stage.folders):
        if os.path.exists(folder):
          self._log(f"{stage.name}: {folder} was written by another recipe; deleting it")
          shutil.rmtree(folder)
    _write_atomically(self.started_path(stage.name), fingerprint)

  def _run_one(self, stage: Stage) -> dict[str, Any]:
    self._claim_folders(stage)
    start, start_cpu = time.time(), time.process_time()
    start_compile = compile_cache.thread_compile_seconds()
    outputs = stage.fn()
    # CPU seconds (all threads) next to wall time: on a shared machine they tell
    # how long the stage would take on idle cores.
    end = time.time()
    marker = {"outputs": outputs, "wall_s": end - start, "start_time": start, "end_time": end,
              "cpu_s": time.process_time() - start_cpu,
              "compile_s": compile_cache.thread_compile_seconds() - start_compile,
              "fingerprint": fingerprint_of(stage.fingerprint)}
    # Written last and atomically: a stage killed mid-way leaves no marker.
    _write_atomically(self.marker_path(stage.name),
                      json.dumps(marker, indent=1, sort_keys=True, default=repr))
    return marker


def _write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename: never half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
