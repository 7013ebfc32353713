"""Exports trained stages for serving: TF SavedModel + slim serving checkpoint + model card.

  python -m launch.export --checkpoint=/tmp/suti64 --config=configs/suti_base64.py:tiny \
      --output=/tmp/export --steps=16
  python -m launch.export --checkpoint=/tmp/b64,/tmp/sr256 \
      --config=configs/imagen_base64.py --sr_config=configs/imagen_sr256.py \
      --sr_config.sampling.num_steps=8 --output=/tmp/export --platforms=cpu,tpu
Writes <output>/saved_model, <output>/serving_checkpoint and <output>/model_card.json.
See launch/serve_example.py for loading and serving the SavedModel.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from launch import cascade_flags
from suti_jax import serving

_CHECKPOINT = flags.DEFINE_multi_string(
    "checkpoint", [], "Stage checkpoint dirs or workdirs, base then SR (repeat or comma list).")
_CONFIGS = cascade_flags.define_stage_config_flags("The config of each checkpoint")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps fixed into the SavedModel "
                              "(default: each config's sampling.num_steps).")
_GUIDANCE = flags.DEFINE_enum("guidance", None, ["interleaved", "cfg", "compositional"],
                              "Personalisation guidance mode (default config).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "Serving checkpoint and SavedModel param dtype.")
_PLATFORMS = flags.DEFINE_list("platforms", None,
                               "SavedModel lowering platforms, e.g. cpu,tpu (default current).")


def _split(values: list[str]) -> list[str]:
  return [v.strip() for value in values for v in value.split(",") if v.strip()]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  checkpoints, configs = _split(_CHECKPOINT.value), cascade_flags.stage_sections(_CONFIGS)
  if not checkpoints or not _OUTPUT.value:
    raise app.UsageError("--checkpoint and --output are required")
  if len(configs) != len(checkpoints):
    raise app.UsageError(f"give one config per checkpoint (--config, --sr_config, "
                         f"--sr2_config; {len(checkpoints)} checkpoints, {len(configs)} configs)")
  card = serving.export_cascade(
      checkpoints, configs, _OUTPUT.value,
      step=_STEP.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value, dtype=_DTYPE.value,
      platforms=_PLATFORMS.value)
  logging.info("exported %s to %s", [s["stage"] for s in card["stages"]], _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
