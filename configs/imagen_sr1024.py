"""Imagen 256->1024 super-resolution stage: the sr256 Efficient UNet with no
self-attention and text cross-attention only at the lowest resolution
(Saharia et al. 2022)."""

import ml_collections

from configs import common
from configs import imagen_sr256

# The parent's options (`:tiny`); its get_config checks them.
OPTIONS = imagen_sr256.OPTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = imagen_sr256.get_config(arg)
  c.stage = "sr1024"
  c.model.attention_resolutions = ()
  if "tiny" in common.parse_arg(arg, OPTIONS):
    c.model.image_size = 64
    c.model.low_res_size = 32
    c.model.num_res_blocks = (1, 1)
    c.model.cross_attention_resolutions = (32,)
  else:
    c.model.image_size = 1024
    c.model.low_res_size = 256
    c.model.cross_attention_resolutions = (128,)
  return c
