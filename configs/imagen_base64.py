"""Imagen 64x64 base model (Saharia et al. 2022, Appendix F).

  python -m launch.train --config=configs/imagen_base64.py --workdir=/tmp/b64
  python -m launch.train --config=configs/imagen_base64.py:tiny --workdir=/tmp/t
"""

import ml_collections

from configs import common

# The `get_config` arguments this file accepts (`:tiny`).
OPTIONS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = common.parse_arg(arg, OPTIONS)
  c = common.skeleton("base64")
  c.model = ml_collections.ConfigDict(dict(
      image_size=64, low_res_size=0, in_channels=3, out_channels=3,
      base_channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 3),
      attention_resolutions=(32, 16, 8), cross_attention_resolutions=(),
      text_attention="concat", num_heads=8, efficient=False,
      text_embed_dim=4096, dropout=0.0, dtype="bfloat16",
      param_dtype="float32", exemplar=None))
  c.text = common.text_encoder(tiny=False)
  # Base: Adafactor, lr 1e-4, 10k warmup, batch 2048, 2.5M steps.
  c.optimizer.name = "adafactor"
  c.sampling.guidance_scale = 1.35
  if "tiny" in opts:
    c.model.image_size = 16
    c.model.base_channels = 32
    c.model.channel_mults = (1, 2)
    c.model.num_res_blocks = (1, 1)
    c.model.attention_resolutions = (8,)
    c.model.dtype = "float32"
    common.make_tiny(c)
  return c
