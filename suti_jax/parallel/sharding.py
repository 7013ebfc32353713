"""Logical-axis shardings for states and batches, sharded creation, global
batches from process-local data, the "sufficiently sharded" check and the
sharding table (path -> shape, dtype, spec, bytes per device).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from suti_jax.parallel import axes

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
  """Config rules (lists after a ConfigDict round trip) as hashable tuples."""
  out = []
  for name, target in rules:
    if isinstance(target, (list, tuple)):
      target = tuple(target)
    out.append((str(name), target))
  return tuple(out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
             replicated: list[tuple[int, int, tuple[str, ...]]] | None = None) -> PartitionSpec:
  """Replicates the dims of `spec` whose size the mesh axes do not divide.

  Tiny vocabularies (259 byte ids) or channel counts smaller than the mesh
  cannot be split evenly; they stay whole rather than failing the compile.

  Args:
    spec: a mesh-axis PartitionSpec, at most `len(shape)` entries.
    shape: the array shape.
    mesh: the mesh the spec refers to.
    replicated: if given, gets one `(dim index, dim size, mesh axes)` per dim
      that the spec shards but this function replicates (for the caller's log).

  Returns:
    A PartitionSpec with the same length as `shape`.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for i, (dim, entry) in enumerate(zip(shape, entries)):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    ways = math.prod(mesh.shape[n] for n in names)
    keep = ways > 1 and dim % ways == 0
    if not keep and ways > 1 and replicated is not None:
      replicated.append((i, dim, names))
    fitted.append(entry if keep else None)
  return PartitionSpec(*fitted)


def _log_replicated(cases: Mapping[tuple[int, tuple[str, ...], int], list[str]]) -> None:
  """One log line per distinct (dim size, mesh axes) case, naming every array."""
  for (size, names, ways), paths in sorted(cases.items()):
    logging.info("sharding: the %d-way %s split does not divide a dim of size %d; "
                 "replicated in %d array(s): %s", ways, "x".join(names), size, len(paths),
                 ", ".join(paths))


def _record(cases: dict, path: Any, replicated: list[tuple[int, int, tuple[str, ...]]],
            mesh: Mesh) -> None:
  name = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
  for i, size, names in replicated:
    ways = math.prod(mesh.shape[n] for n in names)
    cases.setdefault((size, names, ways), []).append(f"{name}[{i}]")


def logical_shardings(abstract: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a (possibly `nn.Partitioned`-boxed) abstract tree.

  Dims the mesh does not divide are replicated (`fit_spec`) and logged once
  per distinct (size, mesh axes) case with every array path they occur in.

  Args:
    abstract: output of `jax.eval_shape` of an init function; boxed leaves
      carry logical axis names, plain leaves are replicated.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.

  Returns:
    A tree of NamedSharding matching `nn.unbox(abstract)`.
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)
  shapes = nn.unbox(abstract)
  cases: dict = {}

  def one(path, spec, x):
    replicated: list[tuple[int, int, tuple[str, ...]]] = []
    sharding = NamedSharding(mesh, fit_spec(spec, x.shape, mesh, replicated))
    _record(cases, path, replicated, mesh)
    return sharding

  out = jax.tree_util.tree_map_with_path(one, specs, shapes,
                                         is_leaf=lambda s: isinstance(s, PartitionSpec))
  _log_replicated(cases)
  return out


# Keys under which optax's factored second moment (Adafactor) keeps its row and
# column statistics (`optax._src.factorized.FactoredState`).
_FACTORED_ROW, _FACTORED_COL = "v_row", "v_col"


def factored_dims(shape: Sequence[int]) -> tuple[int, int]:
  """The (d1, d0) dims that optax 0.2.8's factored RMS reduces for `shape`.

  `optax._src.factorized._factored_dims`: the two largest dims by
  `np.argsort(shape)` (the same call, so ties resolve as optax resolves them:
  the earlier dim first), d0 the largest. `v_row` averages over d0 (drops it),
  `v_col` over d1. For a square [C, C] kernel d1 = 0 and d0 = 1, so `v_row`
  keeps dim 0 and `v_col` keeps dim 1.
  """
  order = np.argsort(tuple(shape))
  return int(order[-2]), int(order[-1])


def _key_name(key: Any) -> Any:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _spec_like(shape: tuple[int, ...], ref_shape: tuple[int, ...],
               ref_spec: PartitionSpec, factored: str | None = None) -> PartitionSpec:
  """The spec of a reference array carried over to a same- or lower-rank one.

  Optimizer moments have the parameter's shape. Factored Adafactor statistics
  (`factored` = 'v_row' or 'v_col') drop the dim optax reduces, which
  `factored_dims` names exactly; another one-dim-lower leaf takes the spec only
  when exactly one dropped dim fits its shape, else it is replicated.
  """
  entries = list(ref_spec) + [None] * (len(ref_shape) - len(ref_spec))
  if shape == ref_shape:
    return PartitionSpec(*entries)
  if len(shape) != len(ref_shape) - 1:
    return PartitionSpec()
  if factored is not None and len(ref_shape) >= 2:
    d1, d0 = factored_dims(ref_shape)
    drop = d0 if factored == _FACTORED_ROW else d1
    if ref_shape[:drop] + ref_shape[drop + 1:] == shape:
      return PartitionSpec(*(entries[:drop] + entries[drop + 1:]))
    return PartitionSpec()
  fits = {tuple(entries[:i] + entries[i + 1:]) for i in range(len(ref_shape))
          if ref_shape[:i] + ref_shape[i + 1:] == shape}
  return PartitionSpec(*fits.pop()) if len(fits) == 1 else PartitionSpec()


def derived_shardings(tree: Any, ref: Any, ref_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose leaves mirror `ref` leaves (optimizer state).

  A leaf of `tree` takes the sharding of the `ref` leaf whose key path is a
  suffix of its own (`.../mu/conv/kernel` <- `conv/kernel`); others replicate.
  Leaves under a `v_row`/`v_col` key (Adafactor) drop the dim optax reduces.

  Args:
    tree: abstract tree to shard (e.g. an optax state).
    ref: abstract reference tree (unboxed params).
    ref_shardings: NamedShardings of `ref`.
    mesh: the mesh.

  Returns:
    A tree of NamedSharding matching `tree`.
  """
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                          jax.tree.leaves(ref_shardings)):
    by_path[tuple(path)] = (tuple(x.shape), s.spec)
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  cases: dict = {}

  def one(path, x):
    for n in lengths:
      hit = by_path.get(tuple(path[-n:])) if len(path) >= n else None
      if hit is not None:
        names = {_key_name(k) for k in path[:-n]}
        factored = next((f for f in (_FACTORED_ROW, _FACTORED_COL) if f in names), None)
        spec = _spec_like(tuple(x.shape), *hit, factored=factored)
        replicated: list[tuple[int, int, tuple[str, ...]]] = []
        sharding = NamedSharding(mesh, fit_spec(spec, x.shape, mesh, replicated))
        _record(cases, path, replicated, mesh)
        return sharding
    return NamedSharding(mesh, PartitionSpec())

  out = jax.tree_util.tree_map_with_path(one, tree)
  _log_replicated(cases)
  return out


def create_sharded(init_fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
  """Runs `init_fn(*args)` under jit so each device only builds its shards.

  Args:
    init_fn: returns a tree (boxed leaves are unboxed here).
    shardings: NamedShardings of the unboxed output.
    *args: arguments of `init_fn` (e.g. a PRNG key).

  Returns:
    The unboxed output, laid out as `shardings` says.
  """
  return jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading dim on `act_batch`, rest replicated."""
  spec = nn.logical_to_mesh(PartitionSpec(axes.ACT_BATCH, *([None] * (ndim - 1))), rules)
  return NamedSharding(mesh, spec)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: Rules) -> dict[str, jax.Array]:
  """Assembles each process's local examples into global sharded arrays.

  Args:
    host_batch: this process's share, every array [B_local, ...].
    mesh: the mesh.
    rules: rules mapping `act_batch` to mesh axes (data, fsdp).

  Returns:
    Arrays of global shape [B_local * process_count, ...].
  """
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
      for k, v in host_batch.items()
  }


