"""Serving export: in-graph tokenizer, config checks, the serving checkpoint on 1
and 8 devices, and (slow) SavedModel == JAX sampler from a trained checkpoint."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from jax.experimental import jax2tf

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from configs import suti_base64
from suti_jax import inference
from suti_jax import serving
from suti_jax.config import MeshConfig
from suti_jax.diffusion import thresholding
from suti_jax.models.text import tokenizers
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train import experiment
from suti_jax.train import loop
from suti_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SavedModel (TF's XLA, optimised) vs JAX (this process, most optimisations off):
# the same program compiled twice may round differently; allowed uint8 difference.
MAX_ABS_DIFF = 2
MEAN_ABS_DIFF = 0.05


def _suti_config(**train):
  c = tl.micro_config("suti", **train)
  # EMA = params after the last step, so the trained exemplar attention is non-zero.
  c.optimizer.ema_decay = 0.0
  c.optimizer.learning_rate = 1e-2
  return c


def _assert_close(a, b):
  diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
  assert a.shape == b.shape and diff.max() <= MAX_ABS_DIFF and diff.mean() <= MEAN_ABS_DIFF, (
      diff.max(), diff.mean())


def _subject(k=2, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8), [f"toy view {i}"
                                                                    for i in range(k)]


def _tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_byte_tokenizer_in_graph_matches_host():
  texts = ["", "a toy", "ünïcödé 🐶", "x" * 40, "seven c"]
  for length in (1, 8, 16):
    ids, mask = serving.byte_tokenize_tf(tf.constant(texts), length)
    want_ids, want_mask = tokenizers.ByteTokenizer().encode(texts, length)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(mask.numpy(), want_mask)


def test_dynamic_thresholding_runs_inside_a_tf_graph():
  """The sampler's thresholding lowers to ops TensorFlow's runtime can load (the
  quantile through `lax.top_k` did not: its StableHLO composite broke export)."""
  x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3))) * 2
  converted = tf.function(jax2tf.convert(
      lambda x: thresholding.dynamic_threshold(x, 0.995), polymorphic_shapes=["(b, ...)"]),
      autograph=False)
  # TF's XLA compiles the division on its own: float32 rounding apart.
  np.testing.assert_allclose(converted(tf.constant(x0)).numpy(),
                             np.asarray(jax.jit(thresholding.dynamic_threshold,
                                                static_argnums=1)(x0, 0.995)), rtol=1e-6)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
  """A trainer checkpoint written without training (cheap): step 5 of a fresh state."""
  workdir = tmp_path_factory.mktemp("untrained")
  config = _suti_config()
  exp = experiment.build(experiment.sections(config))
  mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
  _, shardings = state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  text = experiment.create_text_params(exp, experiment.abstract_text(exp, mesh))
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), every_steps=1, keep=1)
  ckpt.save_text_encoder(text)
  ckpt.save(5, state, data_iter={}, config=json.loads(config.to_json_best_effort()),
            meta={"stage": "suti_base64"})
  ckpt.close()
  return str(workdir), config, jax.device_get(state), jax.device_get(text)


def test_export_with_mismatched_config_fails_clearly(saved_checkpoint, tmp_path):
  workdir, _, _, _ = saved_checkpoint
  with pytest.raises(serving.ConfigMismatchError,
                     match=r"model.base_channels: checkpoint 8 != config 32"):
    serving.export_cascade([workdir], [experiment.sections(suti_base64.get_config("tiny"))],
                           str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_load_stage_and_serving_checkpoint_on_1_and_8_devices(saved_checkpoint, tmp_path):
  workdir, _, state, text = saved_checkpoint
  stage = inference.load_stage(workdir)
  assert stage.step == 5 and stage.stage == "suti_base64" and stage.max_exemplars == 2
  assert _tree_equal(stage.params, state.ema_params)
  assert _tree_equal(stage.text_params, text)
  for dtype in ("float32", "bfloat16"):
    directory = str(tmp_path / dtype)
    serving.save_serving_checkpoint([stage, stage], directory, dtype=dtype)
    manifest = serving.read_manifest(directory)
    assert [s["text_index"] for s in manifest["stages"]] == [0, 0]  # T5 stored once.
    cast = jax.tree.map(lambda x: np.asarray(x).astype(dtype), state.ema_params)
    for mesh_cfg, devices in ((MeshConfig(), jax.devices()[:1]),
                              (MeshConfig(ici_data=1, ici_fsdp=8), None)):
      mesh = mesh_lib.make_mesh(mesh_cfg, devices)
      restored = serving.load_serving_checkpoint(directory, mesh=mesh)
      assert restored[0].spec == stage.spec and restored[0].step == 5
      assert _tree_equal(restored[0].params, cast)
      leaves = jax.tree.leaves(restored[0].params)
      assert {x.dtype for x in leaves} == {np.dtype(dtype)}
      assert all(len(x.sharding.device_set) == mesh.size for x in leaves)
      if mesh.size == 8:
        assert any(not x.sharding.is_fully_replicated for x in leaves)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A SuTI stage trained 2 steps by `loop.run`, exported in float32."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = _suti_config(total_steps=2, checkpoint_every_steps=2)
  loop.run(config, workdir, input_source=tl.icl_source())
  out = str(tmp_path_factory.mktemp("export"))
  card = serving.export_cascade([workdir], [experiment.sections(config)], out, num_steps=3,
                                dtype="float32")
  reference = inference.Pipeline([inference.load_stage(workdir).with_sampling(num_steps=3)])
  return workdir, out, card, reference


@pytest.mark.slow
def test_saved_model_matches_jax_sampler(exported):
  workdir, out, card, reference = exported
  assert card["stages"][0]["training_step"] == 2
  assert card["stages"][0]["source_checkpoint"] == os.path.join(workdir, "checkpoints")
  assert card["stages"][0]["unet_parameters"] == sum(
      x.size for x in jax.tree.leaves(reference.stages[0].params))
  assert card["export"]["num_steps"] == [3] and card["export_date"]
  model = tf.saved_model.load(os.path.join(out, "saved_model"))  # Keep it alive.
  assert set(model.signatures) == {"text_to_image", "text_to_image_ids", "personalize",
                                   "personalize_ids"}
  images, captions = _subject(1)
  padded = np.zeros((2, 16, 16, 3), np.uint8)
  padded[:1] = images
  for batch in (1, 3):
    want = reference.personalize(images, captions, "a toy on a beach", batch,
                                 jax.random.PRNGKey(7))
    got = model.personalize(padded, [True, False], captions + [""], ["a toy on a beach"] * batch,
                            tf.constant(7))["images"].numpy()
    _assert_close(got, want)
  want = reference.text_to_image(["a toy"], 3, jax.random.PRNGKey(3), guidance_scale=4.0)
  got = model.signatures["text_to_image"](prompt=tf.constant(["a toy"] * 3), seed=tf.constant(3),
                                          guidance_scale=tf.constant([4.0]))["images"].numpy()
  _assert_close(got, want)
  # Sampling from the serving checkpoint on 8 devices gives the training EMA's images.
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=8))
  served = inference.Pipeline(serving.load_serving_checkpoint(
      os.path.join(out, "serving_checkpoint"), mesh=mesh)).text_to_image(
          ["a toy"], 3, jax.random.PRNGKey(3), guidance_scale=4.0, num_steps=3)
  _assert_close(served, want)


@pytest.mark.slow
def test_serve_example_serves_a_request_directory(exported, tmp_path):
  _, out, _, reference = exported
  request = tmp_path / "requests" / "toy"
  request.mkdir(parents=True)
  images, captions = _subject(2, size=24)
  for i, image in enumerate(images):
    PIL.Image.fromarray(image).save(request / f"{i}.png")
  (request / "captions.txt").write_text("\n".join(captions))
  (request / "prompts.txt").write_text("a toy on a beach\n")
  subprocess.run([sys.executable, "-m", "launch.serve_example", f"--export_dir={out}",
                  f"--requests_dir={tmp_path / 'requests'}", f"--output_dir={tmp_path / 'o'}",
                  "--num_samples=2", "--seed=5"],
                 cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), check=True,
                 timeout=600)
  served = np.stack([np.asarray(PIL.Image.open(tmp_path / "o" / "toy" / f"0_{j}.png"))
                     for j in range(2)])
  want = reference.personalize(images, captions, "a toy on a beach", 2, jax.random.PRNGKey(5))
  _assert_close(served, want)


@pytest.mark.slow
def test_launch_train_then_launch_export_tiny(tmp_path):
  """End to end through the CLIs: launch/train.py's checkpoint -> launch/export.py."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", CUDA_VISIBLE_DEVICES="")
  config = "configs/imagen_base64.py:tiny"
  workdir, out = str(tmp_path / "wd"), str(tmp_path / "export")
  subprocess.run([sys.executable, "-m", "launch.train", f"--config={config}",
                  f"--workdir={workdir}", "--config.train.total_steps=2",
                  "--config.train.checkpoint_every_steps=2"],
                 cwd=ROOT, env=env, check=True, timeout=1200)
  subprocess.run([sys.executable, "-m", "launch.export", f"--checkpoint={workdir}",
                  f"--config={config}", f"--output={out}", "--steps=2"],
                 cwd=ROOT, env=env, check=True, timeout=1200)
  with open(os.path.join(out, "model_card.json")) as f:
    card = json.load(f)
  assert card["serving_dtype"] == "bfloat16" and card["stages"][0]["training_step"] == 2
  model = tf.saved_model.load(os.path.join(out, "saved_model"))
  assert set(model.signatures) == {"text_to_image", "text_to_image_ids"}
  got = model.text_to_image(["a red toy"] * 3, tf.constant(0))["images"].numpy()
  reference = inference.Pipeline(serving.load_serving_checkpoint(
      os.path.join(out, "serving_checkpoint")))
  want = reference.text_to_image(["a red toy"], 3, jax.random.PRNGKey(0), num_steps=2)
  _assert_close(got, want)
