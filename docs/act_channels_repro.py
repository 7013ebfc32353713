"""Why `act_channels -> tensor` is off: XLA's SPMD partitioner returns a wrong
input gradient for one 3x3 conv; no flax, GroupNorm or reshape involved.

  python docs/act_channels_repro.py   # 8 virtual CPU devices; prints one line per case

x [8, 8, 8, Cin] carries batch on (data, fsdp) and channels on tensor (our
`act_batch`/`act_channels` rules), the kernel [3, 3, Cin, 16] has Cin on fsdp
(`conv_in -> fsdp`), the output is constrained like x. Sharding constraints
never change values, yet dL/dx differs from the unsharded program's by ~100%
(relative L2) on a (2, 2, 2) mesh. See docs/act_channels_xla_report.md.
"""

from __future__ import annotations

import os
from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")


def input_grad_error(cin: int = 32, *, kernel_spec: tuple[Any, ...] = ("fsdp", "tensor"),
                     act_channels: str | None = "tensor", mesh_shape=(2, 2, 2),
                     shardy: bool = True, kernel_size: int = 3) -> float:
  """Relative L2 error of dL/dx of `sum(conv(x, w) * r)`, sharded vs unsharded.

  Args:
    cin: input channels (the error shows from 32 up; 8, 16, 24 are exact).
    kernel_spec: mesh axes of the kernel's (Cin, Cout) dims.
    act_channels: mesh axis of the activations' channel dim.
    mesh_shape: (data, fsdp, tensor) sizes; their product is the device count.
    shardy: Shardy (jax's default) or the older GSPMD propagation.
    kernel_size: conv window.

  Returns:
    |dx_sharded - dx| / |dx|.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, Mesh, NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  previous = jax.config.values["jax_use_shardy_partitioner"]
  jax.config.update("jax_use_shardy_partitioner", shardy)
  try:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, cin)).astype(np.float32)
    w = rng.normal(size=(kernel_size, kernel_size, cin, 16)).astype(np.float32)
    r = rng.normal(size=(8, 8, 8, 16)).astype(np.float32)
    mesh = Mesh(mesh_utils.create_device_mesh(mesh_shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)
    act = NamedSharding(mesh, P(("data", "fsdp"), None, None, act_channels))
    kernel = NamedSharding(mesh, P(None, None, *kernel_spec))

    def loss(x, w, r, constrain):
      y = jax.lax.conv_general_dilated(constrain(x), w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.sum(constrain(y) * r)

    want = jax.jit(jax.grad(lambda x, w, r: loss(x, w, r, lambda v: v)))(x, w, r)
    sharded = jax.jit(jax.grad(lambda x, w, r: loss(
        x, w, r, lambda v: jax.lax.with_sharding_constraint(v, act))),
                      in_shardings=(act, kernel, act))
    got = sharded(jax.device_put(x, act), jax.device_put(w, kernel), jax.device_put(r, act))
    want, got = np.asarray(want), np.asarray(got)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


CASES = (
    ("as in the UNet: Cin=32, kernel (fsdp, tensor)", {}),
    ("same, GSPMD instead of Shardy", dict(shardy=False)),
    ("kernel (fsdp, None)", dict(kernel_spec=("fsdp", None))),
    ("kernel (fsdp, None), GSPMD", dict(kernel_spec=("fsdp", None), shardy=False)),
    ("Cin=64", dict(cin=64)),
    ("Cin=16 (the down path)", dict(cin=16)),
    ("1x1 conv", dict(kernel_size=1)),
    ("kernel (None, tensor): Cin unsharded", dict(kernel_spec=(None, "tensor"))),
    ("act_channels -> None (the default rule)", dict(act_channels=None)),
    ("mesh (1, 4, 2): batch on fsdp only", dict(mesh_shape=(1, 4, 2))),
)


def main() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}")
  for name, kwargs in CASES:
    print(f"{input_grad_error(**kwargs):9.3g}  {name}")


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
