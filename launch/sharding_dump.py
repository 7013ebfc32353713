"""Prints (or writes) the train state's sharding table for a config and mesh:
path -> shape, dtype, PartitionSpec, bytes per device. Shapes only, no allocation.

  python -m launch.sharding_dump --config=configs/imagen_base64.py:tiny --mesh=2,2,2
  python -m launch.sharding_dump --config=configs/suti_base64.py:tiny --mesh=2,2,2 \
      --out=tests/golden/sharding_suti_base64_tiny_2x2x2.json   # refresh a golden file
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags



def define_flags() -> None:
  """Flags exist only when run as a program (tests import `dump`)."""
  config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=True)
  flags.DEFINE_list("mesh", ["2", "2", "2"], "data,fsdp,tensor sizes (ICI, one slice).")
  flags.DEFINE_string("out", "", "Write the JSON here instead of printing it.")


def dump(config: Any, mesh_sizes: Sequence[int]) -> dict[str, dict[str, Any]]:
  """The sharding table of the whole TrainState of `config` on a local mesh.

  Args:
    config: a configs/*.py ConfigDict.
    mesh_sizes: (data, fsdp, tensor); their product must be the device count.

  Returns:
    path -> {shape, dtype, spec, per_device_bytes}.
  """
  from suti_jax.config import MeshConfig
  from suti_jax.parallel import mesh as mesh_lib
  from suti_jax.parallel import sharding as sharding_lib
  from suti_jax.train import experiment

  sec = experiment.sections(config)
  data, fsdp, tensor = mesh_sizes
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor))
  shapes = experiment.sharded_shapes(experiment.build(sec), mesh)
  state = shapes.state
  # The step's T5 (None with precomputed embeddings) is listed with the state.
  return sharding_lib.sharding_table(
      {"step": state.step, "params": state.params, "ema_params": state.ema_params,
       "opt_state": state.opt_state, "text_params": shapes.text})


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  table = dump(f.config, [int(s) for s in f.mesh])
  # One entry per line keeps golden-file diffs readable.
  text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                             for k, v in sorted(table.items())) + "\n}"
  if flags.FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
    with open(flags.FLAGS.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  else:
    print(text)


def _force_cpu_devices(count: int) -> None:
  """Enough virtual CPU devices for the mesh; must run before jax is imported."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={count}").strip()


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  flags.FLAGS(sys.argv, known_only=True)
  _force_cpu_devices(math.prod(int(s) for s in flags.FLAGS.mesh))
  app.run(main)
