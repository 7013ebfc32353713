"""TrainState and its sharded creation: abstract shapes via eval_shape, logical
shardings for every field, then one jitted init that writes each shard in place.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from suti_jax.parallel import sharding as sharding_lib


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes, and everything a checkpoint holds.

  Attributes:
    step: int32 scalar, updates applied so far.
    params: UNet params.
    ema_params: exponential moving average of `params` (used for sampling).
    opt_state: optax state of `params` (trainable leaves only).

  The frozen T5 is not part of it: a run that encodes text in the step passes
  its params to the step separately (not donated), and the checkpoint keeps
  them once per run beside the steps (`checkpoint.TEXT_ENCODER_DIR`).
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState


# key -> params, possibly boxed with logical axis names (nn.Partitioned).
InitFn = Callable[[jax.Array], Any]


def make_init_fn(init_params: InitFn,
                 tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """A key -> TrainState function whose params keep their logical boxes.

  Args:
    init_params: UNet init, key -> (boxed) params.
    tx: the optimizer (its state is built from unboxed params).

  Returns:
    init(key) -> TrainState with boxed params and ema_params.
  """

  def init(key: jax.Array) -> TrainState:
    # The first half of the split that once also drew the T5 init (see
    # `experiment.text_init_key`): a seed keeps giving the same UNet.
    params = init_params(jax.random.split(key)[0])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(nn.unbox(params)))

  return init


def state_shardings(abstract: TrainState, mesh: Mesh, rules: sharding_lib.Rules) -> TrainState:
  """NamedShardings of every TrainState field.

  Params follow their logical axis names; optimizer moments follow the param
  they belong to (factored Adafactor statistics drop the reduced dim); the
  step counter is replicated.

  Args:
    abstract: `jax.eval_shape(init)` output, params still boxed.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    A TrainState of NamedSharding, matching the unboxed state.
  """
  params = sharding_lib.logical_shardings(abstract.params, mesh, rules)
  return TrainState(
      step=NamedSharding(mesh, PartitionSpec()),
      params=params,
      ema_params=sharding_lib.logical_shardings(abstract.ema_params, mesh, rules),
      opt_state=sharding_lib.derived_shardings(abstract.opt_state, nn.unbox(abstract.params),
                                               params, mesh))


def abstract_sharded_state(init: Callable[[jax.Array], TrainState], mesh: Mesh,
                           rules: sharding_lib.Rules) -> tuple[TrainState, TrainState]:
  """Shapes and shardings of the state without allocating it.

  Args:
    init: from `make_init_fn`.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (abstract unboxed state of ShapeDtypeStructs carrying their shardings,
    the TrainState of NamedShardings).
  """
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = state_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def create_state(init: Callable[[jax.Array], TrainState], shardings: TrainState,
                 key: jax.Array, rules: sharding_lib.Rules) -> TrainState:
  """Builds the state already sharded (no full copy on any one device)."""
  with nn.logical_axis_rules(rules):
    return sharding_lib.create_sharded(init, shardings, key)
