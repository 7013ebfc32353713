"""Trains one cascade stage: parses flags and calls `suti_jax.train.loop.run`.

  python -m launch.train --config=configs/imagen_base64.py:tiny --workdir=/tmp/t \
      --config.train.total_steps=5
  python -m launch.train --config=configs/suti_base64.py --workdir=gs://b/suti \
      --config.init_from=gs://b/imagen64/checkpoints --multihost     # every TPU VM worker

Gin: `--gin_file`/`--gin_bindings` set the same knobs as `--config.*`
(`suti_jax/gin_bindings.py`: `train.total_steps = 5` -> config.train.total_steps).
Gin overrides apply after `--config.*` flags and are checked like them (unknown
key or wrong type -> error naming the key). A preemption saves, then exits with 0.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from suti_jax import config as config_lib
from suti_jax.gin_bindings import apply_gin

def define_flags() -> None:
  """The launcher's flags (defined only when run as a program, so that tests can
  import this module next to the other launchers)."""
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
  flags.DEFINE_multi_string("gin_file", [], "Gin files of config overrides.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.seed = 3'.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
  flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
  flags.DEFINE_integer("process_id", -1, "This process's index.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize (auto-detects on TPU pods).")
  flags.DEFINE_bool("allow_unsharded_params", False,
                    "Train even when params of 1 GiB or more are split over fsdp x tensor "
                    "more than 10% less evenly than an even split (the check then warns).")


# `--config.a.b=v` and `--noconfig.a.b`, as ml_collections matches them.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
# ml_collections' prefix before the traceback of an error raised by get_config.
_CONFIG_FILE_ERROR = "Error whilst parsing config file"


def _config_value(argv: Sequence[str]) -> str:
  """The `--config` flag's value ('path[:arg]') in `argv`."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("--config", "-config"):
      return value if eq else argv[i + 1]
  raise ValueError("no --config flag")


def _unknown_override(argv: Sequence[str]) -> str | None:
  """Names the first `--config.a.b` override whose key path does not exist."""
  config = flags.FLAGS["config"].parser.parse(_config_value(argv))
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and (message := config_lib.find_unknown_key(config, match.group(1))):
      return f"--config.{message}"
  return None


def _root_cause(error: BaseException) -> BaseException:
  """The first exception of `error`'s chain (what get_config raised)."""
  while error.__context__ is not None:
    error = error.__context__
  return error


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with each config error as one line and no traceback.

  ml_collections raises a bare `AttributeError: "'bogus'"` (three chained
  tracebacks) for an unknown `--config.train.bogus`, and puts the traceback of a
  `get_config` error (e.g. an unknown `:option`) inside its message.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments left after the flags (as `flags.FLAGS(argv)`).
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if _CONFIG_FILE_ERROR in message:
      message = message.split(_CONFIG_FILE_ERROR)[0] + str(_root_cause(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = _unknown_override(argv) or f"config override: {e}"
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.exit(1)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that flag parsing (and its tests) need no jax backend.
  from suti_jax import compile_cache
  from suti_jax.parallel import distributed
  from suti_jax.parallel import sharding as sharding_lib
  from suti_jax.train import checkpoint as checkpoint_lib
  from suti_jax.train import loop

  f = flags.FLAGS
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                         multihost=f.multihost)
  # A resumed or restarted run loads its programs instead of compiling them again.
  compile_cache.enable(os.path.join(f.workdir, "jax_cache"))
  config = apply_gin(f.config, f.gin_file, f.gin_bindings)
  try:
    result = loop.run(config, f.workdir, allow_unsharded_params=f.allow_unsharded_params)
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError,
          sharding_lib.UnshardedParamsError) as e:
    # The message says what to change; a traceback would only bury it. Nothing is
    # being written, and a normal interpreter exit would let Orbax's background reads
    # of a failed restore print 'Event loop is closed' tracebacks after it.
    sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n")
    sys.stderr.flush()
    os._exit(1)
  if result.get("preempted"):
    logging.warning("preempted at step %d; checkpoint saved, exiting cleanly",
                    int(result["step"]))
    print(f"preempted at step {int(result['step'])}: checkpoint saved", flush=True)
  else:
    print(f"done at step {int(result['step'])}", flush=True)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
