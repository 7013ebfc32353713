"""Imagen -> SuTI parameter surgery and the trainable-parameter masks: a SuTI
UNet starts from Imagen weights (new exemplar layers keep their zero-init
output) and may train only its exemplar layers."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from suti_jax.models.exemplar import EXEMPLAR_PREFIX

TRAINABLE_MODES = ("all", "exemplar_only")
PyTree = Any


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _unbox(x: Any) -> Any:
  return x.unbox() if _is_box(x) else x


def _key_name(entry: Any) -> str:
  """One jax key-path entry (DictKey, GetAttrKey, SequenceKey) or str -> str."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_names(path: str | Sequence[Any]) -> tuple[str, ...]:
  """'a/b/c', ('a', 'b', 'c') or a jax key path -> ('a', 'b', 'c')."""
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  return tuple(_key_name(p) for p in path)


def is_exemplar_param(path: str | Sequence[Any]) -> bool:
  """True when a parameter path runs through an `exemplar_*` submodule."""
  return any(name.startswith(EXEMPLAR_PREFIX) for name in path_names(path))


def _flatten(tree: PyTree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
  return [path_names(p) for p, _ in leaves], [leaf for _, leaf in leaves], treedef


def suti_from_imagen(imagen_params: PyTree, suti_params: PyTree) -> PyTree:
  """Copies every Imagen parameter into a freshly initialised SuTI tree.

  Both trees have the same layout (e.g. both `{'params': ...}` variables, boxed
  or not). Exemplar parameters keep their SuTI init; boxes (logical axis names)
  of the SuTI tree are kept.

  Args:
    imagen_params: parameters of the Imagen UNet.
    suti_params: initialised parameters of the SuTI UNet (same config + exemplar).

  Returns:
    The SuTI tree with every non-exemplar leaf replaced by the Imagen value.

  Raises:
    ValueError: a non-exemplar SuTI path has no Imagen counterpart (or the
      reverse), or a matching path has a different shape; the path is named.
  """
  source_paths, source_leaves, _ = _flatten(imagen_params)
  source = dict(zip(source_paths, source_leaves))
  paths, leaves, treedef = _flatten(suti_params)
  unmatched = sorted(set(source) - set(paths))
  if unmatched:
    raise ValueError("Imagen params with no SuTI counterpart: "
                     + ", ".join("/".join(p) for p in unmatched))
  merged = []
  for path, leaf in zip(paths, leaves):
    if is_exemplar_param(path):
      merged.append(leaf)
      continue
    name = "/".join(path)
    if path not in source:
      raise ValueError(f"SuTI param {name} is missing from the Imagen params")
    value, target = _unbox(source[path]), _unbox(leaf)
    if value.shape != target.shape:
      raise ValueError(f"shape mismatch at {name}: Imagen {value.shape} vs "
                       f"SuTI {target.shape}")
    value = jnp.asarray(value, target.dtype)
    merged.append(leaf.replace_boxed(value) if _is_box(leaf) else value)
  return jax.tree_util.tree_unflatten(treedef, merged)


def trainable_mask(params: PyTree, mode: str) -> PyTree:
  """A bool per parameter for optax.masked / multi_transform.

  Args:
    params: parameter tree (boxed or not).
    mode: 'all' or 'exemplar_only'.

  Returns:
    Same structure with a bool at each parameter (at each box when boxed).

  Raises:
    ValueError: unknown mode.
  """
  if mode not in TRAINABLE_MODES:
    raise ValueError(f"unknown trainable mode {mode!r}; known modes: {TRAINABLE_MODES}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: mode == "all" or is_exemplar_param(path), params, is_leaf=_is_box)
