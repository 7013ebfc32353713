"""Runs the embedded-default demo end to end (`make demo`): parses flags and calls
`launch.demo.recipe.run`; a re-run skips finished stages and resumes an interrupted one.

  python -m launch.demo [--workdir=workdirs/demo] [--config=configs/demo.py[:small]]
  python -m launch.demo --retrain=base,sr,judges   # train the shipped artefacts
                                                   # (pretrained/demo_*) from scratch
"""

from __future__ import annotations

import os
from typing import Sequence

# The demo runs two stages at a time in one process, where suti_jax's XLA:CPU flag
# (suti_jax/xla_flags.py: Eigen instead of YNNPACK convolutions) cost more than it
# gave: the v2 pipeline's experts took 676 s with it against 475 s without. So the
# demo keeps jaxlib's defaults; set SUTI_JAX_KEEP_XLA_FLAGS= (empty) to use the flag.
# Set before anything imports suti_jax, which adds the flag on import.
os.environ.setdefault("SUTI_JAX_KEEP_XLA_FLAGS", "1")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py",
                                          "The demo recipe, configs/demo.py[:small].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo",
                               "Checkpoints, ICL groups, generated images and stage markers.")
_REPORT_DIR = flags.DEFINE_string("report_dir", "reports/demo",
                                  "Where REPORT.md, metrics.json and the grids go.")
_RETRAIN = flags.DEFINE_list(
    "retrain", [], "Shipped artefacts (base, sr, judges) to train from scratch even where the "
    "shipped one (config.base_pretrained, config.sr_pretrained, config.judges_pretrained) "
    "was made by this config's recipe.")
_SAVE_BASE_TO = flags.DEFINE_string(
    "save_base_to", "", "After training the base, write it and its recipe fingerprint there "
    "as a shipped artefact (e.g. pretrained/demo_base).")
_SAVE_SR_TO = flags.DEFINE_string(
    "save_sr_to", "", "After training the SR stage, write it and its recipe fingerprint there "
    "as a shipped artefact (e.g. pretrained/demo_sr).")
_SAVE_JUDGES_TO = flags.DEFINE_string(
    "save_judges_to", "", "After training the judges, write them, their held-out report and "
    "their recipe fingerprint there as a shipped artefact (e.g. pretrained/demo_judges).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that flag parsing needs no jax backend.
  from launch.demo import recipe

  if not flags.FLAGS["verbosity"].present:
    # The stages' progress bars say what is happening; library INFO logs would bury them.
    logging.set_verbosity(logging.WARNING)

  save_to = {name: path for name, path in (("base", _SAVE_BASE_TO.value),
                                            ("sr", _SAVE_SR_TO.value),
                                            ("judges", _SAVE_JUDGES_TO.value)) if path}
  recipe.run(_CONFIG.value, _WORKDIR.value, _REPORT_DIR.value, retrain=_RETRAIN.value,
             save_to=save_to)
  print(f"report: {_REPORT_DIR.value}/REPORT.md", flush=True)


if __name__ == "__main__":
  app.run(main)
