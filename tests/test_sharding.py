"""Logical shardings, sharded creation, global batches, the replication check and
the golden sharding tables of the tiny configs on a (2, 2, 2) mesh."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import imagen_base64
from configs import suti_base64
from launch import sharding_dump
from suti_jax.config import MeshConfig
from suti_jax.parallel import axes
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
RULES = sharding_lib.normalize_rules(axes.DEFAULT_RULES)


def _mesh(data, fsdp, tensor=1):
  return mesh_lib.make_mesh(MeshConfig(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor))


@pytest.mark.parametrize("name, module", [("imagen_base64", imagen_base64),
                                          ("suti_base64", suti_base64)])
def test_tiny_sharding_matches_golden(name, module):
  table = sharding_dump.dump(module.get_config("tiny"), (2, 2, 2))
  with open(os.path.join(GOLDEN, f"sharding_{name}_tiny_2x2x2.json"), encoding="utf-8") as f:
    golden = json.load(f)
  assert sorted(table) == sorted(golden), "state paths changed"
  diffs = {k: (golden[k], table[k]) for k in golden if golden[k] != table[k]}
  assert not diffs, f"{len(diffs)} entries differ, e.g. {next(iter(diffs.items()))}"
  # The rules really shard: kernels on fsdp/tensor, moments like their params.
  kernel = next(k for k in table if k.startswith("params/") and k.endswith("/kernel")
                and len(table[k]["shape"]) == 4 and table[k]["shape"][2] % 2 == 0)
  assert table[kernel]["spec"][2:] == ["fsdp", "tensor"]
  moments = [k for k in table if k.startswith("opt_state/") and k.endswith(kernel[len("params"):])]
  assert moments and all(table[m]["spec"] == table[kernel]["spec"] for m in moments)


PAPER_GOLDEN = os.path.join(GOLDEN, "sharding_suti_base64_paper_adafactor_2x2x2.json")


def _paper_adafactor_table():
  """Adafactor state of the paper-size suti_base64 on (2, 2, 2): eval_shape only."""
  table = sharding_dump.dump(suti_base64.get_config(), (2, 2, 2))
  return {k: v for k, v in table.items() if k.startswith("opt_state/")}


def test_paper_size_adafactor_state_matches_golden():
  """Regenerate with `python tests/test_sharding.py` after an intended change."""
  table = _paper_adafactor_table()
  with open(PAPER_GOLDEN, encoding="utf-8") as f:
    golden = json.load(f)
  assert sorted(table) == sorted(golden), "optimizer state paths changed"
  diffs = {k: (golden[k], table[k]) for k in golden if golden[k] != table[k]}
  assert not diffs, f"{len(diffs)} entries differ, e.g. {next(iter(diffs.items()))}"
  # Square kernels: v_row keeps the first of the two equal dims (fsdp).
  row = "opt_state/1/0/v_row/down/level_0_block_0/res/conv_0/kernel"
  assert table[row]["shape"] == [3, 3, 512] and table[row]["spec"] == [None, None, "fsdp"]


def test_logical_shardings_and_fit():
  mesh = _mesh(2, 2, 2)
  boxed = jax.eval_shape(lambda: {
      "w": nn.LogicallyPartitioned(jnp.zeros((8, 6)), (axes.EMBED, axes.MLP)),
      "odd": nn.LogicallyPartitioned(jnp.zeros((259, 4)), (axes.VOCAB, axes.EMBED)),
      "b": jnp.zeros((6,))})
  shardings = sharding_lib.logical_shardings(boxed, mesh, RULES)
  assert shardings["w"].spec == P("fsdp", "tensor")
  assert shardings["odd"].spec == P(None, "fsdp")  # 259 rows do not split in 2.
  assert shardings["b"].spec == P(None)


def test_derived_shardings_follow_params_for_adafactor():
  mesh = _mesh(1, 4, 2)
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((256, 512), jnp.float32)}}
  param_sh = {"dense": {"kernel": jax.sharding.NamedSharding(mesh, P("fsdp", "tensor"))}}
  opt = jax.eval_shape(optax.adafactor(1e-3).init, params)
  table = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      sharding_lib.derived_shardings(opt, params, param_sh, mesh))[0]}
  shapes = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(opt)[0]}
  row = next(k for k in table if "v_row" in k and shapes[k] == (256,))
  col = next(k for k in table if "v_col" in k and shapes[k] == (512,))
  assert table[row] == P("fsdp") and table[col] == P("tensor")
  adam = jax.eval_shape(optax.adam(1e-3).init, params)
  for path, s in jax.tree_util.tree_flatten_with_path(
      sharding_lib.derived_shardings(adam, params, param_sh, mesh))[0]:
    expected = P("fsdp", "tensor") if "mu" in str(path) or "nu" in str(path) else P()
    assert s.spec == expected, path


def _by_role(tree, role):
  return {jax.tree_util.keystr(p[-2:]): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if role in jax.tree_util.keystr(p)}


def test_derived_shardings_for_square_adafactor_kernels():
  """Square kernels are where 'drop the first dim that fits' went wrong: optax
  reduces the *last* of two equal dims for v_row (keeping dim 0, here fsdp)."""
  mesh = _mesh(1, 4, 2)
  params = {"dense": {"kernel": jnp.zeros((256, 256))},
            "conv": {"kernel": jnp.zeros((3, 3, 128, 128))}}
  specs = {"dense": {"kernel": P("fsdp", "tensor")},
           "conv": {"kernel": P(None, None, "fsdp", "tensor")}}
  param_sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                          is_leaf=lambda s: isinstance(s, P))
  tx = optax.adafactor(1e-3)
  opt = jax.eval_shape(tx.init, params)
  derived = sharding_lib.derived_shardings(opt, params, param_sh, mesh)
  rows, cols = _by_role(derived, "v_row"), _by_role(derived, "v_col")
  assert rows["['dense']['kernel']"].spec == P("fsdp")
  assert cols["['dense']['kernel']"].spec == P("tensor")
  assert rows["['conv']['kernel']"].spec == P(None, None, "fsdp")
  assert cols["['conv']['kernel']"].spec == P(None, None, "tensor")
  # What optax really computes: grads that vary along dim 0 only give a v_row
  # that varies (it kept dim 0) and a constant v_col (it averaged dim 0 away).
  grads = {"dense": {"kernel": jnp.broadcast_to(jnp.arange(1.0, 257.0)[:, None], (256, 256))},
           "conv": {"kernel": jnp.broadcast_to(jnp.arange(1.0, 129.0)[:, None], (3, 3, 128, 128))}}
  _, state = tx.update(grads, tx.init(params), params)
  v_rows, v_cols = _by_role(state, "v_row"), _by_role(state, "v_col")
  for name in ("['dense']['kernel']", "['conv']['kernel']"):
    assert np.ptp(np.asarray(v_rows[name])) > 0 and np.ptp(np.asarray(v_cols[name])) == 0


def test_fit_spec_logs_each_replicated_dim_once_with_paths(caplog):
  mesh = _mesh(2, 2, 2)
  boxed = jax.eval_shape(lambda: {
      "a": nn.LogicallyPartitioned(jnp.zeros((259, 4)), (axes.VOCAB, axes.EMBED)),
      "b": nn.LogicallyPartitioned(jnp.zeros((259, 8)), (axes.VOCAB, axes.EMBED)),
      "c": nn.LogicallyPartitioned(jnp.zeros((3, 8)), (axes.EMBED, axes.MLP))})
  replicated = []
  assert sharding_lib.fit_spec(P("tensor", "fsdp"), (259, 4), mesh, replicated) == P(None, "fsdp")
  assert replicated == [(0, 259, ("tensor",))]
  with caplog.at_level("INFO"):
    sharding_lib.logical_shardings(boxed, mesh, RULES)
  lines = [r.getMessage() for r in caplog.records if "replicated in" in r.getMessage()]
  assert len(lines) == 2, lines  # (259, tensor) and (3, fsdp): one line each.
  vocab = next(line for line in lines if "size 259" in line)
  assert "2 array(s)" in vocab and "a[0]" in vocab and "b[0]" in vocab


def test_serving_checkpoint_restores_with_its_stored_rules(tmp_path):
  """A stage trained with swapped conv rules is served with them, not DEFAULT_RULES."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from suti_jax import inference, serving  # pylint: disable=import-outside-toplevel
  from suti_jax.train import experiment  # pylint: disable=import-outside-toplevel
  swapped = {axes.CONV_IN: axes.TENSOR, axes.CONV_OUT: axes.FSDP}
  rules = [[name, swapped.get(name, target)] for name, target in axes.DEFAULT_RULES]
  config = imagen_base64.get_config("tiny")
  config.model.channel_mults, config.model.num_res_blocks = (1, 2), (1, 1)
  config.text.num_layers, config.text.max_length = 1, 8
  stage = inference.random_stage(experiment.sections(config), jax.random.PRNGKey(0))
  stage = dataclasses.replace(stage, config={**stage.config, "axis_rules": rules})
  directory = str(tmp_path / "serving")
  serving.save_serving_checkpoint([stage], directory, dtype="float32")
  stored = serving.read_manifest(directory)["stages"][0]["axis_rules"]
  assert sharding_lib.normalize_rules(stored) == sharding_lib.normalize_rules(rules)
  mesh = _mesh(1, 4, 2)
  kernel = lambda s: s[0].params["down"]["level_0_block_0"]["res"]["conv_0"]["kernel"].sharding
  assert kernel(serving.load_serving_checkpoint(directory, mesh=mesh)).spec == P(
      None, None, "tensor", "fsdp")
  assert kernel(serving.load_serving_checkpoint(directory, mesh=mesh, rules=RULES)).spec == P(
      None, None, "fsdp", "tensor")


