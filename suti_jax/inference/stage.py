"""A loaded cascade stage (`StageModel`): its typed configs plus UNet (EMA) and
frozen T5 params, read from a trainer checkpoint or initialised randomly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from suti_jax import config as config_lib
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import encoder as text_encoder_lib
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import experiment as experiment_lib
from suti_jax.train import state as state_lib

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


def config_from_spec(spec: str) -> ml_collections.ConfigDict:
  """Loads `configs/x.py:arg` (the `--config` syntax) as a ConfigDict.

  Args:
    spec: a config file path, optionally followed by ':' and its argument.

  Returns:
    `get_config(arg)` of that file.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (from {spec!r})")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def default_mesh() -> Mesh:
  """One device: sampling a small batch gains nothing from replicated copies."""
  return mesh_lib.make_mesh(config_lib.MeshConfig(ici_data=1), jax.devices()[:1])


def checkpoint_directory(path: str) -> str:
  """`path` itself, or `<path>/checkpoints` when `path` is a training workdir."""
  nested = os.path.join(path, "checkpoints")
  directory = nested if os.path.isdir(nested) else path
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  return os.path.abspath(directory)


def _manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=checkpoint_lib.ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))


def checkpoint_steps(path: str) -> list[int]:
  """The complete checkpoints' steps of a workdir (or checkpoints directory), ascending."""
  manager = _manager(checkpoint_directory(path))
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def read_checkpoint_config(path: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """The config JSON item of a trainer checkpoint.

  Args:
    path: a workdir or its `checkpoints` directory.
    step: default the latest.

  Returns:
    (config dict as saved by the trainer, the step read).
  """
  directory = checkpoint_directory(path)
  manager = _manager(directory)
  steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {directory!r}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"step {step} not in {directory!r}; steps: {sorted(steps)}")
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  manager.close()
  return dict(config), step


def load_stage(path: str, *, step: int | None = None, use_ema: bool = True,
               mesh: Mesh | None = None) -> StageModel:
  """Reads a stage from the trainer's Orbax checkpoint (params and config).

  Only the (EMA) UNet params and the text params are read; the optimizer
  state stays on disk.

  Args:
    path: a training workdir or its `checkpoints` directory.
    step: checkpoint step; default the latest.
    use_ema: read `ema_params` (what the trainer samples with) or `params`.
    mesh: where the params go, sharded by their logical axes; default one device.

  Returns:
    The StageModel.
  """
  config, step = read_checkpoint_config(path, step)
  sec = experiment_lib.sections(ml_collections.ConfigDict(config))
  mesh = mesh or default_mesh()
  abstract, _ = state_lib.abstract_sharded_state(experiment_lib.build(sec).init, mesh, sec.rules)
  field = "ema_params" if use_ema else "params"
  target = {field: getattr(abstract, field), "text_params": abstract.text_params}
  manager = _manager(checkpoint_directory(path))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target,
      restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
      partial_restore=True)))["state"]
  manager.close()
  return StageModel(stage=sec.stage, spec=spec_from_sections(sec), params=restored[field],
                    text_params=restored["text_params"], step=step,
                    source=checkpoint_directory(path), config=config)


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
                    text_params=nn.unbox(text.params), config=config)
