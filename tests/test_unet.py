"""Imagen / Efficient UNet: shapes and dtypes of every tiny config, boxed
logical axis names on every parameter, text-mask semantics and SR inputs."""

import dataclasses
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti_jax.config import UNetConfig, section
from suti_jax.models import layers, unet
from suti_jax.parallel import axes

# Cheap XLA CPU compiles: these tests check numbers, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
TEXT_LEN = 10
CONFIGS = {
    "imagen_base64": ("imagen_base64", {}),
    "imagen_base64_bf16": ("imagen_base64", {"dtype": "bfloat16"}),
    "imagen_sr256": ("imagen_sr256", {}),
    "imagen_sr256_bf16": ("imagen_sr256", {"dtype": "bfloat16"}),
    "imagen_sr1024": ("imagen_sr1024", {}),
    "suti_base64": ("suti_base64", {}),
    "suti_sr256": ("suti_sr256", {}),
}
ALL_AXES = {v for k, v in vars(axes).items() if k.isupper() and isinstance(v, str)}


@functools.lru_cache(maxsize=None)
def _config(name: str) -> UNetConfig:
  module, changes = CONFIGS[name]
  model = importlib.import_module(f"configs.{module}").get_config("tiny").model
  return dataclasses.replace(section(UNetConfig, model, "config.model"), **changes)


