"""DINO ViT-S/16 image embedder (Caron et al. 2021) for DreamBench's DINO score.

The embedding is the CLS token after the final LayerNorm, i.e. HF
`ViTModel(add_pooling_layer=False)(x).last_hidden_state[:, 0]`.
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

# ImageNet statistics used by DINO's evaluation transforms (facebookresearch/dino, eval_linear.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoConfig:
  """ViT sizes; defaults are DINO ViT-S/16 (facebook/dino-vits16)."""

  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  patch_size: int = 16
  image_size: int = 224
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> DinoConfig:
    """Builds the config from an HF `ViTConfig` dict (config.json).

    Args:
      hf: the parsed config.json of a `ViTModel`.

    Returns:
      The matching `DinoConfig`.
    """
    # Optional keys fall back to `ViTConfig`'s defaults.
    return vit.config_from_hf(cls, hf, patch_size=16, image_size=224, layer_norm_eps=1e-12,
                              hidden_act="gelu", qkv_bias=True)


class DinoViT(nn.Module):
  """ViT returning the final-LayerNorm CLS token: [B, S, S, 3] -> [B, hidden_size]."""

  config: DinoConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    x = vit.PatchEmbed(c.hidden_size, c.patch_size, use_bias=True, name="patch_embed")(images)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (c.hidden_size,))
    x = jnp.concatenate([einops.repeat(cls, "d -> b 1 d", b=x.shape[0]), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    x = vit.Encoder(c.num_layers, c.num_heads, c.mlp_dim, c.layer_norm_eps, c.hidden_act,
                    c.qkv_bias, name="encoder")(x)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="final_norm")(x[:, 0])


def preprocess(images: list[np.ndarray] | np.ndarray, config: DinoConfig) -> np.ndarray:
  """DINO's evaluation transform: resize 256 (bicubic), center crop 224, ImageNet mean/std.

  The 256/224 ratio is kept for other `image_size`s (tiny test models).

  Args:
    images: N uint8 images [H, W, 3].
    config: the model config (gives the crop size).

  Returns:
    float32 [N, image_size, image_size, 3].
  """
  resize_px = int(round(config.image_size * 256 / 224))
  return vit.preprocess(images, resize_px, config.image_size, IMAGENET_MEAN, IMAGENET_STD)
