"""Imagen 64->256 super-resolution stage: Efficient UNet (Saharia et al. 2022).

Attention only in the lowest block; v-prediction; Adam lr 1e-4.
"""

import ml_collections

from configs import common

# The `get_config` arguments this file accepts (`:tiny`).
OPTIONS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = common.parse_arg(arg, OPTIONS)
  c = common.skeleton("sr256")
  c.model = ml_collections.ConfigDict(dict(
      image_size=256, low_res_size=64, in_channels=3, out_channels=3,
      base_channels=128, channel_mults=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8),
      attention_resolutions=(32,), cross_attention_resolutions=(32,),
      text_attention="cross", num_heads=8, efficient=True,
      text_embed_dim=4096, dropout=0.0, dtype="bfloat16",
      param_dtype="float32", exemplar=None))
  c.text = common.text_encoder(tiny=False)
  c.diffusion.prediction = "v"
  c.optimizer.name = "adam"
  c.sampling.guidance_scale = 8.0
  c.sampling.noise_aug_level = 0.0
  if "tiny" in opts:
    c.model.image_size = 32
    c.model.low_res_size = 16
    c.model.base_channels = 16
    c.model.channel_mults = (1, 2)
    c.model.num_res_blocks = (1, 2)
    c.model.attention_resolutions = (16,)
    c.model.cross_attention_resolutions = (16,)
    c.model.dtype = "float32"
    common.make_tiny(c)
    c.sampling.guidance_scale = 3.0
  return c
