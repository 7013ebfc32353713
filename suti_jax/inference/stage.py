"""A loaded cascade stage (`StageModel`): its typed configs plus UNet (EMA) and
frozen T5 params, read from a trainer checkpoint or initialised randomly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.sharding import Mesh

from suti_jax import config as config_lib
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import encoder as text_encoder_lib
from suti_jax.models.text import weights
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import experiment as experiment_lib

# Config sections that decide what a stage's params compute; a checkpoint and
# the config it is used with must agree on them (sampling may differ).
MODEL_SECTIONS = ("model", "text", "diffusion")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """The static (hashable) part of a stage: what jit specialises on."""

  model: config_lib.UNetConfig
  text: config_lib.TextEncoderConfig
  diffusion: config_lib.DiffusionConfig
  sampling: config_lib.SamplingConfig


@dataclasses.dataclass(frozen=True, eq=False)
class StageModel:
  """One stage ready to sample.

  Attributes:
    stage: the config's stage name ('base64', 'suti_sr256', ...).
    spec: model, text encoder, diffusion and sampling configs.
    params: unboxed UNet params (EMA by default).
    text_params: unboxed frozen T5 params the stage was trained with.
    step: training step of the source checkpoint (0 for random init).
    source: the checkpoint directory, '' for random init.
    config: the full config as a JSON-friendly dict (for model cards).
  """

  stage: str
  spec: StageSpec
  params: Any
  text_params: Any
  step: int = 0
  source: str = ""
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def image_size(self) -> int:
    return self.spec.model.image_size

  @property
  def low_res_size(self) -> int:
    return self.spec.model.low_res_size

  @property
  def max_exemplars(self) -> int | None:
    """K_max, or None for a stage without exemplar attention."""
    exemplar = self.spec.model.exemplar
    return None if exemplar is None else exemplar.max_exemplars

  def with_sampling(self, **overrides: Any) -> StageModel:
    """A copy whose SamplingConfig has `overrides` replaced."""
    sampling = dataclasses.replace(self.spec.sampling, **overrides)
    return dataclasses.replace(self, spec=dataclasses.replace(self.spec, sampling=sampling))


def spec_from_sections(sec: experiment_lib.Sections) -> StageSpec:
  return StageSpec(model=sec.model, text=sec.text, diffusion=sec.diffusion, sampling=sec.sampling)


def stage_config(config: Mapping[str, Any]) -> tuple[str, StageSpec, sharding_lib.Rules]:
  """The stage name, typed spec and axis rules of a saved (JSON) config.

  Args:
    config: a checkpoint's `config` item (`checkpoint.read_config`).

  Returns:
    (stage, spec, rules); unknown keys or wrong types raise ConfigError.
  """
  s = config_lib.section
  spec = StageSpec(
      model=s(config_lib.UNetConfig, config.get("model"), "config.model"),
      text=s(config_lib.TextEncoderConfig, config.get("text"), "config.text"),
      diffusion=s(config_lib.DiffusionConfig, config.get("diffusion"), "config.diffusion"),
      sampling=s(config_lib.SamplingConfig, config.get("sampling"), "config.sampling"))
  return str(config["stage"]), spec, sharding_lib.normalize_rules(config["axis_rules"])


def default_mesh() -> Mesh:
  """One device: sampling a small batch gains nothing from replicated copies."""
  return mesh_lib.make_mesh(config_lib.MeshConfig(ici_data=1), jax.devices()[:1])


def abstract_params(spec: StageSpec, mesh: Mesh, rules: sharding_lib.Rules) -> tuple[Any, Any]:
  """ShapeDtypeStructs with shardings of the UNet and T5 params; no optimizer, no memory.

  Returns:
    (UNet params, text params), both unboxed, sharded by their logical axes.
  """

  init = lambda key: unet_lib.init_params(spec.model, key, spec.text.max_length)["params"]
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  return params, weights.abstract_params(spec.text, mesh, rules)


def load_text_params(path: str, spec: StageSpec, abstract_text: Any, step: int) -> Any:
  """The T5 a stage trained with: the one its run saved (or kept in its state),
  else the `text.weights_path` its precomputed embeddings came from."""
  text = checkpoint_lib.load_text_params(path, abstract_text, step)
  if text is not None:
    return text
  if not spec.text.weights_path:
    raise FileNotFoundError(f"{path}: the checkpoint holds no text encoder and its config has "
                            "no text.weights_path")
  return weights.restore_params(spec.text.weights_path, abstract_text)


def load_stage(path: str, *, step: int | None = None, use_ema: bool = True,
               mesh: Mesh | None = None) -> StageModel:
  """Reads a stage from the trainer's Orbax checkpoint (params and config).

  Only the (EMA) UNet params and the T5 params (saved beside the steps, kept
  in the state by older checkpoints, or `text.weights_path`) are read; the optimizer
  state stays on disk and no optimizer is built.

  Args:
    path: a training workdir or its `checkpoints` directory.
    step: checkpoint step; default the latest.
    use_ema: read `ema_params` (what the trainer samples with) or `params`.
    mesh: where the params go, sharded by their logical axes; default one device.

  Returns:
    The StageModel.
  """
  config, step = checkpoint_lib.read_config(path, step)
  stage, spec, rules = stage_config(config)
  params, text_params = abstract_params(spec, mesh or default_mesh(), rules)
  loaded = checkpoint_lib.load_params(path, params, use_ema=use_ema, step=step)
  return StageModel(stage=stage, spec=spec, params=loaded.params,
                    text_params=load_text_params(path, spec, text_params, step), step=step,
                    source=checkpoint_lib.checkpoint_directory(path), config=config)


def random_stage(sec: experiment_lib.Sections, key: jax.Array) -> StageModel:
  """A randomly initialised stage (tests and demos; never a silent fallback).

  Args:
    sec: the stage's typed config (`experiment.sections(get_config(...))`).
    key: PRNG key; the text encoder uses `fold_in(key, 1)` unless
      `sec.text.weights_path` names converted T5 weights.

  Returns:
    A StageModel on the default device.
  """
  init = jax.jit(lambda k: nn.unbox(
      unet_lib.init_params(sec.model, k, sec.text.max_length)["params"]))
  text = text_encoder_lib.load_text_encoder(sec.text, jax.random.fold_in(key, 1))
  config = {"stage": sec.stage, **{name: config_lib.to_dict(getattr(sec, name))
                                   for name in MODEL_SECTIONS + ("sampling",)}}
  return StageModel(stage=sec.stage, spec=spec_from_sections(sec), params=init(key),
                    text_params=text.params, config=config)
