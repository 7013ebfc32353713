"""Ahead-of-time compiles the train step for a TPU topology (no TPU needed, only
libtpu) and prints per-device memory and FLOPs; shapes only, nothing allocated.

  python -m launch.compile_aot --config=configs/imagen_base64.py --topology=v5e:16x16 \
      --config.mesh.ici_fsdp=-1 --config.mesh.ici_data=1
  python -m launch.compile_aot --config=configs/imagen_base64.py:tiny   # local devices

Without libtpu (`pip install "jax[tpu]"`), it says so and compiles for the local
(virtual CPU) devices instead; an out-of-memory config fails at compile time.
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import app, flags, logging
from ml_collections import config_flags



def define_flags() -> None:
  """Flags exist only when run as a program (tests import the functions)."""
  config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=True)
  flags.DEFINE_string("topology", "", "TPU topology, e.g. v5e:2x2, v5p:8x8x8.")
  flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice).")


def target_devices(topology: str, num_slices: int = 1) -> tuple[Sequence[Any], str]:
  """Devices to compile for: the described TPU topology, else the local ones.

  Args:
    topology: e.g. 'v5e:2x2'; '' = local devices.
    num_slices: slices of `topology`.

  Returns:
    (devices, a note saying which were used).
  """
  import jax

  if not topology:
    return jax.devices(), f"local devices ({jax.device_count()} x {jax.devices()[0].platform})"
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu absent or unknown name)
    note = (f"could not describe TPU topology {topology!r} ({type(e).__name__}: {e}); "
            f"libtpu is needed (pip install 'jax[tpu]'). Falling back to the local "
            f"{jax.device_count()} {jax.devices()[0].platform} devices.")
    return jax.devices(), note
  return topo.devices, f"TPU topology {topology} x {num_slices} slice(s): {len(topo.devices)} devices"


def compile_report(config: Any, topology: str = "", num_slices: int = 1) -> dict[str, Any]:
  """Compiles the config's train step for the target devices.

  Args:
    config: a configs/*.py ConfigDict (its mesh section must fit the devices).
    topology: TPU topology name or '' for local devices.
    num_slices: slices.

  Returns:
    {'note', 'mesh', 'flops_per_device', 'memory' (bytes per device by kind),
    'param_count'}.
  """
  import jax
  from suti_jax.parallel import mesh as mesh_lib
  from suti_jax.train import experiment
  from suti_jax.train import metrics as metrics_lib
  from suti_jax.train import step as step_lib

  devices, note = target_devices(topology, num_slices)
  sec = experiment.sections(config)
  exp = experiment.build(sec)
  mesh = mesh_lib.make_mesh(sec.mesh, devices=devices)
  abstract, _, batch = experiment.sharded_shapes(exp, mesh)
  compiled = step_lib.compile_train_step(exp.step_fn, abstract, batch, mesh, sec.rules)
  return {"note": note, "mesh": mesh_lib.describe(mesh),
          "flops_per_device": metrics_lib.compiled_flops(compiled),
          "memory": metrics_lib.memory_summary(compiled),
          "param_count": sum(x.size for x in jax.tree.leaves(abstract.params))}


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  report = compile_report(f.config, f.topology, f.num_slices)
  logging.info("%s", report["note"])
  print(report["note"])
  print(f"mesh: {report['mesh']}; params: {report['param_count']:,}")
  print(f"FLOPs per device per step: {report['flops_per_device']:.4g}")
  for kind, size in report["memory"].items():
    print(f"  {kind:>15}: {size / 2**30:8.3f} GiB per device")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
