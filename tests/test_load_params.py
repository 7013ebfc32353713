"""`checkpoint.load_params`: the one params restore behind `init_from`, `load_stage`
and the experts' base model; it reads (EMA) params and text params only, and
loading a stage builds no optimizer."""

import json

import jax
import numpy as np
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
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), every_steps=1, keep=2)
  for step in (3, 5):
    ckpt.save(step, state, data_iter={}, config=json.loads(config.to_json_best_effort()),
              meta={})
  ckpt.close()
  return str(workdir), abstract, jax.device_get(state)


def test_load_params_reads_params_or_ema_and_text(saved):
  workdir, abstract, state = saved
  loaded = checkpoint_lib.load_params(workdir, abstract.params, use_ema=True,
                                      abstract_text_params=abstract.text_params)
  assert loaded.step == 5
  assert _equal(loaded.params, state.ema_params) and _equal(loaded.text_params, state.text_params)
  raw = checkpoint_lib.load_params(f"{workdir}/checkpoints", abstract.params, use_ema=False,
                                   step=3)
  assert raw.step == 3 and raw.text_params is None and _equal(raw.params, state.params)
  # init_from: the same restore, given a workdir.
  assert _equal(checkpoint_lib.restore_params(workdir, abstract.params, use_ema=True),
                state.ema_params)
  with pytest.raises(FileNotFoundError, match="step 4 not in"):
    checkpoint_lib.load_params(workdir, abstract.params, use_ema=True, step=4)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint_lib.load_params(f"{workdir}/nope", abstract.params, use_ema=True)


def test_load_stage_and_base_model_build_no_optimizer(saved, monkeypatch):
  workdir, _, state = saved

  def no_optimizer(*args, **kwargs):
    raise AssertionError("loading params must not build an optimizer")

  monkeypatch.setattr(optimizer_lib, "make_optimizer", no_optimizer)
  stage = inference.load_stage(workdir)
  assert stage.step == 5 and _equal(stage.params, state.ema_params)
  assert _equal(stage.text_params, state.text_params)
  base = renderer.load_base_model(workdir, use_ema=False)
  assert _equal(base.params, state.params) and base.unet_cfg == stage.spec.model
