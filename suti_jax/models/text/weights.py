"""The frozen T5's params on disk: one sharded Orbax checkpoint (written by
`launch/convert_t5.py` and by the trainer), restored straight into the shardings
of its logical axes, so no device ever holds the whole encoder.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh

from suti_jax.config import TextEncoderConfig
from suti_jax.models.hf_checkpoint import CheckpointError
from suti_jax.models.text import t5
from suti_jax.parallel import sharding as sharding_lib


def abstract_params(cfg: TextEncoderConfig, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
  """ShapeDtypeStructs of `T5Encoder(cfg)` params carrying their NamedShardings.

  Args:
    cfg: the architecture and param dtype.
    mesh: where the params go.
    rules: logical axis rules (`embed`, `mlp`, `heads`, `kv` -> mesh axes).

  Returns:
    The unboxed param tree of ShapeDtypeStructs; nothing is allocated.
  """
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(t5.init_t5_params, cfg, jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def init_params(cfg: TextEncoderConfig, key: jax.Array, abstract: Any,
                rules: sharding_lib.Rules) -> Any:
  """Random params built in place on `abstract`'s shardings (tests, the demo)."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  with nn.logical_axis_rules(rules):
    return sharding_lib.create_sharded(functools.partial(t5.init_t5_params, cfg), shardings, key)


def save_params(path: str, params: Any) -> None:
  """Writes params (boxed or not; jax or numpy arrays) as an Orbax checkpoint.

  Every process calls it with its shards; Orbax writes to a temporary
  directory and renames it when complete, so `path` is never half-written.

  Args:
    path: the checkpoint directory; it must not exist yet.
    params: the T5 param tree.
  """
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), nn.unbox(params))
  checkpointer.wait_until_finished()
  checkpointer.close()


def _check_tree(path: str, saved: Any, abstract: Any) -> None:
  """Raises CheckpointError naming the first missing, extra or mis-shaped param."""
  saved_flat = traverse_util.flatten_dict(saved, sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  missing, extra = sorted(set(want) - set(saved_flat)), sorted(set(saved_flat) - set(want))
  if missing or extra:
    raise CheckpointError(f"{path}: T5 params do not match the text config: missing "
                          f"{missing[:8]}, unexpected {extra[:8]}")
  for key, x in want.items():
    if tuple(saved_flat[key].shape) != tuple(x.shape):
      raise CheckpointError(f"{path}: T5 param {key!r} has shape {tuple(saved_flat[key].shape)}, "
                            f"expected {tuple(x.shape)}")


def restore_params(path: str, abstract: Any) -> Any:
  """Reads a `save_params` checkpoint onto `abstract`'s shardings and dtypes.

  Each device reads only its own shards; the saved param paths and shapes
  are checked against `abstract` first.

  Args:
    path: the checkpoint directory.
    abstract: from `abstract_params` (any mesh).

  Returns:
    The unboxed params, laid out as `abstract` says.

  Raises:
    FileNotFoundError: `path` is not a directory (e.g. an old msgpack file).
    CheckpointError: the saved params do not fit `abstract`.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"text encoder weights not found: {path!r} is not an Orbax "
                            "checkpoint directory (write one with launch/convert_t5.py)")
  checkpointer = ocp.StandardCheckpointer()
  try:
    _check_tree(path, checkpointer.metadata(path).item_metadata.tree, abstract)
    return checkpointer.restore(path, abstract)
  finally:
    checkpointer.close()
