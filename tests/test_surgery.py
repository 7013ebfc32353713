"""Imagen -> SuTI parameter surgery, exemplar-parameter detection and the
trainable masks (on the real tiny param trees, abstractly, and on small trees)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import suti_base64
from suti_jax.config import UNetConfig, section
from suti_jax.models import surgery, unet
from suti_jax.parallel import axes

SUTI = section(UNetConfig, suti_base64.get_config("tiny").model, "config.model")
IMAGEN = dataclasses.replace(SUTI, exemplar=None)


@functools.lru_cache(maxsize=None)
def _abstract(cfg: UNetConfig):
  return jax.eval_shape(functools.partial(unet.init_params, cfg, text_len=8),
                        jax.random.PRNGKey(0))


def _shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      nn.unbox(tree), is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))[0]
  return {surgery.path_names(p): x.shape for p, x in flat}


def test_is_exemplar_param_accepts_strings_tuples_and_key_paths():
  assert surgery.is_exemplar_param("params/down/level_1_block_0/exemplar_attn/attn/out/kernel")
  assert surgery.is_exemplar_param(("params", "exemplar_caption_proj_8", "bias"))
  assert not surgery.is_exemplar_param(("params", "down", "level_1_block_0", "attn", "out"))
  assert not surgery.is_exemplar_param("params/cond/text_pool/query")
  key_path = jax.tree_util.tree_flatten_with_path({"mid": {"exemplar_attn": {"k": 1}}})[0][0][0]
  assert surgery.is_exemplar_param(key_path)


def test_suti_tree_is_imagen_tree_plus_exemplar_layers():
  imagen, suti = _shapes(_abstract(IMAGEN)), _shapes(_abstract(SUTI))
  shared = {p: s for p, s in suti.items() if not surgery.is_exemplar_param(p)}
  # The exemplar encoder reuses the downstack: no second copy of any weight.
  assert shared == imagen
  exemplar_paths = set(suti) - set(shared)
  assert len(exemplar_paths) == 4 * 9 + 2
  blocks = {p[:-3] for p in exemplar_paths if p[-3:] == ("attn", "out", "kernel")}
  assert blocks == {("params", "down", "level_1_block_0", "exemplar_attn"),
                    ("params", "mid", "block", "exemplar_attn"),
                    ("params", "up", "level_1_block_0", "exemplar_attn"),
                    ("params", "up", "level_1_block_1", "exemplar_attn")}


def test_trainable_mask_selects_exactly_the_exemplar_params():
  params = _abstract(SUTI)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  paths = [surgery.path_names(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]]
  everything = jax.tree.leaves(surgery.trainable_mask(params, "all"))
  assert len(everything) == len(paths) and all(everything)
  only = jax.tree.leaves(surgery.trainable_mask(params, "exemplar_only"))
  assert only == [any(n.startswith("exemplar_") for n in p) for p in paths]
  assert sum(only) == 4 * 9 + 2
  with pytest.raises(ValueError, match="'all', 'exemplar_only'"):
    surgery.trainable_mask(params, "exemplars")


def _box(value, names):
  return nn.LogicallyPartitioned(jnp.asarray(value, jnp.float32), names)


def _small_trees():
  imagen = {"params": {"conv": {"kernel": _box(np.full((2, 3), 7.0), (axes.EMBED, axes.MLP))}}}
  suti = {"params": {
      "conv": {"kernel": _box(np.zeros((2, 3)), (axes.EMBED, axes.MLP))},
      "exemplar_attn": {"out": {"kernel": _box(np.full((3,), 2.0), (axes.NORM,))}}}}
  return imagen, suti


def test_suti_from_imagen_copies_values_and_keeps_boxes_and_new_layers():
  imagen, suti = _small_trees()
  merged = surgery.suti_from_imagen(imagen, suti)
  kernel = merged["params"]["conv"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == (axes.EMBED, axes.MLP)
  np.testing.assert_array_equal(kernel.value, np.full((2, 3), 7.0))
  np.testing.assert_array_equal(merged["params"]["exemplar_attn"]["out"]["kernel"].value,
                                np.full((3,), 2.0))
  unboxed = surgery.suti_from_imagen(nn.unbox(imagen), nn.unbox(suti))
  np.testing.assert_array_equal(unboxed["params"]["conv"]["kernel"], np.full((2, 3), 7.0))


def test_suti_from_imagen_names_the_mismatching_path():
  imagen, suti = _small_trees()
  imagen["params"]["conv"]["kernel"] = _box(np.ones((3, 3)), (axes.EMBED, axes.MLP))
  with pytest.raises(ValueError, match=r"params/conv/kernel.*\(3, 3\).*\(2, 3\)"):
    surgery.suti_from_imagen(imagen, suti)
  imagen, suti = _small_trees()
  suti["params"]["extra"] = {"bias": _box(np.zeros(3), (axes.NORM,))}
  with pytest.raises(ValueError, match="params/extra/bias is missing"):
    surgery.suti_from_imagen(imagen, suti)
  imagen, suti = _small_trees()
  imagen["params"]["old"] = {"bias": _box(np.zeros(3), (axes.NORM,))}
  with pytest.raises(ValueError, match="params/old/bias"):
    surgery.suti_from_imagen(imagen, suti)


def test_trainable_mask_drives_optax_multi_transform():
  _, suti = _small_trees()
  params = nn.unbox(suti)
  labels = jax.tree.map(lambda train: "train" if train else "freeze",
                        surgery.trainable_mask(params, "exemplar_only"))
  tx = optax.multi_transform({"train": optax.sgd(1.0), "freeze": optax.set_to_zero()}, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["params"]["conv"]["kernel"], params["params"]["conv"]["kernel"])
  np.testing.assert_array_equal(new["params"]["exemplar_attn"]["out"]["kernel"], np.ones(3))
