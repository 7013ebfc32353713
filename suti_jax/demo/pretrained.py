"""The demo's shipped artefacts (the base checkpoint, the judges): a recipe fingerprint
beside a payload folder, installed into a workdir when the fingerprint matches and
exported after a retrain.

A shipped artefact is a folder holding `recipe.json` (at least 'fingerprint') and
the payload, e.g. `checkpoints/<step>/` for the base or `judges/` for the judges.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

RECIPE_FILE = "recipe.json"
# Relative paths in the config are taken from the repository root when the
# working directory does not hold them (the demo can run from anywhere).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve(path: str) -> str:
  """`path` as given if it exists there (or is absolute), else under the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  return os.path.join(_REPO_ROOT, path)


def read_recipe(directory: str) -> dict[str, Any] | None:
  """The shipped artefact's recipe record, or None if there is none."""
  try:
    with open(os.path.join(resolve(directory), RECIPE_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _replace_atomically(build, destination: str) -> None:
  """Builds `destination` in a sibling temporary folder, then swaps it in whole, so
  a crash leaves either the old folder or the new one, never half of one."""
  parent = os.path.dirname(os.path.abspath(destination))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".shipped-")
  build(os.path.join(tmp, "new"))
  shutil.rmtree(destination, ignore_errors=True)
  os.replace(os.path.join(tmp, "new"), destination)
  os.rmdir(tmp)


def install(directory: str, payload: str, target: str) -> dict[str, Any]:
  """Copies the shipped artefact's payload folder to `target`.

  Args:
    directory: the shipped artefact (recipe.json + payload).
    payload: the payload folder inside it, e.g. 'checkpoints' or 'judges'.
    target: where the payload goes in the workdir; replaced whole.

  Returns:
    The recipe record.
  """
  recipe = read_recipe(directory)
  if recipe is None:
    raise FileNotFoundError(f"no {RECIPE_FILE} in {resolve(directory)}")
  source = os.path.join(resolve(directory), payload)
  if not os.path.isdir(source):
    raise FileNotFoundError(f"shipped artefact {resolve(directory)} has no {payload}/ folder")
  _replace_atomically(lambda dst: shutil.copytree(source, dst), target)
  return recipe


def export(source: str, directory: str, payload: str, recipe: dict[str, Any]) -> str:
  """Writes the folder `source` as `directory/payload` beside `recipe`.

  Args:
    source: the trained folder to ship (e.g. `<workdir>/base/checkpoints/3000`).
    directory: destination artefact (replaced whole, atomically).
    payload: path of the payload inside it (e.g. 'checkpoints/3000', 'judges').
    recipe: what `install` returns later: at least 'fingerprint'.

  Returns:
    The destination path.
  """
  if not os.path.isdir(source):
    raise FileNotFoundError(f"nothing to ship: {source} is not a folder")

  def build(dst: str) -> None:
    shutil.copytree(source, os.path.join(dst, payload))
    with open(os.path.join(dst, RECIPE_FILE), "w") as f:
      json.dump(recipe, f, indent=1, sort_keys=True)

  directory = os.path.abspath(directory)
  _replace_atomically(build, directory)
  return directory
