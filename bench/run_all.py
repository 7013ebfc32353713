"""Runs every benchmark (one process each: each sets its own XLA flags) and
collects their tables into reports/bench/SUMMARY.md (`make bench`).

  python -m bench.run_all [--smoke] [--only=roofline,input_pipeline]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from bench import common

REPO = common.REPO
# Run order: cheapest first, so a failure late on still leaves the earlier reports.
SCRIPTS = ("roofline", "sharding_memory", "input_pipeline", "loop_efficiency",
           "exemplar_gradients", "page_faults", "train_step_vs_peers", "step_profile",
           "personalization_cost")


def run_script(name: str, smoke: bool, out_dir: str) -> dict[str, Any]:
  """Runs `python -m bench.<name>` and reads back its JSON report.

  Raises:
    RuntimeError: the script failed (its output tail is in the message).
  """
  cmd = [sys.executable, "-m", f"bench.{name}", f"--out_dir={out_dir}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd + (["--smoke"] if smoke else []), cwd=REPO, capture_output=True,
                        text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"bench.{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  with open(os.path.join(out_dir, f"{name}.json"), encoding="utf-8") as f:
    report = json.load(f)
  report["script_wall_s"] = time.perf_counter() - start
  return report


def summary_markdown(reports: list[dict[str, Any]], failures: dict[str, str]) -> str:
  """SUMMARY.md: every report's Markdown, then the failures, if any."""
  env = common.environment()
  lines = ["# suti_jax benchmarks", "",
           f"Host: {env['cpu_count']} CPUs, {env['threads']} threads per system, Python "
           f"{env['python']}, {env['time_utc']}. Timings are medians after warm-up; CPU/wall "
           "near the thread count means the cores were not shared.", ""]
  for r in reports:
    lines += [r["markdown"], f"_{r['name']}: {r['script_wall_s']:.0f} s, load average "
              f"{r['environment']['load_avg_1m']:.1f} at the end._", ""]
  for name, error in failures.items():
    lines += [f"## {name}: FAILED", "", "```", error.strip()[-2000:], "```", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = common.base_parser(__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="Comma-separated subset of " + ",".join(SCRIPTS))
  args = p.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(SCRIPTS)
  unknown = sorted(set(names) - set(SCRIPTS))
  if unknown:
    raise SystemExit(f"unknown benchmark(s) {unknown}; known: {list(SCRIPTS)}")
  out_dir = os.path.abspath(args.out_dir)
  reports, failures = [], {}
  for name in names:
    print(f"== bench.{name}", flush=True)
    try:
      reports.append(run_script(name, args.smoke, out_dir))
    except RuntimeError as e:
      failures[name] = str(e)
      print(e, file=sys.stderr, flush=True)
  path = os.path.join(out_dir, "SUMMARY.md")
  os.makedirs(out_dir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(summary_markdown(reports, failures))
  print(f"wrote {path}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
