"""Public HF T5 encoder checkpoints -> `T5Encoder` params (host numpy; `weights`
stores them as a sharded Orbax checkpoint).

Reads checkpoints with `hf_checkpoint.read_checkpoint` (safetensors or torch
zip, single or sharded, without torch), checking every key and shape; errors
name the offending key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import einops
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from suti_jax.config import TextEncoderConfig
from suti_jax.models.hf_checkpoint import CheckpointError
from suti_jax.models.hf_checkpoint import read_checkpoint
from suti_jax.models.text import t5

_EMBED_KEY = "encoder.embed_tokens.weight"
_SHARED_KEY = "shared.weight"


def config_from_hf(hf_config: Mapping[str, Any],
                   base: TextEncoderConfig | None = None) -> TextEncoderConfig:
  """The encoder architecture of an HF `config.json`, other fields from `base`.

  Args:
    hf_config: the parsed `config.json` of a T5 v1.1 model.
    base: supplies tokenizer, max_length, dtype, ...; default TextEncoderConfig().

  Returns:
    `base` with vocab_size, d_model, d_kv, d_ff, num_layers, num_heads and the
    relative-attention fields replaced.
  """
  proj = hf_config.get("feed_forward_proj", "relu")
  if proj != "gated-gelu":
    raise CheckpointError(f"feed_forward_proj={proj!r}: only T5 v1.1 "
                          "'gated-gelu' encoders are supported")
  eps = hf_config.get("layer_norm_epsilon", t5.LAYER_NORM_EPS)
  if not np.isclose(eps, t5.LAYER_NORM_EPS):
    raise CheckpointError(f"layer_norm_epsilon={eps}: expected {t5.LAYER_NORM_EPS}")
  # Older T5 v1.1 config.json files predate the relative-attention fields.
  values = {"relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, **hf_config}
  fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance")
  missing = [k for k in fields if k not in values]
  if missing:
    raise CheckpointError(f"config.json lacks {missing}")
  return dataclasses.replace(base or TextEncoderConfig(),
                             **{k: int(values[k]) for k in fields})


def _mapping(cfg: TextEncoderConfig) -> list[tuple[str, str, tuple[int, ...], Callable]]:
  """(HF key, flax path, HF shape, HF -> flax transform) for every parameter."""
  d, f, h, k = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv
  # torch Linear weights are [out, in]; flax kernels are [in, out] with the
  # heads split out of the attention projections.
  transpose = functools.partial(einops.rearrange, pattern="o i -> i o")
  qkv = functools.partial(einops.rearrange, pattern="(h k) d -> d h k", h=h)
  out = functools.partial(einops.rearrange, pattern="d (h k) -> h k d", h=h)
  entries = [
      (_EMBED_KEY, "token_embedder/embedding", (cfg.vocab_size, d), np.asarray),
      ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
       "relative_attention_bias/embedding",
       (cfg.relative_attention_num_buckets, h), np.asarray),
      ("encoder.final_layer_norm.weight", "final_norm/scale", (d,), np.asarray),
  ]
  for i in range(cfg.num_layers):
    hf, fx = f"encoder.block.{i}.layer.", f"layers_{i}/"
    entries += [(f"{hf}0.SelfAttention.{a}.weight", f"{fx}attention/{b}",
                 (h * k, d), qkv)
                for a, b in (("q", "query"), ("k", "key"), ("v", "value"))]
    entries += [
        (f"{hf}0.SelfAttention.o.weight", f"{fx}attention/out", (d, h * k), out),
        (f"{hf}0.layer_norm.weight", f"{fx}attention_norm/scale", (d,), np.asarray),
        (f"{hf}1.DenseReluDense.wi_0.weight", f"{fx}mlp/wi_0", (f, d), transpose),
        (f"{hf}1.DenseReluDense.wi_1.weight", f"{fx}mlp/wi_1", (f, d), transpose),
        (f"{hf}1.DenseReluDense.wo.weight", f"{fx}mlp/wo", (d, f), transpose),
        (f"{hf}1.layer_norm.weight", f"{fx}mlp_norm/scale", (d,), np.asarray),
    ]
  return entries


def hf_to_params(state: Mapping[str, Any], cfg: TextEncoderConfig,
                 dtype: str = "") -> dict:
  """Maps an HF T5 state dict onto the `T5Encoder(cfg)` param tree.

  Decoder and lm_head keys (full T5 checkpoints) are ignored; any other
  `encoder.*` key left over (e.g. more layers than `cfg.num_layers`) is an error.

  Args:
    state: {HF key: array-like with `.shape`}, e.g. from `read_checkpoint`.
    cfg: the architecture to check shapes against.
    dtype: cast every param to this dtype; '' keeps the checkpoint's.

  Returns:
    Nested dict of numpy arrays (unboxed), e.g. ["layers_0"]["mlp"]["wo"].
  """
  # T5EncoderModel stores the table as encoder.embed_tokens (tied to shared);
  # full seq2seq checkpoints may carry only `shared.weight`.
  if _EMBED_KEY not in state and _SHARED_KEY in state:
    state = {**state, _EMBED_KEY: state[_SHARED_KEY]}
  entries = _mapping(cfg)
  flat = {}
  for key, path, shape, transform in entries:
    if key not in state:
      raise CheckpointError(f"checkpoint lacks key {key!r} (for {path})")
    if tuple(state[key].shape) != shape:
      raise CheckpointError(f"key {key!r} has shape {tuple(state[key].shape)}, "
                            f"expected {shape} for {cfg}")
    value = transform(np.asarray(state[key]))
    flat[tuple(path.split("/"))] = np.ascontiguousarray(
        value.astype(jnp.dtype(dtype)) if dtype else value)
  used = {e[0] for e in entries}
  extra = sorted(k for k in state if k.startswith("encoder.") and k not in used)
  if extra:
    raise CheckpointError(f"unexpected encoder keys (config mismatch?): {extra[:8]}")
  return traverse_util.unflatten_dict(flat)


def load_hf_encoder(path: str, cfg: TextEncoderConfig | None = None,
                    dtype: str = "") -> tuple[TextEncoderConfig, dict]:
  """Loads a public T5 v1.1 encoder checkpoint.

  Args:
    path: an HF model directory or checkpoint file (see `read_checkpoint`).
    cfg: non-architecture fields (tokenizer, max_length, dtype); also the
      architecture when no `config.json` sits in (or beside) `path`.
    dtype: param dtype of the result; '' keeps the checkpoint's.

  Returns:
    (the config the params fit, unboxed params).
  """
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_json = os.path.join(folder, "config.json")
  if os.path.isfile(config_json):
    with open(config_json) as f:
      cfg = config_from_hf(json.load(f), cfg)
  elif cfg is None:
    raise CheckpointError(f"no config.json in {folder!r}: pass the architecture as cfg")
  return cfg, hf_to_params(read_checkpoint(path), cfg, dtype)
