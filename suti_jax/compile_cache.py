"""XLA compilation: the persistent cache the CLIs and the demo share, a lock that
makes threads compile in turn, and a per-thread count of the seconds spent
compiling (what a cache hit saves).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

import jax
from jax import monitoring

# Recorded by jax around every XLA backend compile; a persistent-cache hit skips it.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_seconds: collections.Counter[int] = collections.Counter()
_lock = threading.Lock()
_listening = False
_compiling = threading.Lock()


def enable(directory: str) -> str:
  """Uses `directory` as jax's persistent compilation cache, unless the user chose one.

  `JAX_COMPILATION_CACHE_DIR` (or an earlier `jax.config` setting) wins, so a
  cache shared by several runs stays shared.

  Returns:
    The cache directory in effect.
  """
  current = jax.config.jax_compilation_cache_dir
  if not current:
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    current = directory
  return current


@contextlib.contextmanager
def one_at_a_time():
  """Holds the process's compile lock while the block builds its programs.

  Stages that run in threads of one process (the demo's) often build the same
  programs: SuTI v1 and v2 train one architecture. Built in turn, the later one
  reads them from the persistent cache instead of compiling them again.
  """
  with _compiling:
    yield


def _record(event: str, duration: float, **_: object) -> None:
  if event == BACKEND_COMPILE_EVENT:
    with _lock:
      _seconds[threading.get_ident()] += duration


def thread_compile_seconds() -> float:
  """Seconds this thread has spent in XLA backend compiles since the first call."""
  global _listening
  with _lock:
    if not _listening:
      monitoring.register_event_duration_secs_listener(_record)
      _listening = True
    return _seconds[threading.get_ident()]
