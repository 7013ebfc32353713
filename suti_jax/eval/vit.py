"""Pre-LayerNorm ViT blocks, HF config reading and image preprocessing shared by DINO and CLIP.

HF `ViTModel` and `CLIPModel` use the same block: x += attn(ln1(x)); x += mlp(ln2(x)).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# Evaluation models are small and scores are compared across hardware: full fp32 matmuls
# keep TPU (bf16-pass default) embeddings equal to CPU/GPU ones.
PRECISION = jax.lax.Precision.HIGHEST

ConfigT = TypeVar("ConfigT")

# Config fields that HF's `ViTConfig` / `CLIPVisionConfig` / `CLIPTextConfig` name differently;
# every other field has the same name there.
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "mlp_dim": "intermediate_size", "max_length": "max_position_embeddings"}
_HF_SIZES = ("hidden_size", "num_layers", "num_heads", "mlp_dim")


def config_from_hf(cls: type[ConfigT], hf: Mapping[str, Any], required: tuple[str, ...] = (),
                   **optional: Any) -> ConfigT:
  """Builds a tower config dataclass from an HF config dict.

  Args:
    cls: the config class, e.g. `DinoConfig` or `CLIPTextConfig`.
    hf: the parsed config.json (or its `vision_config` / `text_config` part).
    required: fields that must be present besides the transformer sizes (hidden_size,
      num_layers, num_heads, mlp_dim), which always must.
    **optional: fields read when present, else these values (the HF config class's defaults,
      as HF does for older config.json files).

  Returns:
    `cls(...)` with every field named above.
  """
  values = {f: hf[_HF_KEYS.get(f, f)] for f in required + _HF_SIZES}
  values.update({f: hf.get(_HF_KEYS.get(f, f), default) for f, default in optional.items()})
  return cls(**values)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU (Radford et al. 2021): x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation that HF's `hidden_act` string names.

  Args:
    name: an HF `hidden_act` value, e.g. "gelu" (exact, erf) or "quick_gelu".

  Returns:
    The elementwise function.
  """
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections (HF layout)."""

  num_heads: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    width = x.shape[-1]
    dense = lambda name, bias: nn.Dense(width, use_bias=bias, precision=PRECISION, name=name)
    split = lambda t: einops.rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)
    q = split(dense("query", self.use_bias)(x))
    k = split(dense("key", self.use_bias)(x))
    v = split(dense("value", self.use_bias)(x))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=PRECISION) / jnp.sqrt(q.shape[-1])
    if causal:
      n = x.shape[1]
      logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=PRECISION)
    return dense("out", True)(einops.rearrange(out, "b h n d -> b n (h d)"))


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: attention then MLP, each with a residual."""

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  hidden_act: str
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln1")(x)
    x = x + SelfAttention(self.num_heads, self.qkv_bias, name="attn")(h, causal)
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln2")(x)
    h = nn.Dense(self.mlp_dim, precision=PRECISION, name="fc1")(h)
    h = nn.Dense(x.shape[-1], precision=PRECISION, name="fc2")(activation(self.hidden_act)(h))
    return x + h


class Encoder(nn.Module):
  """A stack of `EncoderBlock`s named `block_0`, `block_1`, ..."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  hidden_act: str
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.hidden_act,
                       self.qkv_bias, name=f"block_{i}")(x, causal)
    return x


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens with a strided convolution: [B,H,W,3] -> [B,N,D]."""

  width: int
  patch_size: int
  use_bias: bool

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias,
                precision=PRECISION, name="conv")(images)
    return einops.rearrange(x, "b h w d -> b (h w) d")


def preprocess(images: list[np.ndarray] | np.ndarray, resize_px: int, crop_px: int,
               mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
  """Resizes the shortest side (bicubic), center-crops and normalizes, as torchvision/HF do.

  PIL's bicubic resize is used on purpose: torchvision's `Resize` on PIL images and HF's
  image processors both call it, so the reference pipelines produce these exact pixels.

  Args:
    images: N uint8 images [H, W, 3] (sizes may differ).
    resize_px: target length of the shortest side.
    crop_px: side of the square center crop.
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel standard deviation of [0, 1] pixels.

  Returns:
    float32 [N, crop_px, crop_px, 3].
  """
  out = []
  for image in images:
    pil = Image.fromarray(np.asarray(image, np.uint8))
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_px * long / short)  # Truncation, as torchvision and HF round.
    size = (resize_px, new_long) if w <= h else (new_long, resize_px)
    if (w, h) != size:
      pil = pil.resize(size, Image.Resampling.BICUBIC)
    w, h = pil.size
    top, left = int(round((h - crop_px) / 2.0)), int(round((w - crop_px) / 2.0))
    pixels = np.asarray(pil, np.float32)[top:top + crop_px, left:left + crop_px] / 255.0
    out.append((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.stack(out).astype(np.float32)
