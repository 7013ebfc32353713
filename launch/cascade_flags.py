"""`--config`, `--sr_config`, `--sr2_config`: one config file flag per cascade stage
(base, then SR stages), each locked with its own `--<flag>.a.b=v` overrides, as
launch/train.py's `--config`; converted once into typed sections here.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from suti_jax.train import experiment

STAGE_FLAGS = (("config", "base stage"), ("sr_config", "first SR stage"),
               ("sr2_config", "second SR stage"))


def define_stage_config_flags(purpose: str) -> list:
  """Defines the three flags; returns their holders, base stage first.

  Args:
    purpose: how the launcher uses the configs, for the help text.
  """
  return [config_flags.DEFINE_config_file(
      name, None, f"{purpose}: the {what}'s 'configs/x.py[:arg]'.", lock_config=True)
          for name, what in STAGE_FLAGS]


def stage_sections(holders: list) -> list[experiment.Sections]:
  """The given configs as typed sections, base stage first (none given -> [])."""
  configs = [h.value for h in holders]
  count = sum(c is not None for c in configs)
  if any(c is None for c in configs[:count]):
    raise app.UsageError("give stage configs in order: --config, then --sr_config, "
                         "then --sr2_config")
  return [experiment.sections(c) for c in configs[:count]]
