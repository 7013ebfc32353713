"""The frozen T5 v1.1 encoder (Raffel et al. 2020; v1.1 = gated-GELU, no biases).

Numerically matches HF `T5EncoderModel` (`feed_forward_proj="gated-gelu"`) so
public checkpoints load through `convert.py`. Every parameter is logically boxed.
"""

from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from suti_jax.config import TextEncoderConfig
from suti_jax.parallel import axes

# T5 v1.1 (and HF's T5Config default) uses this RMSNorm epsilon everywhere.
LAYER_NORM_EPS = 1e-6


def relative_position_buckets(length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 relative-position buckets (Mesh TensorFlow's scheme).

  Computed in numpy float32 at trace time, like the reference implementations,
  so bucket boundaries (where the log lands on an integer) agree exactly.

  Args:
    length: sequence length L (queries and keys alike).
    num_buckets: total buckets; half for keys before, half for keys after.
    max_distance: distances >= this share the last bucket.

  Returns:
    int32 [L, L] bucket ids, indexed [query, key].
  """
  position = np.arange(length, dtype=np.int64)
  relative = position[None, :] - position[:, None]  # key - query
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  is_small = distance < max_exact
  # Distances below max_exact would give log(0); they take the exact branch.
  safe = np.maximum(distance, 1).astype(np.float32)
  log_ratio = np.log(safe / np.float32(max_exact)) / np.float32(
      math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, distance, large)).astype(np.int32)


class RMSNorm(nn.Module):
  """T5 LayerNorm: scale only, no mean subtraction; statistics in float32."""

  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
        (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(variance + LAYER_NORM_EPS)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def _kernel(module: nn.Module, name: str, shape: tuple[int, ...],
            names: tuple[str, ...], in_axis: int | tuple[int, ...],
            out_axis: int | tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  """A fan-in scaled, logically boxed projection kernel of `module`."""
  init = nn.initializers.variance_scaling(
      1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis)
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with an additive position bias and no scaling.

  T5 folds the 1/sqrt(d_kv) factor into its initialisation, so the q.k product
  is not scaled here either.
  """

  num_heads: int
  d_kv: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """Attends over all tokens.

    Args:
      x: [B, L, D] normalised hidden states.
      bias: [B or 1, H, L, L] float32 position bias plus the key mask.

    Returns:
      [B, L, D].
    """
    d_model = x.shape[-1]
    qkv_shape = (d_model, self.num_heads, self.d_kv)
    qkv_names = (axes.EMBED, axes.HEADS, axes.KV)
    q, k, v = (
        jnp.einsum("bld,dhk->blhk", x,
                   _kernel(self, n, qkv_shape, qkv_names, 0, (1, 2),
                           self.dtype))
        for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    out_kernel = _kernel(self, "out", (self.num_heads, self.d_kv, d_model),
                         (axes.HEADS, axes.KV, axes.EMBED), (0, 1), 2,
                         self.dtype)
    return jnp.einsum("bqhk,hkd->bqd", out, out_kernel)


class GatedGeluMlp(nn.Module):
  """T5 v1.1 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

  d_ff: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    wi = [
        _kernel(self, n, (d_model, self.d_ff), (axes.EMBED, axes.MLP), 0, 1,
                self.dtype) for n in ("wi_0", "wi_1")
    ]
    wo = _kernel(self, "wo", (self.d_ff, d_model), (axes.MLP, axes.EMBED), 0,
                 1, self.dtype)
    # HF's "gated-gelu" is gelu_new, i.e. the tanh approximation.
    gate = jax.nn.gelu(x @ wi[0], approximate=True)
    return (gate * (x @ wi[1])) @ wo


class EncoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = RMSNorm(dtype, name="attention_norm")(x)
    x = x + SelfAttention(cfg.num_heads, cfg.d_kv, dtype, name="attention")(
        h, bias)
    h = RMSNorm(dtype, name="mlp_norm")(x)
    x = x + GatedGeluMlp(cfg.d_ff, dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_TOKENS, None))


class T5Encoder(nn.Module):
  """T5 v1.1 encoder stack; inference only (dropout is omitted)."""

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Encodes token ids.

    Args:
      ids: int32 [B, L] token ids.
      mask: bool [B, L]; False marks padding, which no token attends to.

    Returns:
      [B, L, d_model] in `config.dtype` (padded positions hold finite values).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    length = ids.shape[-1]
    x = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (axes.VOCAB, axes.EMBED)),
        name="token_embedder")(ids)
    # One bias table shared by every layer, as in T5 (only layer 0 owns it).
    rel_bias = nn.Embed(
        cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
        param_dtype=dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (axes.REL_POS, axes.HEADS)),
        name="relative_attention_bias")
    buckets = relative_position_buckets(
        length, cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance)
    position_bias = einops.rearrange(rel_bias(jnp.asarray(buckets)),
                                     "q k h -> h q k")
    # A large finite negative (not -inf) keeps all-padding rows finite.
    mask_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min / 2)
    bias = position_bias[None] + mask_bias[:, None, None, :].astype(jnp.float32)
    x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_TOKENS, None))
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
    return RMSNorm(dtype, name="final_norm")(x)


def init_t5_params(cfg: TextEncoderConfig, key: jax.Array) -> dict:
  """Randomly initialised, logically boxed encoder params (eval_shape-able).

  Args:
    cfg: the encoder architecture; params are created in `cfg.dtype`.
    key: PRNG key; the same key gives the same params.

  Returns:
    The param tree of `T5Encoder(cfg)` (the contents of its "params" collection).
  """
  ids = jnp.zeros((1, 1), jnp.int32)
  return T5Encoder(cfg).init(key, ids, jnp.ones((1, 1), bool))["params"]
