"""A config turned into the pieces of a run: typed sections, the UNet and T5
modules, optimizer, state init, bound train step, and for a given mesh the
abstract sharded state and batch (shared by training, AOT and sharding dumps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from suti_jax import config as config_lib
from suti_jax.data import input as input_lib
from suti_jax.models import surgery
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import t5
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import optimizer as optimizer_lib
from suti_jax.train import state as state_lib
from suti_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Sections:
  """The typed config of one stage's training run."""

  stage: str
  model: config_lib.UNetConfig
  text: config_lib.TextEncoderConfig
  diffusion: config_lib.DiffusionConfig
  sampling: config_lib.SamplingConfig
  optimizer: config_lib.OptimizerConfig
  mesh: config_lib.MeshConfig
  data: config_lib.DataConfig
  train: config_lib.TrainConfig
  rules: sharding_lib.Rules
  init_from: str = ""


def sections(config: ml_collections.ConfigDict) -> Sections:
  """Converts each ConfigDict section once (unknown keys / bad types raise)."""
  s = config_lib.section
  return Sections(
      stage=str(config.stage), model=s(config_lib.UNetConfig, config.model, "config.model"),
      text=s(config_lib.TextEncoderConfig, config.text, "config.text"),
      diffusion=s(config_lib.DiffusionConfig, config.diffusion, "config.diffusion"),
      sampling=s(config_lib.SamplingConfig, config.sampling, "config.sampling"),
      optimizer=s(config_lib.OptimizerConfig, config.optimizer, "config.optimizer"),
      mesh=s(config_lib.MeshConfig, config.mesh, "config.mesh"),
      data=s(config_lib.DataConfig, config.data, "config.data"),
      train=s(config_lib.TrainConfig, config.train, "config.train"),
      rules=sharding_lib.normalize_rules(config.axis_rules),
      init_from=str(config.get("init_from", "") or ""))


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Mesh-independent pieces of a run.

  Attributes:
    sec: the typed config.
    model: the stage's UNet.
    encoder: the frozen T5 module.
    tx: the optimizer.
    trainable: bool tree like params, or None when every param trains.
    init: key -> TrainState with logically boxed params.
    step_fn: the bound `train_step`, ready for jit.
  """

  sec: Sections
  model: unet_lib.UNet
  encoder: t5.T5Encoder
  tx: optax.GradientTransformation
  trainable: Any
  init: Callable[[jax.Array], state_lib.TrainState]
  step_fn: Callable[..., Any]


def _zeros_like_boxed(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def build(sec: Sections) -> Experiment:
  """Builds the modules, optimizer, state init and bound step of `sec`."""
  init_params = lambda key: unet_lib.init_params(sec.model, key, sec.text.max_length)["params"]
  if sec.text.weights_path:
    # Real T5 weights are loaded into the created state (loop.py); zeros keep
    # the init cheap while still carrying the logical axis boxes.
    abstract_text = jax.eval_shape(t5.init_t5_params, sec.text, jax.random.PRNGKey(0))
    init_text = lambda key: _zeros_like_boxed(abstract_text)
  else:
    init_text = functools.partial(t5.init_t5_params, sec.text)
  trainable = None
  if sec.optimizer.trainable != "all":
    abstract_params = nn.unbox(jax.eval_shape(init_params, jax.random.PRNGKey(0)))
    trainable = surgery.trainable_mask(abstract_params, sec.optimizer.trainable)
  tx = optimizer_lib.make_optimizer(sec.optimizer, trainable)
  model, encoder = unet_lib.UNet(sec.model), t5.T5Encoder(sec.text)
  step_fn = step_lib.build_step_fn(model, encoder, sec.diffusion, sec.optimizer, tx, trainable,
                                   sec.train.seed)
  return Experiment(sec=sec, model=model, encoder=encoder, tx=tx, trainable=trainable,
                    init=state_lib.make_init_fn(init_params, init_text, tx), step_fn=step_fn)


def max_exemplars(sec: Sections) -> int | None:
  return sec.model.exemplar.max_exemplars if sec.model.exemplar is not None else None


def per_process_batch_size(sec: Sections, process_count: int) -> int:
  """The global batch split evenly over processes (raises if it does not split)."""
  if sec.train.batch_size % process_count:
    raise ValueError(f"train.batch_size={sec.train.batch_size} does not split over "
                     f"{process_count} processes")
  return sec.train.batch_size // process_count


def abstract_batch(sec: Sections, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as sharded ShapeDtypeStructs (from `batch_spec`)."""
  spec = input_lib.batch_spec(sec.model.image_size, sec.text.max_length, max_exemplars(sec),
                              sec.train.batch_size)
  return sharding_lib.abstract_global_batch(spec, mesh, sec.rules)


def sharded_shapes(exp: Experiment, mesh: Mesh) -> tuple[state_lib.TrainState, Any, dict]:
  """(abstract state with shardings, state shardings, abstract global batch)."""
  abstract, shardings = state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)
  return abstract, shardings, abstract_batch(exp.sec, mesh)
