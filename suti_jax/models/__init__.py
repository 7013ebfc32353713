"""UNet models (Imagen base, Efficient UNet SR, SuTI exemplar path); the T5
text encoder lives in `suti_jax.models.text`."""

from suti_jax.models.exemplar import ExemplarFeatures, ExemplarInputs
from suti_jax.models.unet import UNet

__all__ = ["UNet", "ExemplarInputs", "ExemplarFeatures"]
