"""SuTI exemplar path: the exemplar input/feature pytrees, the exemplar
attention layer (zero-initialised, gated off when no exemplar is present) and
the helpers that turn downstack features of B*K exemplars into tokens."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
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


class ExemplarAttention(nn.Module):
  """Generating features attend to the exemplar tokens of the same resolution.

  The output projection is zero-initialised, so a SuTI UNet made from Imagen
  weights starts as exactly the Imagen UNet; an example whose exemplar slots
  are all masked gets exactly zero update (gated by any(mask)).
  """

  num_heads: int
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: Array, tokens: Array, mask: Array) -> Array:
    """Adds the exemplar attention update.

    Args:
      x: [B, H, W, C] generating features.
      tokens: [B, M, C] exemplar tokens.
      mask: [B, M] bool token mask.

    Returns:
      [B, H, W, C] = x + gated attention update.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = layers.layer_norm(name="context_norm", **kw)(tokens.astype(self.dtype))
    update = attention.AttentionBlock(
        self.num_heads, self_attend=False, zero_init_out=True, name="attn",
        **kw)(x, layers.constrain_tokens(context), mask)
    present = jnp.any(mask, axis=-1)[:, None, None, None]
    return layers.constrain_image(x + jnp.where(present, update, 0).astype(x.dtype))