def _act_channels_repro():
  path = os.path.join(os.path.dirname(GOLDEN), os.pardir, "docs", "act_channels_repro.py")
  spec = importlib.util.spec_from_file_location("act_channels_repro", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conv_input_grad_is_exact_with_the_default_rules():
  """The harness of the guard below: activation channels whole (our rule) is exact."""
  assert _act_channels_repro().input_grad_error(act_channels=None) < 1e-5


@pytest.mark.xfail(strict=True, reason="XLA SPMD partitioner swaps batch blocks of a conv "
                   "input gradient (docs/act_channels_xla_report.md); when this passes, "
                   "restore act_channels -> tensor in parallel/axes.py")
def test_conv_input_grad_with_act_channels_on_tensor_is_exact():
  assert _act_channels_repro().input_grad_error(act_channels="tensor") < 1e-5


def test_create_sharded_places_shards():
  mesh = _mesh(1, 8)
  init = lambda key: {"w": nn.LogicallyPartitioned(
      jax.random.normal(key, (16, 4)), (axes.EMBED, None))}
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, RULES)
  out = sharding_lib.create_sharded(init, shardings, jax.random.PRNGKey(0))
  assert out["w"].sharding.spec == P("fsdp", None)
  assert out["w"].addressable_shards[0].data.shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(out["w"]),
                                np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 4))))


