"""`checkpoint.load_params` / `load_text_params`: the params restores behind
`init_from`, `load_stage` and the experts' base model; they read (EMA) params and
the run's T5 only (also from checkpoints whose state still holds the T5), and
loading a stage builds no optimizer."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax import inference
from suti_jax.config import MeshConfig
from suti_jax.experts import renderer
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import experiment
from suti_jax.train import optimizer as optimizer_lib
from suti_jax.train import state as state_lib


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with steps 3 and 5 of a state whose params and EMA params differ."""
  workdir = tmp_path_factory.mktemp("wd")
  config = tl.micro_config()
  exp = experiment.build(experiment.sections(config))
  mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
  abstract, shardings = state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.params))
  abstract_text = experiment.abstract_text(exp, mesh)
  text = experiment.create_text_params(exp, abstract_text)
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), every_steps=1, keep=2)
  ckpt.save_text_encoder(text)
  for step in (3, 5):
    ckpt.save(step, state, data_iter={}, config=json.loads(config.to_json_best_effort()),
              meta={})
  ckpt.close()
  return str(workdir), abstract, abstract_text, jax.device_get(state), jax.device_get(text)


def test_load_params_reads_params_or_ema_and_text(saved):
  workdir, abstract, abstract_text, state, text = saved
  loaded = checkpoint_lib.load_params(workdir, abstract.params, use_ema=True)
  assert loaded.step == 5 and _equal(loaded.params, state.ema_params)
  assert _equal(checkpoint_lib.load_text_params(workdir, abstract_text), text)
  raw = checkpoint_lib.load_params(f"{workdir}/checkpoints", abstract.params, use_ema=False,
                                   step=3)
  assert raw.step == 3 and _equal(raw.params, state.params)
  # The T5 is saved once beside the steps, not inside them.
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["3", "5", "text_encoder"]
  # init_from: the same restore, given a workdir.
  assert _equal(checkpoint_lib.restore_params(workdir, abstract.params, use_ema=True),
                state.ema_params)
  with pytest.raises(FileNotFoundError, match="step 4 not in"):
    checkpoint_lib.load_params(workdir, abstract.params, use_ema=True, step=4)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint_lib.load_params(f"{workdir}/nope", abstract.params, use_ema=True)


def test_load_stage_and_base_model_build_no_optimizer(saved, monkeypatch):
  workdir, _, _, state, text = saved

  def no_optimizer(*args, **kwargs):
    raise AssertionError("loading params must not build an optimizer")

  monkeypatch.setattr(optimizer_lib, "make_optimizer", no_optimizer)
  stage = inference.load_stage(workdir)
  assert stage.step == 5 and _equal(stage.params, state.ema_params)
  assert _equal(stage.text_params, text)
  base = renderer.load_base_model(workdir, use_ema=False)
  assert _equal(base.params, state.params) and base.unet_cfg == stage.spec.model


def test_checkpoint_with_t5_in_its_state_still_restores_and_samples(saved, tmp_path):
  """A checkpoint of the old layout (TrainState.text_params in the `state` item):
  the trainer's restore reads the new state from it, `load_stage` finds its T5,
  and the stage samples."""
  workdir, abstract, abstract_text, state, text = saved
  config = checkpoint_lib.read_config(workdir)[0]
  old = str(tmp_path / "checkpoints")
  tl.write_legacy_checkpoint(old, 3, state, text, data_iter={}, config=config, meta={})
  assert checkpoint_lib.load_text_params(old, abstract_text) is not None
  ckpt = checkpoint_lib.Checkpointer(old, every_steps=0, keep=3)
  restored, _, _ = ckpt.restore(abstract)
  ckpt.close()
  assert isinstance(restored, state_lib.TrainState) and int(restored.step) == int(state.step)
  assert _equal(restored.opt_state, state.opt_state) and _equal(restored.params, state.params)
  stage = inference.load_stage(str(tmp_path))
  assert stage.step == 3 and _equal(stage.text_params, text)
  assert _equal(stage.params, state.ema_params)
  images = inference.Pipeline([stage]).text_to_image(["a toy"], 1, jax.random.PRNGKey(0),
                                                     num_steps=2)
  assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


def test_damaged_or_foreign_state_is_a_checkpoint_error(saved, tmp_path):
  """Partial restores must not hide a missing field: a state without `opt_state`
  (another model's) is reported, not half-restored."""
  _, abstract, _, state, _ = saved
  manager = ocp.CheckpointManager(str(tmp_path), item_names=checkpoint_lib.ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": state.step, "params": state.params,
                                   "ema_params": state.ema_params}),
      data_iter=ocp.args.JsonSave({}), config=ocp.args.JsonSave({}), meta=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=0, keep=3)
  with pytest.raises(checkpoint_lib.CheckpointError, match="opt_state"):
    ckpt.restore(abstract)
  ckpt.close()


def test_shipped_demo_base_installs_loads_and_samples(tmp_path):
  """`pretrained/demo_base` is what `make demo` installs: it loads as a stage
  with the demo's text length and samples."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  from suti_jax.demo import pretrained  # pylint: disable=import-outside-toplevel
  recipe = pretrained.install("pretrained/demo_base", "checkpoints", str(tmp_path / "checkpoints"))
  stage = inference.load_stage(str(tmp_path))
  assert stage.step == recipe["step"] == demo.BASE_STEPS
  assert jax.tree.leaves(stage.text_params)
  assert stage.spec.text.max_length == demo.TEXT_BYTES
  images = inference.Pipeline([stage]).text_to_image(["a toy"], 1, jax.random.PRNGKey(0),
                                                     num_steps=2)
  assert images.shape == (1, stage.image_size, stage.image_size, 3) and images.std() > 0
