"""SuTI 64x64 base: Imagen base64 + exemplar attention (K <= 5 demonstrations).

Initialised from an Imagen base64 checkpoint (`--config.init_from=DIR`).
"""

import ml_collections

from configs import common
from configs import imagen_base64

# The parent's options (`:tiny`); its get_config checks them.
OPTIONS = imagen_base64.OPTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = imagen_base64.get_config(arg)
  c.stage = "suti_base64"
  tiny = c.model.image_size == 16
  c.model.exemplar = common.exemplar((8,) if tiny else (32, 16, 8))
  c.diffusion.text_drop_prob = 0.1
  c.diffusion.exemplar_drop_prob = 0.1
  c.diffusion.both_drop_prob = 0.1
  c.sampling.guidance = "interleaved"
  c.sampling.text_guidance_scale = 1.35
  c.sampling.exemplar_guidance_scale = 1.35
  c.data.kind = "icl_tfrecord"
  c.init_from = ""
  return c
