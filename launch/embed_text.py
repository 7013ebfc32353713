"""Writes the frozen T5's embeddings into ICL / caption TFRecords (Beam).

  python -m launch.embed_text --config=configs/suti_base64.py --t5=/ckpt/t5_xxl \
      --input='/data/icl/groups-*' --output=/data/icl_embedded [-- --runner=...]
Then train with `--config.data.pattern='/data/icl_embedded/groups-*'
--config.data.precomputed_embeddings --config.text.weights_path=/ckpt/t5_xxl`.
The config gives the tokenizer, T5 architecture and max_length; `--t5` is a
`launch.convert_t5` checkpoint. Arguments after `--` go to Beam.
"""

from __future__ import annotations

import dataclasses
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from data_pipeline import embed_text
from suti_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]; its `text` "
                                          "section is used.", lock_config=True)
_INPUT = flags.DEFINE_string("input", None, "Glob of ICL or caption TFRecord files.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the rewritten files (same names).",
                              required=True)
_T5 = flags.DEFINE_string("t5", "", "T5 Orbax checkpoint; default config.text.weights_path.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Texts per encoder call.")


def main(argv: list[str]) -> None:
  text = config_lib.section(config_lib.TextEncoderConfig, _CONFIG.value.text, "config.text")
  if _T5.value:
    text = dataclasses.replace(text, weights_path=_T5.value)
  summary = embed_text.run_pipeline(_INPUT.value, _OUTPUT.value, text, _BATCH_SIZE.value,
                                    beam_args=argv[1:])
  print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
