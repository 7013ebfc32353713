"""Serving: the slim serving checkpoint (EMA params in a chosen dtype) and the
TF SavedModel export of the text-to-image and personalisation samplers."""

from suti_jax.serving.export import (ConfigMismatchError, byte_tokenize_tf, check_config,
                                     export_cascade, export_saved_model, write_model_card)
from suti_jax.serving.serving_checkpoint import (load_serving_checkpoint, read_manifest,
                                                 save_serving_checkpoint)

__all__ = ["ConfigMismatchError", "byte_tokenize_tf", "check_config", "export_cascade",
           "export_saved_model", "load_serving_checkpoint", "read_manifest",
           "save_serving_checkpoint", "write_model_card"]
