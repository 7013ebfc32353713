"""Preemption: a SIGTERM flag plus, on TPU, JAX's preemption sync point, so that
every process agrees to save at the same step and exit cleanly.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Says when the loop should save and stop.

  Install it in the main thread; it restores the previous SIGTERM handler on
  `close()`. On TPU, the coordination service turns a maintenance event or a
  SIGTERM on any host into a common sync step (`reached_preemption_sync_point`);
  elsewhere with several processes the local flags are OR-ed across processes
  every `sync_every_steps` steps (a small collective).
  """

  def __init__(self, sync_every_steps: int = 1):
    self._flag = threading.Event()
    self._sync_every_steps = max(1, sync_every_steps)
    self._previous = None
    self._use_sync_point = jax.default_backend() == "tpu" and jax.process_count() > 1

  def install(self) -> PreemptionWatcher:
    """Registers the SIGTERM handler (main thread only).

    Not on multi-host TPU: JAX's own preemption notifier handles SIGTERM there,
    and replacing its handler would hide the signal from the sync point.
    """
    if self._use_sync_point:
      return self
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
    del frame
    logging.warning("received signal %d: will save and stop at the next step", signum)
    self._flag.set()

  def request_stop(self) -> None:
    """Sets the flag as SIGTERM would (used by tests and interactive runs)."""
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """True when every process should save `step` and exit.

    Args:
      step: the step just completed; must be called with the same steps on
        every process (it may run a collective).

    Returns:
      Whether to stop now.
    """
    if self._use_sync_point:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self._flag.is_set()
    if step % self._sync_every_steps:
      return False
    flags = multihost_utils.process_allgather(int(self._flag.is_set()))
    return bool(flags.any())
