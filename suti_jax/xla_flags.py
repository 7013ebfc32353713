"""XLA:CPU flags measured faster for this project's UNets, added to `XLA_FLAGS`
when `suti_jax` is imported (before any backend starts), unless already set.

jaxlib 0.10's CPU backend hands convolutions, dots, reductions and elementwise
chains to YNNPACK. Its convolutions are the slow part here: alone, a 32 px
weight-gradient convolution ran at 58-72 GFLOP/s under YNNPACK and at 158-234
with XLA's Eigen convolutions. Keeping YNNPACK for dots and reductions only made
the peer-matched train step 1.22-1.33x (`bench.step_profile`) and the demo's base and
SuTI steps 1.5x and 1.23x faster. Other backends ignore `xla_cpu_*` flags.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# Flag -> value; measured on jaxlib 0.10. A jaxlib without a flag would abort on
# it, so they are added only for the jaxlib minor versions they were measured on.
CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "individual_dot,reduce"}
MEASURED_JAXLIB = ("0.10",)
OPT_OUT_ENV = "SUTI_JAX_KEEP_XLA_FLAGS"


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ,
                  jaxlib_version: str | None = None) -> list[str]:
  """Puts the `CPU_FLAGS` the user has not set in front of `environ['XLA_FLAGS']`.

  In front, because XLA ignores every flag after a token that is not a `--flag`.

  Nothing is added when `SUTI_JAX_KEEP_XLA_FLAGS` is set to a non-empty value
  or the jaxlib version was not measured.

  Args:
    environ: the environment to edit (the process's by default).
    jaxlib_version: defaults to the installed jaxlib's.

  Returns:
    The flags added, as `--name=value` strings.
  """
  if environ.get(OPT_OUT_ENV):
    return []
  if jaxlib_version is None:
    from jaxlib import version  # pylint: disable=import-outside-toplevel
    jaxlib_version = version.__version__
  if ".".join(jaxlib_version.split(".")[:2]) not in MEASURED_JAXLIB:
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in CPU_FLAGS.items()
           if f"{name}=" not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([*added, current]).strip()
  return added
