"""CLIP ViT-B/32 (Radford et al. 2021) image and text embedders for CLIP-I and CLIP-T.

Matches HF `CLIPModel.get_image_features` / `get_text_features` (projected, not normalized).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from suti_jax.eval import vit

# OpenAI CLIP's preprocessing statistics (clip/clip.py, `_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Before transformers PR #24773 CLIP configs carried eos_token_id=2 and pooled at argmax(ids),
# which is the EOS position only because EOS has the largest id; openai/clip-vit-base-patch32
# still ships that config, so both rules are kept (as HF does).
_LEGACY_EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Vision tower sizes; defaults are ViT-B/32."""

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 32
  image_size: int = 224
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower sizes; defaults are the ViT-B/32 text transformer."""

  vocab_size: int = 49408
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  max_length: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers plus the shared embedding width."""

  vision: CLIPVisionConfig = CLIPVisionConfig()
  text: CLIPTextConfig = CLIPTextConfig()
  projection_dim: int = 512

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> CLIPConfig:
    """Builds the config from an HF `CLIPConfig` dict (config.json).

    Args:
      hf: the parsed config.json of a `CLIPModel`.

    Returns:
      The matching `CLIPConfig`.
    """
    # Optional keys fall back to transformers 5's `CLIP*Config` defaults, as HF does.
    vision = vit.config_from_hf(CLIPVisionConfig, hf["vision_config"], patch_size=32,
                                image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    text = vit.config_from_hf(CLIPTextConfig, hf["text_config"], ("vocab_size",), max_length=77,
                              layer_norm_eps=1e-5, hidden_act="quick_gelu", eos_token_id=49407)
    return cls(vision=vision, text=text, projection_dim=hf.get("projection_dim", 512))

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> CLIPConfig:
    """Inverse of `dataclasses.asdict` (the JSON the converter writes)."""
    return cls(vision=CLIPVisionConfig(**d["vision"]), text=CLIPTextConfig(**d["text"]),
               projection_dim=d["projection_dim"])


class CLIP(nn.Module):
  """Both towers; call `encode_image` / `encode_text` through `apply(..., method=...)`."""

  config: CLIPConfig

  def setup(self):
    v, t = self.config.vision, self.config.text
    init = nn.initializers.normal(0.02)
    self.patch_embed = vit.PatchEmbed(v.hidden_size, v.patch_size, use_bias=False)
    self.class_embedding = self.param("class_embedding", init, (v.hidden_size,))
    num_patches = (v.image_size // v.patch_size) ** 2
    self.vision_pos_embedding = self.param("vision_pos_embedding", init,
                                           (num_patches + 1, v.hidden_size))
    self.pre_norm = nn.LayerNorm(epsilon=v.layer_norm_eps)
    self.vision_encoder = vit.Encoder(v.num_layers, v.num_heads, v.mlp_dim, v.layer_norm_eps,
                                      v.hidden_act)
    self.post_norm = nn.LayerNorm(epsilon=v.layer_norm_eps)
    self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False,
                                      precision=vit.PRECISION)
    self.token_embedding = nn.Embed(t.vocab_size, t.hidden_size, embedding_init=init)
    self.text_pos_embedding = self.param("text_pos_embedding", init, (t.max_length, t.hidden_size))
    self.text_encoder = vit.Encoder(t.num_layers, t.num_heads, t.mlp_dim, t.layer_norm_eps,
                                    t.hidden_act)
    self.final_norm = nn.LayerNorm(epsilon=t.layer_norm_eps)
    self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False,
                                    precision=vit.PRECISION)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """Image embeddings.

    Args:
      images: float32 [B, S, S, 3], preprocessed with `preprocess`.

    Returns:
      float32 [B, projection_dim] (not normalized).
    """
    x = self.patch_embed(images)
    cls = einops.repeat(self.class_embedding, "d -> b 1 d", b=x.shape[0])
    x = jnp.concatenate([cls, x], axis=1) + self.vision_pos_embedding
    x = self.vision_encoder(self.pre_norm(x))
    return self.visual_projection(self.post_norm(x[:, 0]))

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """Text embeddings, pooled at the EOS token.

    Padding needs no mask: attention is causal, so tokens after EOS never reach it.

    Args:
      ids: int32 [B, L] with L <= max_length, from `clip_tokenizer.CLIPTokenizer`.

    Returns:
      float32 [B, projection_dim] (not normalized).
    """
    eos_id = self.config.text.eos_token_id
    x = self.token_embedding(ids) + self.text_pos_embedding[:ids.shape[1]]
    x = self.final_norm(self.text_encoder(x, causal=True))
    if eos_id == _LEGACY_EOS_ID:
      eos_pos = jnp.argmax(ids, axis=-1)
    else:
      eos_pos = jnp.argmax(ids == eos_id, axis=-1)  # First EOS; padding may reuse the id.
    pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
    return self.text_projection(pooled)

  def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both embeddings (used to initialise every parameter at once)."""
    return self.encode_image(images), self.encode_text(ids)


def preprocess(images: list[np.ndarray] | np.ndarray, config: CLIPConfig) -> np.ndarray:
  """CLIP's transform: resize shortest side to 224 (bicubic), center crop 224, CLIP mean/std.

  Args:
    images: N uint8 images [H, W, 3].
    config: the model config (gives the image size).

  Returns:
    float32 [N, image_size, image_size, 3].
  """
  size = config.vision.image_size
  return vit.preprocess(images, size, size, CLIP_MEAN, CLIP_STD)
