"""The demo's stage runner: runs named stages in order, shows progress and writes a
done-marker (outputs, wall time, config fingerprint) per stage, so a re-run skips
finished stages and an interrupted run resumes at the first unfinished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import tqdm

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
  """

  name: str
  fn: Callable[[], dict[str, Any]]
  fingerprint: Any = None


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

  def run(self, stages: Sequence[Stage]) -> dict[str, dict[str, Any]]:
    """Runs every stage that is not done, in order.

    Args:
      stages: the stages; later stages may read earlier stages' files.

    Returns:
      stage name -> its marker: {'outputs', 'wall_s', 'cpu_s', 'skipped',
      'fingerprint'}; the times are those of the run that produced the outputs.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
      raise ValueError(f"duplicate stage names in {names}")
    markers = {}
    progress = tqdm.tqdm(stages, desc="demo", unit="stage")
    for i, stage in enumerate(progress):
      progress.set_postfix_str(stage.name)
      marker = self.done(stage)
      if marker is not None:
        self._log(f"[{i + 1}/{len(stages)}] {stage.name}: done already "
                  f"({marker['wall_s']:.0f} s when it ran), skipped")
        markers[stage.name] = dict(marker, skipped=True)
        continue
      self._log(f"[{i + 1}/{len(stages)}] {stage.name}: running")
      start, start_cpu = time.time(), time.process_time()
      outputs = stage.fn()
      # CPU seconds (all threads) next to wall time: on a shared machine they tell
      # how long the stage would take on idle cores.
      marker = {"outputs": outputs, "wall_s": time.time() - start,
                "cpu_s": time.process_time() - start_cpu,
                "fingerprint": fingerprint_of(stage.fingerprint)}
      # Written last and atomically: a stage killed mid-way leaves no marker.
      tmp = self.marker_path(stage.name) + ".tmp"
      with open(tmp, "w") as f:
        json.dump(marker, f, indent=1, sort_keys=True, default=repr)
      os.replace(tmp, self.marker_path(stage.name))
      self._log(f"[{i + 1}/{len(stages)}] {stage.name}: finished in {marker['wall_s']:.0f} s "
                f"({marker['cpu_s']:.0f} CPU s)")
      markers[stage.name] = dict(marker, skipped=False)
    progress.close()
    return markers
