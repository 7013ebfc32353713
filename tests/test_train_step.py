"""The sharded train step: same numbers on every mesh, params sharded per the
rules, frozen params untouched, NaN steps not applied, SR stages, optimizer parts."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax.config import MeshConfig, OptimizerConfig
from suti_jax.diffusion import loss as loss_lib
from suti_jax.models.text import encoder as encoder_lib
from suti_jax.models.text import tokenizers
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import experiment
from suti_jax.train import metrics as metrics_lib
from suti_jax.train import optimizer as optimizer_lib
from suti_jax.train import state as state_lib
from suti_jax.train import step as step_lib


@pytest.fixture(scope="module")
def base():
  """Experiment, host state and batches, and the 1-device reference run."""
  exp = experiment.build(experiment.sections(tl.micro_config()))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=-1), devices=jax.devices()[:1])
  abstract, shardings, compiled = tl.compile_on(exp, mesh)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  host_state = jax.device_get(state)
  batches = [tl.random_batch(exp.sec, seed=i) for i in range(2)]
  metrics = []
  for b in batches:
    state, m = compiled(state, sharding_lib.global_batch(b, mesh, exp.sec.rules))
    metrics.append(jax.device_get(m))
  return dict(exp=exp, mesh=mesh, compiled=compiled, shardings=shardings, host_state=host_state,
              batches=batches, metrics=metrics, final=jax.device_get(state.params))


@pytest.mark.parametrize("data, fsdp, tensor", [
    (2, 4, 1), (2, 2, 2), pytest.param(8, 1, 1, marks=pytest.mark.slow),
    pytest.param(1, 8, 1, marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(base, data, fsdp, tensor):
  exp = base["exp"]
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor))
  _, shardings, compiled = tl.compile_on(exp, mesh)
  state = jax.device_put(base["host_state"], shardings)
  for batch, ref in zip(base["batches"], base["metrics"]):
    state, m = compiled(state, sharding_lib.global_batch(batch, mesh, exp.sec.rules))
    m = jax.device_get(m)
    np.testing.assert_allclose(m["train/loss"], ref["train/loss"], rtol=2e-5)
    np.testing.assert_allclose(m["train/grad_norm"], ref["train/grad_norm"], rtol=1e-3)
  # Adam's first steps are ~lr * sign(g): compare within a few learning rates.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-3),
               jax.device_get(state.params), base["final"])
  # Params live where the rules say: kernels split over fsdp when fsdp > 1.
  for arr, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)):
    assert arr.sharding.spec == sh.spec
  specs = [a.sharding.spec for a in jax.tree.leaves(state.params) if a.ndim == 4]
  assert any("fsdp" in s for s in specs) == (fsdp > 1)
  assert all("data" not in str(s) for s in specs)


def test_activation_sharding_constraints_reach_the_lowered_step():
  """The model's logical activation names become sharding constraints: images and
  tokens split their batch over (data, fsdp) and keep their channels whole."""
  exp = experiment.build(experiment.sections(tl.micro_config("suti")))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2))
  shapes = experiment.sharded_shapes(exp, mesh)
  text = step_lib.lower_train_step(exp.step_fn, shapes.state, shapes.batch, shapes.text, mesh,
                                   exp.sec.rules).as_text()
  specs = collections.Counter(re.findall(r"sdy.sharding_constraint %\S+ <@mesh, (\[.*?\])>", text))
  image = '[{"data", "fsdp"}, {}, {}, {}]'
  tokens = '[{"data", "fsdp"}, {}, {}]'
  assert specs[image] >= 10, specs
  assert specs[tokens] >= 2, specs


def test_non_finite_step_is_not_applied(base):
  exp, mesh = base["exp"], base["mesh"]
  state = jax.device_put(base["host_state"], base["shardings"])
  bad = dict(base["batches"][0])
  bad["image"] = bad["image"].copy()
  bad["image"][0, 0, 0, 0] = np.nan
  new, m = base["compiled"](state, sharding_lib.global_batch(bad, mesh, exp.sec.rules))
  assert float(m["train/finite"]) == 0.0
  assert int(new.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params),
               base["host_state"].params)


def test_frozen_params_stay_bit_identical_for_suti_exemplar_only():
  c = tl.micro_config("suti")
  c.optimizer.trainable = "exemplar_only"
  exp = experiment.build(experiment.sections(c))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=2, ici_fsdp=4))
  _, shardings, compiled = tl.compile_on(exp, mesh)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  before = jax.device_get((state.params, state.ema_params))
  for i in range(2):
    state, m = compiled(state, sharding_lib.global_batch(tl.random_batch(exp.sec, i), mesh,
                                                         exp.sec.rules))
    assert float(m["train/finite"]) == 1.0
  after = jax.device_get((state.params, state.ema_params))
  changed = {True: 0, False: 0}
  for which in range(2):
    flat_b = jax.tree.leaves(before[which])
    flat_a = jax.tree.leaves(after[which])
    for t, b, a in zip(jax.tree.leaves(exp.trainable), flat_b, flat_a):
      if not t:
        assert b.tobytes() == a.tobytes()
      changed[t] += int(not np.array_equal(a, b))
  assert changed[False] == 0 and changed[True] > 0


@pytest.mark.slow
def test_sr_stage_trains_alone():
  exp = experiment.build(experiment.sections(tl.sr_micro_config()))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=-1))
  _, shardings, compiled = tl.compile_on(exp, mesh)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  state, m = compiled(state, sharding_lib.global_batch(tl.random_batch(exp.sec), mesh,
                                                       exp.sec.rules))
  assert float(m["train/finite"]) == 1.0 and int(state.step) == 1


def test_low_res_is_derived_from_the_target():
  image = jnp.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
  low = step_lib.derive_low_res(image, 4)
  assert low.shape == (2, 4, 4, 3) and float(jnp.abs(low).max()) <= 1.0
  np.testing.assert_allclose(low.mean(), image.mean(), atol=1e-2)


def test_grad_accumulation_equals_full_batch_gradient():
  loss_fn = lambda p, t, b, k: (jnp.mean(jnp.square(b["x"] @ p["w"])), {})
  params = {"w": jnp.arange(6.0).reshape(3, 2) / 10}
  batch = {"x": jnp.arange(24.0).reshape(8, 3) / 7}
  (full, _), g_full = step_lib.make_grad_fn(loss_fn, 1)(params, None, batch, jax.random.PRNGKey(0))
  (acc, _), g_acc = step_lib.make_grad_fn(loss_fn, 4)(params, None, batch, jax.random.PRNGKey(0))
  # The mean of 4 micro-batch means sums in another order than one mean (1 ulp
  # measured); a wrong scale or a dropped micro-batch would be off by >= 10%.
  np.testing.assert_allclose(acc, full, rtol=1e-5)
  np.testing.assert_allclose(g_acc["w"], g_full["w"], rtol=1e-5)
  with pytest.raises(ValueError, match="does not split into 3"):
    step_lib.make_grad_fn(loss_fn, 3)(params, None, batch, jax.random.PRNGKey(0))


def test_train_step_flops_count_every_microbatch():
  """XLA counts a loop body once: the scanned step reports about half the work of
  the unrolled one, and `train_step_flops` restores it."""
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=-1), devices=jax.devices()[:1])
  flops = {}
  for accum in (1, 2):
    config = tl.micro_config()
    config.optimizer.grad_accum_steps = accum
    exp = experiment.build(experiment.sections(config))
    shapes = experiment.sharded_shapes(exp, mesh)
    compiled = step_lib.compile_train_step(exp.step_fn, shapes.state, shapes.batch, shapes.text,
                                           mesh, exp.sec.rules)
    flops[accum] = (metrics_lib.compiled_flops(compiled),
                    metrics_lib.train_step_flops(compiled, accum))
  assert flops[2][0] < 0.6 * flops[1][0]
  # Same work either way; the optimizer part, scaled too, is a few percent here.
  assert flops[2][1] == pytest.approx(flops[1][1], rel=0.05)


def test_learning_rate_schedules():
  warm = optimizer_lib.learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10))
  assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.5)
  assert float(warm(10)) == 1.0 and float(warm(1000)) == 1.0
  cos = optimizer_lib.learning_rate_schedule(OptimizerConfig(
      learning_rate=1.0, warmup_steps=10, schedule="cosine", decay_steps=100,
      end_learning_rate=0.1))
  assert float(cos(60)) == pytest.approx(0.55, abs=1e-3) and float(cos(110)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="decay_steps"):
    optimizer_lib.learning_rate_schedule(OptimizerConfig(schedule="cosine"))
  with pytest.raises(ValueError, match="known"):
    optimizer_lib.make_optimizer(OptimizerConfig(name="sgd"))


def test_ema_decay_rule_and_frozen_ema():
  constant = OptimizerConfig(ema_decay=0.999)
  assert float(optimizer_lib.ema_decay(constant, 0)) == pytest.approx(0.999)
  warm = OptimizerConfig(ema_decay=0.999, ema_warmup_steps=5)
  assert float(optimizer_lib.ema_decay(warm, 4)) == 0.0
  assert float(optimizer_lib.ema_decay(warm, 5)) == pytest.approx(0.1)
  assert float(optimizer_lib.ema_decay(warm, 10**6)) == pytest.approx(0.999)
  ema = optimizer_lib.update_ema({"a": jnp.ones(2), "b": jnp.full(2, 1 / 3)},
                                 {"a": jnp.zeros(2), "b": jnp.zeros(2)}, jnp.float32(0.5),
                                 {"a": True, "b": False})
  np.testing.assert_allclose(ema["a"], 0.5)
  assert np.asarray(ema["b"]).tobytes() == np.full(2, 1 / 3, np.float32).tobytes()


def test_frozen_mask_gives_zero_updates_and_no_state():
  tx = optimizer_lib.make_optimizer(OptimizerConfig(name="adam", warmup_steps=0),
                                    {"a": True, "b": False})
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}
  opt = tx.init(params)
  updates, _ = tx.update({"a": jnp.ones(3), "b": jnp.ones(3)}, opt, params)
  assert float(jnp.abs(updates["b"]).max()) == 0.0 and float(jnp.abs(updates["a"]).max()) > 0
  assert sum(x.size for x in jax.tree.leaves(opt)) < 2 * 3 * 2 + 2


def test_precomputed_embeddings_match_in_step_encoding():
  """Same T5: a batch carrying its embeddings (as `launch.embed_text` writes them)
  gives the in-step path's loss and grads, condition dropout included."""
  c = tl.micro_config("suti")
  c.diffusion.update(text_drop_prob=0.3, exemplar_drop_prob=0.2, both_drop_prob=0.2)
  exp = experiment.build(experiment.sections(c))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=1), jax.devices()[:1])
  text = experiment.create_text_params(exp, experiment.abstract_text(exp, mesh))
  batch = tl.random_batch(exp.sec)
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, exp.sec.text.max_length + 1, batch["text_ids"].shape[0])
  batch["text_mask"] = np.arange(exp.sec.text.max_length) < lengths[:, None]
  batch["exemplar_text_mask"][:, 1, 3:] = False
  batch["exemplar_mask"][::3, 1] = False
  batch["exemplar_text_mask"] &= batch["exemplar_mask"][..., None]
  offline = encoder_lib.TextEncoder(exp.sec.text, tokenizers.build_tokenizer(exp.sec.text), text)
  ids, mask = batch["exemplar_text_ids"], batch["exemplar_text_mask"]
  precomputed = dict(
      batch, text_emb=np.asarray(offline.encode_ids(batch["text_ids"], batch["text_mask"])[0]),
      exemplar_text_emb=np.asarray(offline.encode_ids(
          ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))[0]).reshape(
              ids.shape + (-1,)))
  params = jax.device_get(state_lib.create_state(
      exp.init, state_lib.abstract_sharded_state(exp.init, mesh, exp.sec.rules)[1],
      jax.random.PRNGKey(0), exp.sec.rules).params)
  in_step = step_lib.make_loss_fn(exp.model, exp.embed, exp.sec.diffusion)
  offline_loss = step_lib.make_loss_fn(exp.model, step_lib.precomputed_embeddings,
                                       exp.sec.diffusion)
  dropped = 0
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    keep_text, _ = jax.device_get(
        loss_lib.condition_dropout(jax.random.split(key, 4)[0], 8, exp.sec.diffusion))
    dropped += int((~keep_text).sum())
    (loss_a, _), grads_a = jax.jit(jax.value_and_grad(in_step, has_aux=True))(
        params, text, batch, key)
    # No T5 params at all on the precomputed path.
    (loss_b, _), grads_b = jax.jit(jax.value_and_grad(offline_loss, has_aux=True))(
        params, None, precomputed, key)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    scale = max(float(np.abs(g).max()) for g in flat_a)
    for a, b in zip(flat_a, flat_b, strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)
  assert dropped > 0  # The dropped-text branch was exercised.
  # The UNet ignores text under an all-False mask, so compare the conditioning
  # itself: a dropped text is a zero embedding on both paths.
  keep = np.arange(8) % 2 == 0
  mask = batch["text_mask"] & keep[:, None]
  emb_a = np.asarray(exp.embed(text, batch, "text", mask))
  emb_b = np.asarray(step_lib.precomputed_embeddings(None, precomputed, "text", mask))
  assert not emb_b[~keep].any() and not emb_a[~keep].any() and emb_b[keep].any()
  np.testing.assert_allclose(emb_b, emb_a, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="text.weights_path"):
    c.data.precomputed_embeddings = True
    experiment.build(experiment.sections(c))
