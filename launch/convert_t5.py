"""Converts a public HF T5 v1.1 encoder checkpoint into a `T5Encoder` Orbax checkpoint.

  python -m launch.convert_t5 --input=/ckpt/t5-v1_1-xxl --output=/ckpt/t5_xxl
Then set `--config.text.weights_path` to the output (and the printed fields); training,
sampling and `launch.embed_text` restore it straight into each device's shards.
"""

import dataclasses

from absl import app
from absl import flags
from absl import logging

from suti_jax.config import TextEncoderConfig
from suti_jax.models.text import convert
from suti_jax.models.text import weights

_INPUT = flags.DEFINE_string(
    "input", None, "HF model directory (config.json + weights) or a "
    ".safetensors / .bin / .index.json checkpoint file.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Orbax checkpoint directory to write (must not "
                              "exist).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"],
                           "Param dtype to store; '' keeps the checkpoint's.")

# Fields of TextEncoderConfig that describe the checkpoint's architecture.
_ARCH_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance")


def main(argv: list[str]) -> None:
  del argv  # Unused.
  cfg, params = convert.load_hf_encoder(_INPUT.value, TextEncoderConfig(),
                                        _DTYPE.value)
  weights.save_params(_OUTPUT.value, params)
  arch = {k: v for k, v in dataclasses.asdict(cfg).items() if k in _ARCH_FIELDS}
  logging.info("wrote %s; matching text config: %s", _OUTPUT.value, arch)
  print(" ".join(f"--config.text.{k}={v}" for k, v in arch.items()))


if __name__ == "__main__":
  app.run(main)
