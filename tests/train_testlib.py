"""Shared set-up of the training tests: a micro UNet config that compiles fast
on CPU, in-memory input sources and a runner for `loop.run` in a workdir."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import imagen_base64
from configs import suti_base64


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """XLA CPU compiles of the UNet step dominate test time; optimizations are
  not what these tests check (import this fixture into a test module)."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def micro_config(stage: str = "base64", **train):
  """The `tiny` config shrunk further (one attention level, 1-layer T5)."""
  c = (suti_base64 if stage == "suti" else imagen_base64).get_config("tiny")
  c.model.base_channels = 8
  c.model.channel_mults = (1, 2)
  c.model.num_res_blocks = (1, 1)
  c.model.attention_resolutions = (8,)
  c.text.num_layers = 1
  c.text.max_length = 8
  c.train.batch_size = 8
  c.train.total_steps = 4
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = -1
  c.optimizer.warmup_steps = 0
  c.data.shuffle_buffer = 8
  if stage == "suti":
    c.model.exemplar.max_exemplars = 2
    c.data.kind = "synthetic"
  for k, v in train.items():
    c.train[k] = v
  return c


def caption_source(size: int = 16, n: int = 32, seed: int = 0):
  """n (uint8 image, caption) pairs."""
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), f"a toy number {i}")
          for i in range(n)]


def icl_source(size: int = 16, n: int = 32, k: int = 2, seed: int = 0):
  """n ICL groups with k exemplars each."""
  rng = np.random.default_rng(seed)
  return [dict(target_image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
               target_prompt=f"toy {i} on a beach",
               exemplar_images=[rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                                for _ in range(k)],
               exemplar_captions=[f"toy {i} view {j}" for j in range(k)])
          for i in range(n)]


def sr_micro_config():
  """The SR 64->256 `tiny` config shrunk like `micro_config` (32 px from 16 px)."""
  from configs import imagen_sr256  # pylint: disable=import-outside-toplevel
  c = imagen_sr256.get_config("tiny")
  c.model.base_channels = 8
  c.model.num_res_blocks = (1, 1)
  c.text.num_layers = 1
  c.text.max_length = 8
  c.train.batch_size = 8
  c.optimizer.warmup_steps = 0
  return c


def random_batch(sec, seed: int = 0):
  """A random host batch matching `batch_spec` of the typed config `sec`."""
  from suti_jax.data import input as input_lib  # pylint: disable=import-outside-toplevel
  from suti_jax.train import experiment  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  spec = input_lib.batch_spec(sec.model.image_size, sec.text.max_length,
                              experiment.max_exemplars(sec), sec.train.batch_size)
  out = {}
  for k, s in spec.items():
    if s.dtype == np.float32:
      out[k] = rng.uniform(-1, 1, s.shape).astype(np.float32)
    elif s.dtype == np.int32:
      out[k] = rng.integers(3, 200, s.shape).astype(np.int32)
    else:
      out[k] = np.ones(s.shape, bool)
  return out


def compile_on(exp, mesh):
  """(abstract state, state shardings, step(state, batch)) of `exp` on `mesh`; the
  step is the compiled train step with the run's T5 params (seed init) bound."""
  from suti_jax.train import experiment  # pylint: disable=import-outside-toplevel
  from suti_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  shapes = experiment.sharded_shapes(exp, mesh)
  compiled = step_lib.compile_train_step(exp.step_fn, shapes.state, shapes.batch, shapes.text,
                                         mesh, exp.sec.rules)
  text = experiment.create_text_params(exp, shapes.text)
  return shapes.state, shapes.shardings, lambda state, batch: compiled(state, batch, text)


def write_legacy_checkpoint(directory, step, state, text, *, data_iter, config, meta):
  """Writes `step` as the trainer did before the T5 left the TrainState: the T5
  params as a `text_params` field of the `state` item, no `text_encoder/`."""
  # pylint: disable=import-outside-toplevel
  from typing import Any

  import orbax.checkpoint as ocp
  from flax import struct

  from suti_jax.train import checkpoint as checkpoint_lib

  class LegacyState(struct.PyTreeNode):
    step: Any
    params: Any
    ema_params: Any
    opt_state: Any
    text_params: Any

  legacy = LegacyState(step=state.step, params=state.params, ema_params=state.ema_params,
                       opt_state=state.opt_state, text_params=text)
  manager = ocp.CheckpointManager(directory, item_names=checkpoint_lib.ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(legacy), data_iter=ocp.args.JsonSave(data_iter),
      config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()
