"""Benchmark plumbing shared by every bench script and the torch peer runner:
host set-up, step timing (median, CPU/wall ratio), Markdown tables and reports.
Standard library only, so the peer venv (no jax, no numpy) can import it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

REPORT_DIR = os.path.join("reports", "bench")
# The repository root: benchmarks and their child processes run from it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Threads each system may use: one fixed budget for every side-by-side timing.
THREADS = 2


def configure_host(num_devices: int = 1, threads: int = THREADS) -> None:
  """Sets XLA/TF environment for CPU benchmarking; call before importing jax.

  Replaces any device-count flag already in XLA_FLAGS (a test run exports 8
  virtual devices), so each script gets exactly what it asks for, and drops
  tokens that are not `--flag`s: XLA ignored every flag after such a token
  (measured: suti_jax's YNNPACK flag behind one gave the jaxlib-default speed).

  Args:
    num_devices: virtual CPU devices XLA creates.
    threads: TensorFlow's intra- and inter-op threads (tf.data, Beam's TF ops).
      XLA's CPU client takes one thread per core and no XLA flag caps it, so
      `THREADS` is this machine's core count and the peers get as many.
  """
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if f.startswith("--") and not re.match(
              r"--(xla_force_host_platform_device_count|xla_cpu_multi_thread_eigen)=", f)]
  os.environ["XLA_FLAGS"] = " ".join(kept + [
      f"--xla_force_host_platform_device_count={num_devices}",
      "--xla_cpu_multi_thread_eigen=true"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ["CUDA_VISIBLE_DEVICES"] = ""
  # tf.data and Beam's TF ops share the cores with XLA; hold them to the same budget.
  os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
  os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)


@dataclasses.dataclass(frozen=True)
class Timing:
  """Per-call wall and process CPU seconds of repeated calls after warm-up."""

  wall_s: tuple[float, ...]
  cpu_s: tuple[float, ...]

  @property
  def median_s(self) -> float:
    return statistics.median(self.wall_s)

  @property
  def cpu_wall_ratio(self) -> float:
    """Process CPU time over wall time: ~threads when alone, less under contention."""
    return sum(self.cpu_s) / max(sum(self.wall_s), 1e-12)

  def as_dict(self) -> dict[str, Any]:
    return {"median_s": self.median_s, "min_s": min(self.wall_s), "max_s": max(self.wall_s),
            "cpu_wall_ratio": self.cpu_wall_ratio, "calls": len(self.wall_s)}


def time_calls(fn: Callable[[], Any], warmup: int, calls: int) -> Timing:
  """Times `fn` (which must block until its work is done) `calls` times.

  Args:
    fn: one unit of work, e.g. a train step followed by block_until_ready.
    warmup: untimed calls first (compilation, caches, allocator warm-up).
    calls: timed calls.

  Returns:
    The Timing of the timed calls.
  """
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(max(calls, 1)):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
  return Timing(tuple(wall), tuple(cpu))


def environment() -> dict[str, Any]:
  """Where the numbers come from: host, cores and load (contention shows here)."""
  return {"python": platform.python_version(), "machine": platform.machine(),
          "cpu_count": os.cpu_count(), "threads": THREADS,
          "load_avg_1m": os.getloadavg()[0], "time_utc": time.strftime(
              "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def fmt(value: Any) -> str:
  """Compact cell text: 3 significant digits for floats, thousands for ints."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if value == 0 or 1e-3 <= abs(value) < 1e6:
      return f"{value:.3g}"
    return f"{value:.3e}"
  return str(value)


@dataclasses.dataclass
class Table:
  """One Markdown table: a title, a header row and rows of cells."""

  title: str
  headers: Sequence[str]
  rows: list[Sequence[Any]] = dataclasses.field(default_factory=list)

  def markdown(self) -> str:
    lines = [f"### {self.title}", "",
             "| " + " | ".join(self.headers) + " |",
             "|" + "|".join("---" for _ in self.headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
    return "\n".join(lines)

  def as_dict(self) -> dict[str, Any]:
    return {"title": self.title, "headers": list(self.headers),
            "rows": [list(r) for r in self.rows]}


def base_parser(description: str) -> argparse.ArgumentParser:
  """Flags every bench script has: --smoke and --out_dir."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--smoke", action="store_true",
                 help="Tiny sizes, 1-2 iterations: checks the script runs, not speed.")
  p.add_argument("--out_dir", default=REPORT_DIR, help="Where <name>.json is written.")
  return p


def write_report(name: str, question: str, tables: Sequence[Table], results: dict[str, Any],
                 *, smoke: bool, out_dir: str = REPORT_DIR,
                 notes: Sequence[str] = ()) -> dict[str, Any]:
  """Prints the Markdown and writes `<out_dir>/<name>.json`.

  Args:
    name: the script's report name.
    question: the one question the script answers.
    tables: its tables.
    results: the headline figures (JSON-serialisable).
    smoke: whether sizes were the smoke sizes (numbers then mean nothing).
    out_dir: report folder.
    notes: caveats printed under the tables.

  Returns:
    The report dict as written.
  """
  body = [f"## {name}", "", f"**Question.** {question}", ""]
  if smoke:
    body += ["_Smoke run: tiny sizes, timings are not meaningful._", ""]
  for t in tables:
    body += [t.markdown(), ""]
  body += [f"- {n}" for n in notes]
  markdown = "\n".join(body).rstrip() + "\n"
  report = {"name": name, "question": question, "smoke": smoke,
            "environment": environment(), "tables": [t.as_dict() for t in tables],
            "results": results, "notes": list(notes), "markdown": markdown}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, sort_keys=True, default=str)
  print(markdown)
  return report



def child_parser(question: str, rounds: int) -> argparse.ArgumentParser:
  """`base_parser` plus the flags of a script that times variants in child processes:
  --child (internal: one variant's JSON request) and --rounds (alternations)."""
  p = base_parser(question)
  p.add_argument("--child", default="",
                 help="Internal: run one variant in this process from a JSON request.")
  p.add_argument("--rounds", type=int, default=rounds, help="Alternations of the variants.")
  return p


def run_child(module: str, variant: str, request: dict[str, Any],
              env: dict[str, str]) -> dict[str, Any]:
  """Runs `python -m <module> --child <request>` under `env` (one variant per fresh
  process: XLA flags and glibc tunables are read at start-up) and returns the JSON
  object it prints last.

  Raises:
    RuntimeError: the child failed (its stderr tail is in the message).
  """
  proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(request)],
                        env=env, cwd=REPO, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"variant {variant!r} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
