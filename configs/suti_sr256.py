"""SuTI 64->256 super-resolution stage: Efficient UNet + exemplar attention."""

import ml_collections

from configs import common
from configs import imagen_sr256

# The parent's options (`:tiny`); its get_config checks them.
OPTIONS = imagen_sr256.OPTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = imagen_sr256.get_config(arg)
  c.stage = "suti_sr256"
  tiny = c.model.image_size == 32
  c.model.exemplar = common.exemplar((16,) if tiny else (32,))
  c.diffusion.exemplar_drop_prob = 0.1
  c.diffusion.both_drop_prob = 0.1
  c.sampling.guidance = "interleaved"
  c.data.kind = "icl_tfrecord"
  c.init_from = ""
  return c
