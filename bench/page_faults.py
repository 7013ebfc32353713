"""How much of the demo's SuTI train step goes to page faults, and what do huge pages save?

XLA:CPU allocates its large per-step buffers with malloc, which hands allocations
above glibc's mmap threshold to fresh mmaps: their pages fault in on every step.
The Makefile runs the demo and the benchmarks with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, so those mmaps are backed by transparent
huge pages (glibc >= 2.35, THP `madvise` or `always`). The step
(`bench.exemplar_gradients`'s demo SuTI step, jaxlib's default XLA:CPU flags as
the demo runs them) runs in a fresh process per variant (glibc reads its tunables
at start-up), in alternation; each reports minor faults, user and system CPU
seconds per step from `getrusage`.

  python -m bench.page_faults [--smoke] [--rounds=3]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Any

from bench import common

NAME = "page_faults"
QUESTION = ("How many page faults does the demo's SuTI train step take, and how much CPU "
            "do transparent huge pages for malloc save?")
TUNABLE = "glibc.malloc.hugetlb=1"
# Variant -> the glibc tunable it adds to the user's GLIBC_TUNABLES (None: removed).
VARIANTS = {"glibc defaults": None, "huge pages for malloc": TUNABLE}


def child(smoke: bool, calls: int) -> dict[str, Any]:
  """Times the step in this process; per-step wall, user, system seconds and faults."""
  common.configure_host(num_devices=1)
  # pylint: disable=import-outside-toplevel  (after configure_host on purpose)
  from bench import suti_step
  from bench.exemplar_gradients import _config
  step = suti_step.CompiledStep(_config(False, smoke))
  for _ in range(2):
    step()
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(calls):
    step()
  wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return {"ms_per_step": 1e3 * wall / calls,
          "user_ms_per_step": 1e3 * (after.ru_utime - before.ru_utime) / calls,
          "system_ms_per_step": 1e3 * (after.ru_stime - before.ru_stime) / calls,
          "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / calls}


def _tunables(variant: str) -> str:
  """The user's GLIBC_TUNABLES without this row's tunable, plus the variant's."""
  kept = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
          if t and not t.startswith("glibc.malloc.hugetlb=")]
  return ":".join(kept + ([VARIANTS[variant]] if VARIANTS[variant] else []))


def run_variant(variant: str, smoke: bool, calls: int) -> dict[str, Any]:
  """`child` in a fresh process under the variant's GLIBC_TUNABLES."""
  # The demo keeps jaxlib's XLA:CPU defaults (launch/demo/__main__.py); so does the
  # child, which imports suti_jax (adding its flag unless opted out) after this is set.
  env = dict(os.environ, GLIBC_TUNABLES=_tunables(variant), SUTI_JAX_KEEP_XLA_FLAGS="1")
  return common.run_child("bench.page_faults", variant, {"smoke": smoke, "calls": calls},
                          env)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = common.child_parser(QUESTION, rounds=3).parse_args(argv)
  if args.child:
    request = json.loads(args.child)
    print(json.dumps(child(request["smoke"], request["calls"])))
    return {}
  rounds, calls = (1, 2) if args.smoke else (max(1, args.rounds), 30)
  runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
  for _ in range(rounds):
    for variant in VARIANTS:
      runs[variant].append(run_variant(variant, args.smoke, calls))
  fields = ("ms_per_step", "user_ms_per_step", "system_ms_per_step", "minor_faults_per_step")
  results: dict[str, Any] = {
      v: {f: statistics.mean(r[f] for r in rs) for f in fields} | {"runs": rs}
      for v, rs in runs.items()}
  table = common.Table(
      f"Demo SuTI step, {rounds} alternated processes per variant x {calls} steps (means)",
      ["malloc", "GLIBC_TUNABLES added", "ms per step", "CPU ms per step (user + system)",
       "system ms per step", "minor faults per step"])
  for v, r in results.items():
    table.rows.append([v, VARIANTS[v] or "none", r["ms_per_step"],
                       r["user_ms_per_step"] + r["system_ms_per_step"],
                       r["system_ms_per_step"], r["minor_faults_per_step"]])
  cpu = {v: r["user_ms_per_step"] + r["system_ms_per_step"] for v, r in results.items()}
  default, huge = (cpu[v] for v in VARIANTS)
  results["cpu_ratio"] = huge / default
  notes = [f"Huge pages: {results['cpu_ratio']:.2f}x the CPU per step of glibc's defaults. "
           "Two stages share the demo's 2 cores, so CPU per step is what bounds them."]
  common.write_report(NAME, QUESTION, [table], results, smoke=args.smoke,
                      out_dir=args.out_dir, notes=notes)
  return results


if __name__ == "__main__":
  main()