def test_global_batch_shards_act_batch_over_data_and_fsdp():
  mesh = _mesh(2, 4)
  host = {"image": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
          "text_mask": np.ones((8, 5), bool)}
  batch = sharding_lib.global_batch(host, mesh, RULES)
  assert batch["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
  assert batch["image"].addressable_shards[3].data.shape == (1, 2, 2, 3)
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])


def test_sufficiently_sharded_check():
  mesh = _mesh(1, 8)
  good = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32,
                                    sharding=jax.sharding.NamedSharding(mesh, P("fsdp")))}
  bad = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32,
                                   sharding=jax.sharding.NamedSharding(mesh, P()))}
  assert sharding_lib.assert_params_sufficiently_sharded(good, mesh) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="more bytes per device"):
    sharding_lib.assert_params_sufficiently_sharded(bad, mesh)
  assert sharding_lib.assert_params_sufficiently_sharded(bad, mesh, raise_error=False) > 1.0
  # Pure data parallelism keeps full copies on purpose: nothing to check.
  assert sharding_lib.assert_params_sufficiently_sharded(bad, _mesh(8, 1)) == 0.0
  # Below `raise_above_bytes` (16 KiB here) the trainer's check only warns.
  assert sharding_lib.assert_params_sufficiently_sharded(
      bad, mesh, raise_above_bytes=sharding_lib.RAISE_ABOVE_PARAM_BYTES) > 1.0
  with pytest.raises(ValueError):
    sharding_lib.assert_params_sufficiently_sharded(bad, mesh, raise_above_bytes=64 * 64 * 4)


if __name__ == "__main__":
  # Rewrites the paper-size golden file (one entry per line, as sharding_dump).
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = _paper_adafactor_table()
  with open(PAPER_GOLDEN, "w", encoding="utf-8") as out:
    out.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                                  for k, v in sorted(rows.items())) + "\n}\n")
  print(f"wrote {len(rows)} entries to {PAPER_GOLDEN}")