def abstract_global_batch(spec: Mapping[str, jax.ShapeDtypeStruct], mesh: Mesh,
                          rules: Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """`batch_spec` structs carrying the global batch sharding (AOT compiles)."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                  sharding=batch_sharding(mesh, rules, len(v.shape)))
          for k, v in spec.items()}


def _per_device_bytes(x: Any) -> int:
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return math.prod(shape) * np.dtype(x.dtype).itemsize


# Parameter bytes from which an undersharded layout is an error, not a warning:
# 1 GiB is ~268M float32 params. Paper-size UNets (suti_base64: 9.4 GiB) are far
# above it; tiny and demo configs (a few MiB) far below, where replicating a
# norm or a 259-row vocabulary costs nothing worth stopping a run for.
RAISE_ABOVE_PARAM_BYTES = 2**30


class UnshardedParamsError(ValueError):
  """Parameters are split over the model axes less evenly than the check allows."""


def assert_params_sufficiently_sharded(params: Any, mesh: Mesh, *, tolerance: float = 0.02,
                                       raise_error: bool = True,
                                       raise_above_bytes: int = 0) -> float:
  """Checks that parameters are split over the model axes (fsdp, tensor).

  Ideal per-device bytes are total / (fsdp * tensor); replicated norms and
  biases push the real figure above it.

  Args:
    params: sharded arrays or ShapeDtypeStructs with shardings.
    mesh: the mesh.
    tolerance: allowed relative excess of per-device bytes over the ideal.
    raise_error: raise UnshardedParamsError when over tolerance (else log a
      warning)...
    raise_above_bytes: ...but only for params of at least this many bytes in
      total; smaller ones warn (the trainer passes RAISE_ABOVE_PARAM_BYTES).

  Returns:
    The relative excess (0.0 = perfectly sharded).
  """
  model_ways = mesh.shape[axes.FSDP] * mesh.shape[axes.TENSOR]
  leaves = jax.tree.leaves(params)
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  if model_ways == 1 or not total:
    return 0.0
  excess = sum(_per_device_bytes(x) for x in leaves) / (total / model_ways) - 1.0
  if excess > tolerance:
    msg = (f"parameters ({total / 2**30:.2f} GiB) use {excess:.1%} more bytes per device "
           f"than an even split over fsdp x tensor = {model_ways} (tolerance {tolerance:.1%}); "
           f"check axis_rules and the 'replicated in' sharding log lines")
    if raise_error and total >= raise_above_bytes:
      raise UnshardedParamsError(msg)
    logging.warning(msg)
  return excess


def sharding_table(tree: Any) -> dict[str, dict[str, Any]]:
  """path -> {shape, dtype, spec, per_device_bytes} for arrays or sharded structs."""
  table = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
    table[jax.tree_util.keystr(path, simple=True, separator="/")] = {
        "shape": list(x.shape),
        "dtype": str(np.dtype(x.dtype)),
        "spec": [list(e) if isinstance(e, tuple) else e for e in spec],
        "per_device_bytes": _per_device_bytes(x),
    }
  return table
