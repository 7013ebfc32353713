"""Imports point one way: launch/, data_pipeline/, configs/ and bench/ use suti_jax,
never the reverse (function-local imports and importlib strings included)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top-level packages of this repository that sit above the library.
ABOVE_LIBRARY = ("data_pipeline", "launch", "configs", "bench", "tests")
# Known exceptions, (file, imported package): none.
ALLOWED: set[tuple[str, str]] = set()


def _imported_modules(tree: ast.AST) -> list[str]:
  """Every module named by an import statement or an importlib/`__import__` string."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.append(node.module)
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      func = node.func
      called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        names.append(node.args[0].value)
  return names


def library_imports_from_above() -> set[tuple[str, str]]:
  """(file, package) for each suti_jax file importing a package above the library."""
  found = set()
  for folder, _, files in os.walk(os.path.join(ROOT, "suti_jax")):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
      rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
      for module in _imported_modules(tree):
        top = module.split(".")[0]
        if top in ABOVE_LIBRARY:
          found.add((rel, top))
  return found


def test_the_import_walker_sees_local_and_string_imports():
  tree = ast.parse("def f():\n  import launch.train\n  from data_pipeline.read import x\n"
                   "  importlib.import_module('bench.common')\n  from . import sibling\n")
  assert _imported_modules(tree) == ["launch.train", "data_pipeline.read", "bench.common"]


def test_library_does_not_import_pipeline_launchers_or_configs():
  found = library_imports_from_above()
  assert found - ALLOWED == set(), "suti_jax must not import these (file, package)"
  # A stale exception would hide a regression in that file later: keep the list exact.
  assert ALLOWED - found == set(), "remove these fixed entries from ALLOWED"