@functools.lru_cache(maxsize=None)
def _abstract(name: str):
  """(output, variables with intermediates) as ShapeDtypeStructs; trace only."""
  cfg = _config(name)
  inputs = unet.dummy_inputs(cfg, 2, TEXT_LEN)
  init = lambda key: unet.UNet(cfg).init_with_output(
      key, **inputs, capture_intermediates=True)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def _random_params(variables, seed: int = 0):
  """Boxed params filled with N(0, 1/fan_in) numbers (no RNG compile)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
    return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype)

  return {"params": jax.tree.map(fill, variables["params"])}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_and_compute_dtype(name):
  cfg = _config(name)
  out, variables = _abstract(name)
  assert out.shape == (2, cfg.image_size, cfg.image_size, cfg.out_channels)
  assert out.dtype == jnp.float32
  # Every ResBlock computes in the configured dtype.
  flat = jax.tree_util.tree_flatten_with_path(variables["intermediates"])[0]
  res_outputs = [leaf for path, leaf in flat if "res" in jax.tree_util.keystr(path)]
  assert len(res_outputs) >= 2 * sum(cfg.num_res_blocks) + 2
  assert {x.dtype for x in res_outputs} == {jnp.dtype(cfg.dtype)}
  # Parameters keep param_dtype whatever the compute dtype.
  assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_param_is_boxed_with_logical_names(name):
  params = _abstract(name)[1]["params"]
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  assert len(leaves) > 50
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    names = leaf.names
    assert len(names) == leaf.value.ndim and set(names) <= ALL_AXES, where
    if leaf.value.ndim == 4:
      assert names == (axes.CONV_HEIGHT, axes.CONV_WIDTH, axes.CONV_IN, axes.CONV_OUT), where
    if where.endswith("['query']['kernel']") or where.endswith("['key']['kernel']"):
      assert names == (axes.EMBED, axes.HEADS, axes.KV), where
    if where.endswith("['out']['kernel']"):
      assert names == (axes.HEADS, axes.KV, axes.EMBED), where
    if "norm" in where:
      assert names == (axes.NORM,), where


def test_sr1024_has_no_self_attention_and_text_only_at_lowest():
  params = _abstract("imagen_sr1024")[1]["params"]
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert not any("['attn']" in p for p in paths)
  text_blocks = {p.split("['text_attn']")[0] for p in paths if "['text_attn']" in p}
  # Lowest level (32 px = level 1) in down, middle and up; nothing at 64 px.
  assert text_blocks == {"['down']['level_1_block_0']", "['mid']['block']",
                         "['up']['level_1_block_0']"}
  # Efficient UNet: one skip per level, so up levels have num_res_blocks blocks.
  assert not any("['up']['level_0_block_1']" in p for p in paths)


@pytest.mark.parametrize("name", ["suti_base64", "imagen_sr256"])
def test_level_end_layout_attends_once_per_level(name):
  every = dataclasses.replace(_config(name), num_res_blocks=(2,) * len(_config(name).num_res_blocks))
  level_end = dataclasses.replace(every, attention_layout="level_end")

  def attending_blocks(cfg):
    inputs = unet.dummy_inputs(cfg, 1, TEXT_LEN)
    params = jax.eval_shape(lambda k: unet.UNet(cfg).init(k, **inputs),
                            jax.random.PRNGKey(0))["params"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {p.split("['res']")[0].split("['attn']")[0].split("['text_attn']")[0]
            .split("['exemplar_attn']")[0]
            for p in paths if any(f"['{a}']" in p for a in ("attn", "text_attn", "exemplar_attn"))}

  every_blocks, end_blocks = attending_blocks(every), attending_blocks(level_end)
  # Up levels of the ADM layout hold one block more (its extra skip connection).
  up_last = 1 if every.efficient else 2
  assert end_blocks and end_blocks < every_blocks
  for block in end_blocks:
    if block.startswith("['down']"):
      assert block.endswith("_block_1']"), block
    elif block.startswith("['up']"):
      assert block.endswith(f"_block_{up_last}']"), block
    else:
      assert block == "['mid']['block']", block
  with pytest.raises(ValueError, match="attention_layout must be one of"):
    unet.validate_config(dataclasses.replace(every, attention_layout="sometimes"))


def _apply_fn(cfg):
  return jax.jit(lambda params, kwargs: unet.UNet(cfg).apply(params, **kwargs),
                 compiler_options=FAST_COMPILE)


def _text(rng, b, length, d):
  return jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)


def test_base_text_padding_changes_nothing_and_null_text_is_finite():
  cfg = _config("imagen_base64")
  params = _random_params(_abstract("imagen_base64")[1])
  apply = _apply_fn(cfg)
  rng = np.random.default_rng(1)
  b, d, valid = 4, cfg.text_embed_dim, 6
  x_t = jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32)
  log_snr = jnp.asarray([-3.0, 0.0, 2.0, 5.0])
  text = _text(rng, b, valid, d)
  short = apply(params, dict(x_t=x_t, log_snr=log_snr, text_emb=text,
                             text_mask=jnp.ones((b, valid), bool)))
  # Same text plus garbage padding tokens (mask False): nothing changes.
  padded_text = jnp.concatenate([text, 100 * _text(rng, b, TEXT_LEN - valid, d)], 1)
  padded_mask = jnp.arange(TEXT_LEN)[None, :].repeat(b, 0) < valid
  padded = apply(params, dict(x_t=x_t, log_snr=log_snr, text_emb=padded_text,
                              text_mask=padded_mask))
  np.testing.assert_allclose(padded, short, atol=2e-5, rtol=1e-5)
  # Other text does change the output; an all-False mask (null text) is finite
  # and does not depend on the (garbage) embeddings.
  other = apply(params, dict(x_t=x_t, log_snr=log_snr, text_emb=_text(rng, b, TEXT_LEN, d),
                             text_mask=jnp.ones((b, TEXT_LEN), bool)))
  assert float(jnp.abs(other - padded).mean()) > 1e-3
  no_mask = jnp.zeros((b, TEXT_LEN), bool)
  null_a = apply(params, dict(x_t=x_t, log_snr=log_snr, text_emb=padded_text, text_mask=no_mask))
  null_b = apply(params, dict(x_t=x_t, log_snr=log_snr, text_emb=-padded_text, text_mask=no_mask))
  assert bool(jnp.all(jnp.isfinite(null_a)))
  np.testing.assert_allclose(null_a, null_b, atol=1e-6)
  assert float(jnp.abs(null_a - short).mean()) > 1e-3
  # log-SNR conditioning matters.
  other_snr = apply(params, dict(x_t=x_t, log_snr=-log_snr, text_emb=padded_text,
                                 text_mask=padded_mask))
  assert float(jnp.abs(other_snr - padded).mean()) > 1e-3


def test_sr_text_mask_low_res_and_aug_level():
  cfg = _config("imagen_sr1024")  # Efficient UNet, cross-attention text.
  params = _random_params(_abstract("imagen_sr1024")[1], seed=2)
  apply = _apply_fn(cfg)
  rng = np.random.default_rng(3)
  b, d, valid = 2, cfg.text_embed_dim, 4
  base = dict(
      x_t=jnp.asarray(rng.normal(size=(b, 64, 64, 3)), jnp.float32),
      log_snr=jnp.asarray([0.0, 3.0]),
      text_emb=_text(rng, b, TEXT_LEN, d),
      text_mask=jnp.arange(TEXT_LEN)[None, :].repeat(b, 0) < valid,
      low_res=jnp.asarray(rng.uniform(-1, 1, size=(b, 32, 32, 3)), jnp.float32),
      aug_log_snr=jnp.asarray([5.0, 5.0]))
  out = apply(params, base)
  assert out.shape == (b, 64, 64, 3) and bool(jnp.all(jnp.isfinite(out)))
  garbage = base["text_emb"].at[:, valid:].set(50.0)
  np.testing.assert_allclose(apply(params, {**base, "text_emb": garbage}), out,
                             atol=2e-5, rtol=1e-5)
  null = apply(params, {**base, "text_mask": jnp.zeros((b, TEXT_LEN), bool)})
  assert bool(jnp.all(jnp.isfinite(null)))
  for key, value in (("low_res", -base["low_res"]), ("aug_log_snr", jnp.asarray([-2.0, -2.0])),
                     ("text_mask", jnp.ones((b, TEXT_LEN), bool))):
    assert float(jnp.abs(apply(params, {**base, key: value}) - out).mean()) > 1e-3, key
  with pytest.raises(ValueError, match="low_res"):
    unet.UNet(cfg).apply(params, **{**base, "low_res": None})


def test_repeat_pixels_is_the_nearest_neighbour_resize_without_scatter():
  """Upsample's pixel repeat equals jax.image.resize('nearest') at 2x, and its
  gradient is a sum, not the resize's scatter-add."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
  np.testing.assert_array_equal(layers.repeat_pixels(x),
                                jax.image.resize(x, (2, 6, 10, 4), "nearest"))
  grad = jax.jit(jax.grad(lambda a: jnp.sum(layers.repeat_pixels(a) ** 2)))
  assert "scatter" not in grad.lower(x).as_text()
  np.testing.assert_allclose(grad(x), 8 * x, rtol=1e-6)  # Each pixel appears 4 times.


@pytest.mark.parametrize("shape", [(2, 4, 4, 96), (3, 5, 64), (2, 8, 8, 32)])
def test_group_norm_matches_flax_group_norm_on_its_parameters(shape):
  """layers.GroupNorm takes flax's GroupNorm parameter tree and gives its outputs
  and gradients to float32 rounding; groups that do not divide the channels fail."""
  channels = shape[-1]
  groups = layers.num_groups(channels)
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2 + 0.5
  reference = nn.GroupNorm(num_groups=groups)
  params = reference.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                        params)
  ours = layers.GroupNorm(groups)
  assert (jax.tree.map(jnp.shape, nn.meta.unbox(ours.init(jax.random.PRNGKey(1), x)))
          == jax.tree.map(jnp.shape, params))
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.PRNGKey(3), shape)
  grad = lambda m: jax.grad(lambda p, a: jnp.sum(weights * m.apply(p, a)), (0, 1))(params, x)
  for ours_grad, flax_grad in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(reference))):
    np.testing.assert_allclose(ours_grad, flax_grad, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="do not divide"):
    layers.GroupNorm(5).init(jax.random.PRNGKey(1), x)
