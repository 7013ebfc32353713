"""A config turned into the pieces of a run: typed sections, the UNet and T5
modules, where text embeddings come from, optimizer, state init, bound train
step, and for a given mesh the abstract sharded state, batch and T5 params
(shared by training, AOT and sharding dumps).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from suti_jax import config as config_lib
from suti_jax.data import input as input_lib
from suti_jax.models import surgery
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import t5
from suti_jax.models.text import weights
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
    embed: where the step's text embeddings come from: the batch
      (`data.precomputed_embeddings`) or the T5 inside the step.
    tx: the optimizer.
    trainable: bool tree like params, or None when every param trains.
    init: key -> TrainState with logically boxed params.
    step_fn: the bound `train_step`, ready for jit.
  """

  sec: Sections
  model: unet_lib.UNet
  encoder: t5.T5Encoder
  embed: step_lib.EmbedFn
  tx: optax.GradientTransformation
  trainable: Any
  init: Callable[[jax.Array], state_lib.TrainState]
  step_fn: Callable[..., Any]


def precomputed(sec: Sections) -> bool:
  """True when batches carry T5 embeddings, so the step holds no T5 params."""
  return sec.data.precomputed_embeddings


def build(sec: Sections) -> Experiment:
  """Builds the modules, optimizer, state init and bound step of `sec`."""
  if precomputed(sec) and not sec.text.weights_path:
    # Sampling encodes new prompts, so it needs the encoder that wrote the data.
    raise ValueError("data.precomputed_embeddings needs config.text.weights_path: the T5 "
                     "checkpoint the embeddings were computed with (launch.embed_text --t5)")
  init_params = lambda key: unet_lib.init_params(sec.model, key, sec.text.max_length)["params"]
  trainable = None
  if sec.optimizer.trainable != "all":
    abstract_params = nn.unbox(jax.eval_shape(init_params, jax.random.PRNGKey(0)))
    trainable = surgery.trainable_mask(abstract_params, sec.optimizer.trainable)
  tx = optimizer_lib.make_optimizer(sec.optimizer, trainable)
  model, encoder = unet_lib.UNet(sec.model), t5.T5Encoder(sec.text)
  embed = (step_lib.precomputed_embeddings if precomputed(sec)
           else step_lib.in_step_embeddings(encoder))
  step_fn = step_lib.build_step_fn(model, embed, sec.diffusion, sec.optimizer, tx, trainable,
                                   sec.train.seed)
  return Experiment(sec=sec, model=model, encoder=encoder, embed=embed, tx=tx,
                    trainable=trainable, init=state_lib.make_init_fn(init_params, tx),
                    step_fn=step_fn)


def text_init_key(seed: int) -> jax.Array:
  """The key of a random T5 init (the second half of the state init's split)."""
  return jax.random.split(jax.random.PRNGKey(seed))[1]


def abstract_text(exp: Experiment, mesh: Mesh) -> Any:
  """The step's T5 params as sharded ShapeDtypeStructs; None with precomputed embeddings."""
  if precomputed(exp.sec):
    return None
  return weights.abstract_params(exp.sec.text, mesh, exp.sec.rules)


def create_text_params(exp: Experiment, abstract: Any) -> Any:
  """The step's T5 params on `abstract`'s shardings: `text.weights_path` restored
  in place, else a random init from the run seed; None with precomputed embeddings."""
  if abstract is None:
    return None
  if exp.sec.text.weights_path:
    return weights.restore_params(exp.sec.text.weights_path, abstract)
  return weights.init_params(exp.sec.text, text_init_key(exp.sec.train.seed), abstract,
                             exp.sec.rules)


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
                              sec.train.batch_size,
                              text_dim=sec.text.d_model if precomputed(sec) else None)
  return sharding_lib.abstract_global_batch(spec, mesh, sec.rules)


class Shapes(NamedTuple):
  """A run's arrays on one mesh, as ShapeDtypeStructs carrying their shardings."""

  state: state_lib.TrainState
  shardings: state_lib.TrainState  # NamedShardings of `state`.
  batch: dict[str, jax.ShapeDtypeStruct]
  text: Any  # The step's T5 params, or None (precomputed embeddings).


def sharded_shapes(exp: Experiment, mesh: Mesh) -> Shapes:
  """The abstract state (and its shardings), global batch and T5 params of `exp`."""
  abstract, shardings = state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)
  return Shapes(abstract, shardings, abstract_batch(exp.sec, mesh), abstract_text(exp, mesh))
