"""Where does the compiled train step's time go on XLA:CPU? A per-op profile of the
peer-matched step (`bench.train_step_vs_peers`' configuration) grouped by op kind,
and that step with jaxlib's default CPU flags against suti_jax's
(`suti_jax/xla_flags.py`), each in its own process, alternated.

  python -m bench.step_profile [--smoke]
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from typing import Any

from bench import common

common.configure_host(num_devices=1)

import jax  # noqa: E402  (after configure_host on purpose)

from bench import suti_step  # noqa: E402
from bench import train_step_vs_peers  # noqa: E402
from suti_jax import xla_flags  # noqa: E402

NAME = "step_profile"
QUESTION = ("Which XLA:CPU ops take the peer-matched train step's time, and how fast is the "
            "step with jaxlib's default CPU flags against the flags suti_jax sets?")
VARIANTS = {"jaxlib defaults": {xla_flags.OPT_OUT_ENV: "1"}, "suti_jax flags": {}}
# Runtime bookkeeping events in the trace, not XLA ops.
NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "end: ",
           "ThreadpoolListener", "PythonRefManager", "Handle ", "Wait for", "ParseArguments",
           "AllocateOutputBuffers")


def _instructions(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
  """(instruction name -> its line, computation name -> its body) of HLO text."""
  lines, bodies, current = {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    header = re.match(r"%([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      continue
    if current:
      bodies[current].append(line)
    named = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if named:
      lines[named.group(1)] = line
  return lines, {k: "\n".join(v) for k, v in bodies.items()}


def op_kind(name: str, lines: dict[str, str], bodies: dict[str, str]) -> str:
  """The kind of one executed thunk, from its HLO instruction."""
  line = lines.get(name, "")
  called = re.search(r"calls=%([\w.\-]+)", line)
  body = bodies.get(called.group(1), "") if called else ""
  if name.startswith("ynn_fusion"):
    for op, kind in (("convolution(", "convolution (YNNPACK)"), ("dot(", "dot (YNNPACK)"),
                     ("reduce(", "reduce (YNNPACK)")):
      if op in body:
        return kind
    return "elementwise (YNNPACK)"
  if name.startswith(("convolution", "conv_general_dilated")):
    return "convolution (Eigen, asynchronous: only its launch is timed)"
  if name.startswith("dot"):
    return "dot (XLA)"
  if "transpose" in name or name.startswith("copy"):
    return "copy / transpose"
  if "reduce" in name:
    return "reduce (XLA)"
  return "elementwise and other (XLA)"


def profile(step: suti_step.CompiledStep, calls: int) -> dict[str, Any]:
  """Thread-milliseconds per step of each op kind, and the 8 costliest ops."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        step()
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op: collections.Counter[str] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / calls
  lines, bodies = _instructions(step.compiled.as_text())
  kind_of = {name: op_kind(name, lines, bodies) for name in per_op}
  kinds: collections.Counter[str] = collections.Counter()
  for name, ms in per_op.items():
    kinds[kind_of[name]] += ms
  top = []
  for name, ms in per_op.most_common(8):
    where = re.search(r'op_name="([^"]*)"', lines.get(name, ""))
    shape = lines.get(name, " = ?").split(" = ", 1)[1].split(" ", 1)[0]
    top.append({"op": name, "kind": kind_of[name], "ms": ms,
                "shape": shape, "source": where.group(1)[-80:] if where else ""})
  return {"kinds_ms": dict(kinds.most_common()), "top": top}


def child(spec: dict[str, Any], warmup: int, calls: int, with_profile: bool) -> dict[str, Any]:
  """One variant, in this process: the timed step and, if asked, its profile."""
  step = suti_step.CompiledStep(suti_step.matched_config(spec))
  timing = common.time_calls(step, warmup, calls)
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "timing": timing.as_dict(),
         "examples_per_s": spec["batch_size"] / timing.median_s}
  if with_profile:
    out["profile"] = profile(step, max(2, calls // 4))
  return out


def run_variant(variant: str, spec: dict[str, Any], warmup: int, calls: int,
                with_profile: bool) -> dict[str, Any]:
  """Runs `child` in a fresh process with the variant's environment (flags are per process)."""
  env = dict(os.environ, **VARIANTS[variant])
  if not VARIANTS[variant]:
    env.pop(xla_flags.OPT_OUT_ENV, None)
  # The parent's XLA_FLAGS already carry suti_jax's flags: start from the user's.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if f.split("=")[0].lstrip("-") not in xla_flags.CPU_FLAGS)
  request = {"spec": spec, "warmup": warmup, "calls": calls, "with_profile": with_profile}
  return common.run_child("bench.step_profile", variant, request, env)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = common.child_parser(QUESTION, rounds=2).parse_args(argv)
  if args.child:
    request = json.loads(args.child)
    print(json.dumps(child(request["spec"], request["warmup"], request["calls"],
                           request["with_profile"])))
    return {}
  spec = dict(train_step_vs_peers.SMOKE_SPEC if args.smoke else train_step_vs_peers.FULL_SPEC)
  warmup, calls = (1, 2) if args.smoke else (3, 12)
  runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
  for r in range(max(1, args.rounds)):
    for variant in VARIANTS:
      runs[variant].append(run_variant(variant, spec, warmup, calls, with_profile=r == 0))
  best = {v: max(x["examples_per_s"] for x in rs) for v, rs in runs.items()}
  speed = common.Table(
      f"Train step, peer-matched config (batch {spec['batch_size']}): best of "
      f"{args.rounds} alternated runs, median of {calls} steps each",
      ["XLA:CPU flags", "flags added", "examples/s per run", "best", "vs jaxlib defaults"])
  suti_flags = " ".join(f"--{k}={val}" for k, val in xla_flags.CPU_FLAGS.items())
  for v, rs in runs.items():
    added = "none" if VARIANTS[v] else suti_flags
    speed.rows.append([v, added, " / ".join(common.fmt(x["examples_per_s"]) for x in rs),
                       best[v], best[v] / best["jaxlib defaults"]])
  tables = [speed]
  for v, rs in runs.items():
    kinds = rs[0]["profile"]["kinds_ms"]
    total = sum(kinds.values())
    t = common.Table(f"Op kinds, {v}: thread-ms per step (step wall "
                     f"{rs[0]['timing']['median_s'] * 1e3:.0f} ms)",
                     ["op kind", "ms per step", "share of op time"])
    t.rows += [[k, ms, ms / total] for k, ms in kinds.items() if ms >= 0.005 * total]
    tables.append(t)
    top = common.Table(f"Costliest ops, {v}", ["op", "kind", "ms per step", "output", "source"])
    top.rows += [[o["op"], o["kind"], o["ms"], o["shape"], o["source"]]
                 for o in rs[0]["profile"]["top"]]
    tables.append(top)
  notes = [
      "Thread-ms: each op's duration from jax.profiler's trace, summed per step; ops on the "
      "two threads overlap, so the sum can exceed the step's wall time.",
      "XLA's Eigen convolutions finish asynchronously on the thread pool: their trace "
      "events time only the launch, so with suti_jax's flags the convolutions' share shows "
      "as the gap between the step's wall time and the ops' sum.",
  ]
  return common.write_report(NAME, QUESTION, tables,
                             {"spec": spec, "runs": runs, "best_examples_per_s": best},
                             smoke=args.smoke, out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main(sys.argv[1:])
