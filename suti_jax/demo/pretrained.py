"""The demo's shipped base checkpoint: a recipe fingerprint beside an Orbax step,
installed into a workdir when the fingerprint matches, exported after a retrain.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

RECIPE_FILE = "recipe.json"
CHECKPOINTS = "checkpoints"
# Relative paths in the config are taken from the repository root when the
# working directory does not hold them (the demo can run from anywhere).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve(path: str) -> str:
  """`path` as given if it exists there (or is absolute), else under the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  return os.path.join(_REPO_ROOT, path)


def read_recipe(directory: str) -> dict[str, Any] | None:
  """The shipped checkpoint's recipe record, or None if there is none."""
  try:
    with open(os.path.join(resolve(directory), RECIPE_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def install(directory: str, checkpoints_dir: str) -> dict[str, Any]:
  """Copies the shipped checkpoint's step folders into `checkpoints_dir`.

  Args:
    directory: the shipped checkpoint (recipe.json + checkpoints/<step>/).
    checkpoints_dir: a stage's `<workdir>/checkpoints`; replaced whole.

  Returns:
    The recipe record.
  """
  recipe = read_recipe(directory)
  if recipe is None:
    raise FileNotFoundError(f"no {RECIPE_FILE} in {resolve(directory)}")
  # Copied beside the target, then renamed: a crash leaves no half checkpoint.
  parent = os.path.dirname(os.path.abspath(checkpoints_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".install-")
  shutil.copytree(os.path.join(resolve(directory), CHECKPOINTS), os.path.join(tmp, "c"))
  shutil.rmtree(checkpoints_dir, ignore_errors=True)
  os.replace(os.path.join(tmp, "c"), checkpoints_dir)
  os.rmdir(tmp)
  return recipe


def export(checkpoints_dir: str, directory: str, step: int, recipe: dict[str, Any]) -> str:
  """Writes `checkpoints_dir/<step>` and `recipe` as a shipped checkpoint at `directory`.

  Args:
    checkpoints_dir: the trained stage's checkpoints.
    directory: destination (replaced whole, atomically).
    step: the step to ship.
    recipe: what `install` returns later: at least 'fingerprint' and 'final'.

  Returns:
    The destination path.
  """
  source = os.path.join(checkpoints_dir, str(step))
  if not os.path.isdir(source):
    raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoints_dir}")
  directory = os.path.abspath(directory)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".export-")
  shutil.copytree(source, os.path.join(tmp, CHECKPOINTS, str(step)))
  with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
    json.dump(dict(recipe, step=step), f, indent=1, sort_keys=True)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  return directory
