"""Test set-up: 8 virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests (and their subprocesses: CLIs, multi-host workers) compile the same
# tiny train/sample steps; a persistent XLA cache shared by the whole run turns
# the repeats into cache hits. Environment variables reach the subprocesses too.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# TensorFlow must not grab a GPU or preallocate anything in tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Adds the project's XLA:CPU flags (suti_jax/xla_flags.py), so tests run what users run.
import suti_jax  # noqa: E402,F401  (before the backend starts on purpose)
import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, "tests expect 8 virtual CPU devices"


def pytest_terminal_summary(terminalreporter):
  """One line naming the DreamBench tests skipped for lack of data, and the fix."""
  skipped = [r for r in terminalreporter.stats.get("skipped", [])
             if isinstance(r.longrepr, tuple) and "DreamBench" in r.longrepr[2]
             and "not found" in r.longrepr[2]]
  if skipped:
    where = skipped[0].longrepr[2].split(" at ", 1)[-1]
    terminalreporter.write_line(
        f"{len(skipped)} DreamBench tests skipped: no manifest.json at {where}; set "
        "SUTI_DREAMBENCH_DIR=/path/to/dreambench (the folder with manifest.json) to run them.",
        yellow=True)
