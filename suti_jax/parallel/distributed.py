"""Multi-process start-up: one call to `jax.distributed.initialize` from flags or
the environment, before any other jax call touches the devices.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, *, multihost: bool = False) -> bool:
  """Joins the process group if this job spans several processes.

  Precedence: explicit arguments, then the environment
  (`JAX_COORDINATOR_ADDRESS`, `SUTI_NUM_PROCESSES`, `SUTI_PROCESS_ID`). With
  `multihost=True` and nothing set, jax auto-detects the cluster (TPU pods,
  SLURM, ...), which is the normal TPU VM path (`--worker=all` runs the same
  command on every host).

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: processes in the job (0 = unset).
    process_id: this process's index (-1 = unset).
    multihost: initialize even with no address (cluster auto-detection).

  Returns:
    True if `jax.distributed.initialize` was called.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("SUTI_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("SUTI_PROCESS_ID", "-1"))
  if not coordinator_address and not multihost:
    return False
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError(
          f"coordinator_address={coordinator_address!r} needs num_processes and process_id "
          f"(got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
