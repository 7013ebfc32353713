"""Converts an HF DINO (`ViTModel`) or `CLIPModel` checkpoint folder to suti_jax's format.

  python -m launch.convert_weights --model=dino --input=hf/dino-vits16 --output=weights/dino.msgpack
Writes the params (flax msgpack) to --output and {model, config} to the same path with .json.
"""

from __future__ import annotations

from absl import app
from absl import flags

from suti_jax.eval import convert

_MODEL = flags.DEFINE_enum("model", None, ["dino", "clip"], "Which checkpoint --input holds.")
_INPUT = flags.DEFINE_string("input", None, "Folder written by `save_pretrained` (config.json + "
                             "model.safetensors or pytorch_model.bin).")
_OUTPUT = flags.DEFINE_string("output", None, "Output msgpack path; the config goes beside it.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  load = convert.convert_dino_dir if _MODEL.value == "dino" else convert.convert_clip_dir
  config, params = load(_INPUT.value)
  convert.save(_OUTPUT.value, _MODEL.value, config, params)
  print(f"wrote {_OUTPUT.value} and its .json config ({_MODEL.value}: {config})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "input", "output"])
  app.run(main)
