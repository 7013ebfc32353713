"""Logical shardings, sharded creation, global batches, the replication check and
the golden sharding tables of the tiny configs on a (2, 2, 2) mesh."""

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
