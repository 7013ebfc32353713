"""Does a finished demo run meet the bars for "SuTI personalises"? Reads the run's
metrics.json (written by `make demo`) and checks `suti_jax.demo.report.target_checks`.

  python -m bench.demo_targets [--metrics=reports/demo/metrics.json]

Exits 1 when a target is not met, so a scheduled job can watch the demo's quality.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench import common
from suti_jax.demo import report

NAME = "demo_targets"
QUESTION = "Which of the demo's personalisation targets does the last `make demo` run meet?"


def main(argv: list[str] | None = None) -> int:
  p = common.base_parser(QUESTION)
  p.add_argument("--metrics", default="reports/demo/metrics.json", help="A demo metrics.json.")
  args = p.parse_args(argv)
  with open(args.metrics, encoding="utf-8") as f:
    metrics: dict[str, Any] = json.load(f)
  checks = report.target_checks(metrics)
  table = common.Table("Demo targets", ["target", "measured", "met"],
                       [[name, value, "yes" if met else "no"] for name, value, met in checks])
  met = sum(m for _, _, m in checks)
  common.write_report(NAME, QUESTION, [table], {
      "metrics": args.metrics, "met": met, "total": len(checks),
      "targets": [{"target": n, "measured": v, "met": m} for n, v, m in checks]},
                      smoke=False, out_dir=args.out_dir,
                      notes=[f"{met} of {len(checks)} targets met ({args.metrics})."])
  return 0 if met == len(checks) else 1


if __name__ == "__main__":
  sys.exit(main())
