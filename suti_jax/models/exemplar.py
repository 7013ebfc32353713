"""SuTI exemplar path: the exemplar input/feature pytrees, the exemplar
attention layer (zero-initialised, gated off when no exemplar is present,
position-aware) and the helpers that turn B*K exemplars' features into tokens."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, repeat
from jax.typing import DTypeLike

from suti_jax.models import attention, layers

Array = jax.Array
# Every exemplar-specific submodule name starts with this (see models/surgery.py).
EXEMPLAR_PREFIX = "exemplar_"


@flax.struct.dataclass
class ExemplarInputs:
  """K (image, caption) demonstrations per example.

  Attributes:
    images: [B, K, H, W, C] in [-1, 1].
    text_emb: [B, K, L, D] caption embeddings (T5 output).
    text_mask: [B, K, L] bool.
    mask: [B, K] bool; False = padded slot.
  """

  images: Array
  text_emb: Array
  text_mask: Array
  mask: Array


@flax.struct.dataclass
class ExemplarFeatures:
  """Encoded exemplars, computed once per subject and reused at every step.

  Attributes:
    tokens: resolution (as str, e.g. '16') -> [B, K*N, C_r] tokens.
    mask: resolution -> [B, K*N] bool token mask.
  """

  tokens: dict[str, Array]
  mask: dict[str, Array]


def noised_exemplar_images(images: Array, log_snr: float) -> Array:
  """Exemplars at noise level `log_snr` with eps = 0: x_t = alpha * x_0.

  The encoder sees the mean of q(x_t | x_0) rather than a random draw so the
  features are deterministic (cacheable, identical on every call); at the
  default log-SNR of 20, alpha ~ 1 - 1e-9.

  Args:
    images: [..., H, W, C] clean images.
    log_snr: the encoder's noise level.

  Returns:
    Images scaled by alpha = sqrt(sigmoid(log_snr)), same shape.
  """
  alpha = jnp.sqrt(jax.nn.sigmoid(jnp.float32(log_snr)))
  return images * alpha.astype(images.dtype)


def position_embedding_2d(height: int, width: int, channels: int) -> np.ndarray:
  """Fixed 2D sinusoidal position embedding of a feature-map grid.

  Each quarter of the channels holds sin or cos of the row or of the column, at
  periods spaced geometrically from 2 to 2 * max(height, width) feature-map px:
  the short periods tell neighbours apart, the long ones give a unique code
  over the grid. Channels beyond a multiple of 4 are zero.

  Args:
    height: grid rows h.
    width: grid columns w.
    channels: embedding width C.

  Returns:
    [h*w, C] float32, in the `(h w)` order of `rearrange`.
  """
  n = channels // 4
  periods = 2.0 * float(max(height, width)) ** (np.arange(n) / max(n - 1, 1))
  freqs = 2 * np.pi / periods

  def sin_cos(positions: int) -> np.ndarray:  # [positions, 2n]
    args = np.arange(positions)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=-1)

  embedding = np.concatenate([
      repeat(sin_cos(height), "h c -> (h w) c", w=width),
      repeat(sin_cos(width), "w c -> (h w) c", h=height)], axis=-1)
  return np.pad(embedding, ((0, 0), (0, channels - 4 * n))).astype(np.float32)


def with_positions(features: Array) -> Array:
  """Standardised exemplar feature maps plus the grid's position embedding.

  Standardising each location over channels first fixes the position term's
  share of the token (the exemplar attention LayerNorms the sum), whatever the
  scale of the downstack features. The embedding is the same for every
  exemplar slot, so attention stays invariant to the order of exemplars.

  Args:
    features: [N, h, w, C] downstack features.

  Returns:
    [N, h, w, C] in the features' dtype.
  """
  _, height, width, channels = features.shape
  position = rearrange(position_embedding_2d(height, width, channels),
                       "(h w) c -> h w c", h=height)
  standard = jax.nn.standardize(features.astype(jnp.float32), axis=-1)
  return (standard + position).astype(features.dtype)


def image_tokens(features: Array, mask: Array) -> tuple[Array, Array]:
  """Flattens the feature maps of B*K exemplars into per-example tokens.

  Args:
    features: [B*K, h, w, C] downstack features (exemplar-major within B).
    mask: [B, K] exemplar mask.

  Returns:
    ([B, K*h*w, C] tokens, [B, K*h*w] bool mask).
  """
  b = mask.shape[0]
  h, w = features.shape[1:3]
  tokens = rearrange(features, "(b k) h w c -> b (k h w) c", b=b)
  return tokens, repeat(mask, "b k -> b (k n)", n=h * w)


def caption_tokens(captions: Array, text_mask: Array, mask: Array) -> tuple[Array, Array]:
  """Caption tokens of B*K exemplars as per-example tokens.

  Args:
    captions: [B*K, L, C] projected caption embeddings.
    text_mask: [B, K, L] caption mask.
    mask: [B, K] exemplar mask (a padded slot hides its caption too).

  Returns:
    ([B, K*L, C] tokens, [B, K*L] bool mask).
  """
  b = mask.shape[0]
  tokens = rearrange(captions, "(b k) l c -> b (k l) c", b=b)
  token_mask = rearrange(text_mask & mask[:, :, None], "b k l -> b (k l)")
  return tokens, token_mask


class _ExemplarCrossAttention(nn.Module):
  """Image queries (plus their grid position) attend to exemplar tokens.

  Parameter names match `attention.AttentionBlock(self_attend=False)`; it
  differs in adding `position_embedding_2d` to the normalised queries, the
  counterpart of the positions that `with_positions` put in image tokens.
  Returns the residual update, zero at init (zero-initialised output).
  """

  num_heads: int
  position_embedding: bool
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array) -> Array:
    """[B, H, W, C] queries, [B or 1, M, D] context, [B, M] mask -> [B, H, W, C]."""
    _, height, width, c = x.shape
    head_dim = c // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: attention.HeadProjection(self.num_heads, head_dim, name=name, **kw)
    queries = rearrange(layers.group_norm(c, name="norm", **kw)(x), "b h w c -> b (h w) c")
    if self.position_embedding:
      queries = queries + position_embedding_2d(height, width, c).astype(self.dtype)
    # Tokens of batch 1 (one subject's, cached for sampling) are projected once
    # and serve every query row (`masked_attention`'s shared keys and values).
    out = attention.masked_attention(
        proj("query")(queries), proj("context_key")(context), proj("context_value")(context),
        mask.astype(bool))
    out = attention.OutputProjection(c, zero_init=True, name="out", **kw)(out)
    return rearrange(out, "b (h w) c -> b h w c", h=height, w=width)


class ExemplarAttention(nn.Module):
  """Generating features attend to the exemplar tokens of the same resolution.

  The output projection is zero-initialised, so a SuTI UNet made from Imagen
  weights starts as exactly the Imagen UNet; an example whose exemplar slots
  are all masked gets exactly zero update (gated by any(mask)). With
  `position_embedding`, queries carry the same fixed grid code as the image
  tokens (see `with_positions`), so a location can find its counterpart in
  every exemplar, which content alone cannot do for a spatial pattern.
  """

  num_heads: int
  position_embedding: bool = True
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array, tokens: Array, mask: Array) -> Array:
    """Adds the exemplar attention update.

    Args:
      x: [B, H, W, C] generating features.
      tokens: [B, M, C] exemplar tokens, or [1, M, C] shared by every row
        (image tokens of an H x W grid carry positions when `position_embedding`).
      mask: [B, M] bool token mask.

    Returns:
      [B, H, W, C] = x + gated attention update.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = layers.layer_norm(name="context_norm", **kw)(tokens.astype(self.dtype))
    update = _ExemplarCrossAttention(self.num_heads, self.position_embedding, name="attn",
                                     **kw)(x, layers.constrain_tokens(context), mask)
    present = jnp.any(mask, axis=-1)[:, None, None, None]
    return layers.constrain_image(x + jnp.where(present, update, 0).astype(x.dtype))
