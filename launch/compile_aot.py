"""Ahead-of-time compiles the train step for a TPU topology (no TPU needed, only
libtpu) and reports per-chip memory against HBM, FLOPs and compile time; shapes
only, nothing allocated. An out-of-memory config fails here, not on the pod.

  python -m launch.compile_aot --config=configs/suti_base64.py --topology=v5p:4x4x4 \
      --config.mesh.ici_fsdp=16 --report=reports/aot/x.json
  python -m launch.compile_aot --config=configs/imagen_base64.py:tiny --topology=local

`--topology` is required: a TPU topology name (`v5e:16x16`, `v5p:4x4x4`, `v4:4x4x4`;
libtpu from requirements-test.lock or `pip install "jax[tpu]"`), or `local` for
the local devices. A name libtpu cannot describe (misspelt, or libtpu missing)
exits 1 with the reason; a config over the HBM exits 2 after writing its report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

# Topology names that compile for the machine's own devices, never a fallback.
LOCAL = ("local", "cpu")

# HBM per JAX device, by `device_kind` (Cloud TPU system architecture pages:
# v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB per chip). v4 and v5p are
# compiled as megacore (one device per chip), as they run in JAX.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}
_MEGACORE = ("v4",)  # Generations whose topology defaults to one device per core.


class TopologyError(ValueError):
  """The topology cannot be described (unknown name or no libtpu)."""


def define_flags() -> None:
  """Flags exist only when run as a program (tests import the functions)."""
  config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU topology (v5e:2x2, v5p:4x4x4, v4:4x4x4) "
                      "or 'local' for this machine's devices.")
  flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice).")
  flags.DEFINE_string("report", "", "Also write the report as JSON to this path.")


def target_devices(topology: str, num_slices: int = 1) -> tuple[Sequence[Any], str]:
  """Devices to compile for: the described TPU topology, or local on request.

  Args:
    topology: e.g. 'v5e:2x2'; 'local' (or 'cpu') = this machine's devices.
    num_slices: slices of `topology`.

  Returns:
    (devices, a note saying which were used).

  Raises:
    TopologyError: libtpu is missing or does not know `topology`.
  """
  import jax

  if topology in LOCAL:
    return jax.devices(), f"local devices ({jax.device_count()} x {jax.devices()[0].platform})"
  if not topology:
    raise TopologyError("no topology given: pass a TPU topology such as --topology=v5e:2x2, "
                        "or --topology=local to compile for this machine's devices")
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise TopologyError(f"cannot describe TPU topology {topology!r}: libtpu is not installed "
                        f"(it is in requirements-test.lock, or pip install 'jax[tpu]')") from e
  # AOT never touches a chip, so it need not hold libtpu's one-process lock
  # (/tmp/libtpu_lockfile), which another jax process on the machine may own.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in _MEGACORE else {}
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        num_slices=num_slices, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises JaxRuntimeError)
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"libtpu cannot describe TPU topology {topology!r} x {num_slices} "
                        f"slice(s): {first_line}. Expected GENERATION:CHIPS such as v5e:2x2, "
                        f"v5e:16x16, v5p:4x4x4, v4:4x4x4, v6e:2x2") from e
  note = f"TPU topology {topology} x {num_slices} slice(s): {len(topo.devices)} devices"
  return topo.devices, note


def _peak_bytes(memory: dict[str, int]) -> int:
  """Live bytes per device: arguments + outputs + temps, less donated aliases."""
  return memory.get("argument", 0) + memory.get("output", 0) + memory.get("temp", 0) - memory.get(
      "alias", 0)


def compile_report(config: Any, topology: str, num_slices: int = 1) -> dict[str, Any]:
  """Compiles the config's train step for the target devices.

  Args:
    config: a configs/*.py ConfigDict (its mesh section must fit the devices).
    topology: TPU topology name, or 'local'.
    num_slices: slices.

  Returns:
    {'stage', 'topology', 'num_slices', 'note', 'mesh', 'devices', 'device_kind',
    'batch_size', 'grad_accum_steps', 'param_count', 'param_sharding_excess'
    (per-device param bytes over an even fsdp x tensor split, as the trainer
    checks), 'flops_per_device', 'flops_per_step' (all microbatches counted:
    `metrics.train_step_flops`), 'memory' (bytes per device by kind),
    'peak_bytes_per_device', 'hbm_bytes_per_device' (None when unknown),
    'hbm_fraction', 'fits', 'error'
    (the compiler's out-of-memory message, else ''), 'compile_s' (lower + compile)}.

  Raises:
    TopologyError: see `target_devices`.
  """
  import jax
  from suti_jax.parallel import mesh as mesh_lib
  from suti_jax.parallel import sharding as sharding_lib
  from suti_jax.train import experiment
  from suti_jax.train import metrics as metrics_lib
  from suti_jax.train import step as step_lib

  devices, note = target_devices(topology, num_slices)
  sec = experiment.sections(config)
  exp = experiment.build(sec)
  mesh = mesh_lib.make_mesh(sec.mesh, devices=devices)
  shapes = experiment.sharded_shapes(exp, mesh)
  abstract = shapes.state
  kind = devices[0].device_kind
  report = {"stage": sec.stage, "topology": topology, "num_slices": num_slices, "note": note,
            "mesh": mesh_lib.describe(mesh), "devices": len(devices), "device_kind": kind,
            "batch_size": sec.train.batch_size,
            "grad_accum_steps": sec.optimizer.grad_accum_steps,
            "param_count": sum(x.size for x in jax.tree.leaves(abstract.params)),
            "param_sharding_excess": sharding_lib.assert_params_sufficiently_sharded(
                abstract.params, mesh, raise_error=False),
            "hbm_bytes_per_device": HBM_BYTES.get(kind), "error": ""}
  start = time.perf_counter()
  try:
    compiled = step_lib.compile_train_step(exp.step_fn, abstract, shapes.batch, shapes.text, mesh,
                                           sec.rules)
  except Exception as e:  # pylint: disable=broad-except  (XLA raises JaxRuntimeError)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.update(fits=False, error=str(e).strip().splitlines()[0],
                  compile_s=time.perf_counter() - start, flops_per_device=None,
                  flops_per_step=None, memory={}, peak_bytes_per_device=None, hbm_fraction=None)
    return report
  report["compile_s"] = time.perf_counter() - start
  flops = metrics_lib.train_step_flops(compiled, sec.optimizer.grad_accum_steps)
  memory = metrics_lib.memory_summary(compiled)
  peak = _peak_bytes(memory)
  hbm = report["hbm_bytes_per_device"]
  report.update(flops_per_device=flops, flops_per_step=flops * len(devices), memory=memory,
                peak_bytes_per_device=peak, hbm_fraction=peak / hbm if hbm else None,
                fits=peak <= hbm if hbm else None)
  return report


def format_report(report: dict[str, Any]) -> str:
  """Human-readable lines of a `compile_report`."""
  lines = [report["note"], f"stage {report['stage']}; mesh: {report['mesh']}; "
           f"params: {report['param_count']:,} ({report['param_sharding_excess']:.1%} over an "
           f"even fsdp x tensor split); global batch {report['batch_size']} in "
           f"{report['grad_accum_steps']} microbatch(es)"]
  if report["error"]:
    return "\n".join(lines + [f"DOES NOT FIT: {report['error']}"])
  lines.append(f"FLOPs per device per step: {report['flops_per_device']:.4g} "
               f"(whole step {report['flops_per_step']:.4g}); compile {report['compile_s']:.1f} s")
  for kind, size in report["memory"].items():
    lines.append(f"  {kind:>15}: {size / 2**30:8.3f} GiB per device")
  hbm = report["hbm_bytes_per_device"]
  peak = f"  {'peak':>15}: {report['peak_bytes_per_device'] / 2**30:8.3f} GiB per device"
  lines.append(peak + (f" of {hbm / 2**30:.0f} GiB HBM ({report['hbm_fraction']:.0%})"
                       if hbm else ""))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    report = compile_report(f.config, f.topology, f.num_slices)
  except TopologyError as e:
    logging.error("%s", e)
    sys.exit(f"compile_aot: {e}")
  print(format_report(report))
  if f.report:
    os.makedirs(os.path.dirname(os.path.abspath(f.report)), exist_ok=True)
    with open(f.report, "w", encoding="utf-8") as out:
      json.dump(report, out, indent=2, sort_keys=True)
      out.write("\n")
    print(f"wrote {f.report}")
  if report["fits"] is False:
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
