"""Tests for the T5 encoder: HF parity, conversion, logical axes, TextEncoder."""

import dataclasses
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from suti_jax.config import section
from suti_jax.config import TextEncoderConfig
from suti_jax.models import text
from suti_jax.models.text import t5
from suti_jax.parallel import axes

TINY = section(TextEncoderConfig, common.text_encoder(tiny=True))
_NAMES = {axes.VOCAB, axes.EMBED, axes.HEADS, axes.KV, axes.MLP, axes.NORM,
          axes.REL_POS}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """A random tiny HF T5 v1.1 encoder (byte vocab) saved as safetensors."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
  assert config.is_gated_act
  model = transformers.T5EncoderModel(config).eval()
  folder = tmp_path_factory.mktemp("hf_t5")
  model.save_pretrained(folder)
  return model, folder


def _batch(length=20, vocab=259):
  """ids int32 [3, length], mask bool [3, length]; rows 1, 2 keep 13, 12 tokens."""
  ids = np.random.default_rng(0).integers(3, vocab, (3, length)).astype(np.int32)
  mask = np.ones((3, length), bool)
  mask[1, 13:] = False
  mask[2, 12:] = False
  return np.where(mask, ids, 0).astype(np.int32), mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, ids, mask):
  """T5Encoder(cfg) output; jitted once per config and shape."""
  return t5.T5Encoder(cfg).apply({"params": params}, ids, mask)


@pytest.fixture(scope="module")
def tiny_params():
  """Random TINY params, still boxed with their logical axis names."""
  return jax.jit(t5.init_t5_params, static_argnums=0)(TINY, jax.random.key(3))


def _reference(model, ids, mask):
  """HF `last_hidden_state` [B, L, D] as numpy."""
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.last_hidden_state.numpy()


def test_relative_position_buckets_match_hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for num_buckets, max_distance in ((32, 128), (8, 32)):
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.arange(300)[None, :] - torch.arange(300)[:, None],
        bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(
        t5.relative_position_buckets(300, num_buckets, max_distance), ref.numpy())


def test_parity_from_directory(hf):
  model, folder = hf
  cfg, params = text.load_hf_encoder(str(folder))
  assert (cfg.vocab_size, cfg.num_heads, cfg.relative_attention_num_buckets) == (259, 4, 8)
  ids, mask = _batch()
  out = _apply(cfg, params, ids, mask)
  np.testing.assert_allclose(out, _reference(model, ids, mask), atol=1e-4, rtol=0)


def test_parity_from_torch_bin_without_config(hf, tmp_path):
  torch = pytest.importorskip("torch")
  model, folder = hf
  path = tmp_path / "pytorch_model.bin"
  torch.save(model.state_dict(), path)
  cfg = text.config_from_hf(model.config.to_dict())
  _, params = text.load_hf_encoder(str(path), cfg)
  ids, mask = _batch(length=40)
  out = _apply(cfg, params, ids, mask)
  np.testing.assert_allclose(out, _reference(model, ids, mask), atol=1e-4, rtol=0)
  with pytest.raises(text.CheckpointError, match="config.json"):
    text.load_hf_encoder(str(path))


def test_sharded_and_bf16_checkpoints(hf, tmp_path):
  torch = pytest.importorskip("torch")
  model, folder = hf
  cfg, params = text.load_hf_encoder(str(folder))
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  _, sharded = text.load_hf_encoder(str(tmp_path / "sharded"))
  jax.tree.map(np.testing.assert_array_equal, sharded, params)
  torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
             tmp_path / "bf16.bin")
  _, bf16 = text.load_hf_encoder(str(tmp_path / "bf16.bin"), cfg)
  assert bf16["layers_1"]["mlp"]["wo"].dtype == jnp.bfloat16
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-2),
               jax.tree.map(lambda x: x.astype(np.float32), bf16), params)


def test_conversion_errors_name_the_key(hf):
  model, folder = hf
  cfg, _ = text.load_hf_encoder(str(folder))
  state = dict(text.read_checkpoint(str(folder)))
  key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  with pytest.raises(text.CheckpointError, match=key):
    text.hf_to_params({k: v for k, v in state.items() if k != key}, cfg)
  with pytest.raises(text.CheckpointError, match=key):
    text.hf_to_params({**state, key: np.zeros((32, 65), np.float32)}, cfg)
  with pytest.raises(text.CheckpointError, match="block.1"):
    text.hf_to_params(state, dataclasses.replace(cfg, num_layers=1))
  # Seq2seq checkpoints carry the table only as `shared.weight`.
  shared = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
  shared["shared.weight"] = model.shared.weight.detach().numpy()
  np.testing.assert_array_equal(
      text.hf_to_params(shared, cfg)["token_embedder"]["embedding"],
      shared["shared.weight"])
  with pytest.raises(text.CheckpointError, match="feed_forward_proj"):
    text.config_from_hf({**model.config.to_dict(), "feed_forward_proj": "relu"})


def test_every_param_has_logical_names(tiny_params):
  params = tiny_params
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) == 3 + 9 * TINY.num_layers
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= _NAMES
  attention = params["layers_0"]["attention"]
  assert attention["query"].names == (axes.EMBED, axes.HEADS, axes.KV)
  assert attention["out"].names == (axes.HEADS, axes.KV, axes.EMBED)
  assert params["layers_0"]["mlp"]["wi_0"].names == (axes.EMBED, axes.MLP)
  assert params["relative_attention_bias"]["embedding"].names == (axes.REL_POS, axes.HEADS)
  xxl = section(TextEncoderConfig, common.text_encoder(tiny=False))
  abstract = jax.eval_shape(t5.init_t5_params, xxl, jax.random.key(0))
  mlp = abstract["layers_23"]["mlp"]["wi_1"]
  assert mlp.value.shape == (4096, 10240) and mlp.value.dtype == jnp.bfloat16


def test_padding_invariance(tiny_params):
  cfg, params = TINY, tiny_params
  ids, mask = _batch(length=10, vocab=cfg.vocab_size)
  short = _apply(cfg, params, ids, mask)
  pad = np.zeros((3, 9), np.int32)
  long = _apply(cfg, params, np.concatenate([ids, pad], 1),
                np.concatenate([mask, pad.astype(bool)], 1))
  # Length 19 vs 10 changes the attention and matmul reduction blocking: float32
  # results differ by a few ulp (measured 2.8e-6 on values up to 3.6).
  np.testing.assert_allclose(np.where(mask[..., None], long[:, :10], 0),
                             np.where(mask[..., None], short, 0), atol=1e-5, rtol=1e-5)
  assert np.isfinite(_apply(cfg, params, ids, np.zeros_like(mask))).all()


def test_bfloat16_close_to_float32(hf):
  _, folder = hf
  cfg, params = text.load_hf_encoder(str(folder))
  ids, mask = _batch()
  ref = _apply(cfg, params, ids, mask)
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  out = _apply(bf16, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params),
               ids, mask)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - ref)[mask]
  assert err.max() < 0.1 * np.abs(ref).max() and err.mean() < 0.02


def test_text_encoder_from_converted_weights(hf, tmp_path):
  model, folder = hf
  arch, params = text.load_hf_encoder(str(folder))
  path = str(tmp_path / "t5")
  text.save_params(path, params)
  cfg = dataclasses.replace(arch, weights_path=path, max_length=24)
  encoder = text.load_text_encoder(cfg)
  texts = ["a dog", "a photo of a cat on a mat", "x"]
  emb, mask = encoder.encode(texts)
  ids, ref_mask = text.ByteTokenizer().encode(texts, 24)
  np.testing.assert_array_equal(mask, ref_mask)
  ref = np.where(mask[..., None], _reference(model, ids, mask), 0)
  assert emb.dtype == jnp.float32
  np.testing.assert_allclose(emb, ref, atol=1e-4, rtol=0)
  pre = text.precompute_embeddings(encoder, texts, batch_size=2)
  # Batches of 2 vs 3 block XLA's float32 matmuls differently: a few ulp apart
  # (measured 1.5e-6 on values up to 2.8), a mixed-up row would be O(1).
  np.testing.assert_allclose(pre, emb, atol=1e-5, rtol=1e-5)
  with pytest.raises(text.CheckpointError, match="layers_2"):
    text.load_text_encoder(dataclasses.replace(cfg, num_layers=3))
  with pytest.raises(text.CheckpointError, match="'token_embedder/embedding' has shape"):
    text.load_text_encoder(dataclasses.replace(cfg, vocab_size=300))


def test_convert_cli_round_trip(hf, tmp_path):
  _, folder = hf
  out = tmp_path / "cli"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "launch.convert_t5", f"--input={folder}",
       f"--output={out}", "--dtype=bfloat16"],
      cwd=root, capture_output=True, text=True, check=True, timeout=120)
  assert "--config.text.vocab_size=259" in result.stdout
  cfg, params = text.load_hf_encoder(str(folder))
  loaded = text.load_text_encoder(
      dataclasses.replace(cfg, dtype="bfloat16", weights_path=str(out))).params
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32)),
               loaded, params)


def test_load_text_encoder_random_and_errors(tiny_params):
  first = text.load_text_encoder(TINY, jax.random.key(3))
  other = text.load_text_encoder(TINY, jax.random.key(4))
  jax.tree.map(np.testing.assert_array_equal, first.params, nn.unbox(tiny_params))
  emb = [e.encode(["a red car"])[0] for e in (first, other)]
  assert not np.allclose(emb[0], emb[1])
  assert emb[0].shape == (1, TINY.max_length, TINY.d_model)
  missing = dataclasses.replace(TINY, weights_path="/nonexistent/t5")
  with pytest.raises(FileNotFoundError, match="/nonexistent/t5"):
    text.load_text_encoder(missing)
  with pytest.raises(ValueError, match="259 ids"):
    text.TextEncoder(dataclasses.replace(TINY, vocab_size=100),
                     text.ByteTokenizer(), first.params)


def test_read_torch_strides_and_refusal(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  torch.save({"t": base.t(), "s": base[1:, 2:]}, tmp_path / "views.bin")
  state = text.read_checkpoint(str(tmp_path / "views.bin"))
  np.testing.assert_array_equal(np.asarray(state["t"]), base.t().numpy())
  np.testing.assert_array_equal(np.asarray(state["s"]), base[1:, 2:].numpy())
  torch.save({"f": functools.partial(print)}, tmp_path / "code.bin")
  with pytest.raises(text.CheckpointError, match="functools.partial"):
    text.read_checkpoint(str(tmp_path / "code.bin"))


def test_sharded_forward_matches_unsharded(tiny_params):
  # The tiny config pads the byte vocab (259) to 264 rows so the table divides
  # the tensor axis; the padding rows are never looked up.
  assert TINY.vocab_size % 2 == 0
  cfg, params = TINY, tiny_params
  ids, mask = _batch(length=TINY.max_length, vocab=259)
  ref = _apply(cfg, params, ids, mask)
  mesh = jax.sharding.Mesh(
      mesh_utils.create_device_mesh((2, 2, 2)), axes.MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with mesh, nn.logical_axis_rules(axes.DEFAULT_RULES):
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(params), mesh, axes.DEFAULT_RULES)
    sharded = jax.device_put(nn.unbox(params), nn.unbox(shardings))
    wi = sharded["layers_0"]["mlp"]["wi_0"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(axes.FSDP, axes.TENSOR)
    out = jax.jit(t5.T5Encoder(cfg).apply)({"params": sharded}, ids, mask)
  # Sharded matmuls sum their partial products in another order (measured 3e-6).
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_orbax_weights_restore_into_their_shardings(tiny_params, tmp_path):
  """Saved T5 weights come back on 8 devices already split per their logical axes
  (fsdp shards `embed`, tensor shards `heads` / `mlp`), values intact."""
  from suti_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  from suti_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from suti_jax.parallel import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "t5")
  text.save_params(path, tiny_params)
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2))
  rules = sharding_lib.normalize_rules(axes.DEFAULT_RULES)
  abstract = text.abstract_params(TINY, mesh, rules)
  restored = text.restore_params(path, abstract)
  query = restored["layers_0"]["attention"]["query"]
  assert query.sharding == jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("fsdp", "tensor", None))
  assert query.addressable_shards[0].data.shape == (query.shape[0] // 2, query.shape[1] // 2,
                                                    query.shape[2])
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding and got.dtype == want.dtype
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               jax.device_get(nn.unbox(tiny_params)))
