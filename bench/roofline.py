"""How far from the machine's practical peak do the train step and the sampler
run? Achieved FLOP/s (XLA cost analysis / median time) over a large f32 matmul's.

  python -m bench.roofline [--smoke]
"""

from __future__ import annotations

import sys
from typing import Any

from bench import common

common.configure_host(num_devices=1)

import jax  # noqa: E402  (after configure_host on purpose)
import jax.numpy as jnp  # noqa: E402

from bench import suti_step  # noqa: E402
from configs import imagen_base64  # noqa: E402
from suti_jax.train import metrics as metrics_lib  # noqa: E402

NAME = "roofline"
QUESTION = ("What fraction of the machine's practical float32 peak (a large matmul, same run) "
            "do the tiny train step, one denoising step and a full DDIM sampling call reach?")


def matmul_peak(n: int, warmup: int, calls: int) -> dict[str, Any]:
  """FLOP/s of an [n, n] x [n, n] float32 matmul: the practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  timing = common.time_calls(lambda: compiled(a, b).block_until_ready(), warmup, calls)
  return {"program": f"matmul {n}x{n} f32", "flops": metrics_lib.compiled_flops(compiled),
          "timing": timing}


def tiny_config(smoke: bool):
  """`imagen_base64:tiny`, shrunk further for --smoke (the test suite's micro UNet)."""
  c = imagen_base64.get_config("tiny")
  if smoke:
    c.model.update(base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1),
                   attention_resolutions=(8,))
    c.text.update(num_layers=1, max_length=8)
    c.train.batch_size = 2
  c.mesh.update(ici_data=-1, ici_fsdp=1)
  return c


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = common.base_parser(QUESTION).parse_args(argv)
  warmup, calls = (1, 2) if args.smoke else (3, 20)
  sample_calls = 2 if args.smoke else 5
  peak = matmul_peak(256 if args.smoke else 2048, warmup, calls)
  config = tiny_config(args.smoke)
  step = suti_step.CompiledStep(config)
  num_steps = 2 if args.smoke else config.sampling.num_steps
  batch = config.train.batch_size
  one_step, one_compiled = suti_step.compile_sampler(step, batch, num_steps=1)
  full, _ = suti_step.compile_sampler(step, batch, num_steps=num_steps)
  one_flops = metrics_lib.compiled_flops(one_compiled)
  programs = [
      peak,
      {"program": f"train step (batch {batch})", "flops": step.flops,
       "timing": common.time_calls(step, warmup, calls)},
      {"program": f"1 denoising step (batch {batch}, CFG)", "flops": one_flops,
       "timing": common.time_calls(one_step, warmup, calls)},
      # XLA's cost analysis counts a while-loop body once, so the sampler's
      # FLOPs are its single-step program's times the step count.
      {"program": f"DDIM sampling, {num_steps} steps (batch {batch}, CFG)",
       "flops": one_flops * num_steps,
       "timing": common.time_calls(full, 1, sample_calls)},
  ]
  peak_flops_per_s = peak["flops"] / peak["timing"].median_s
  table = common.Table(
      f"Achieved FLOP/s vs a float32 matmul, imagen_base64:tiny{' (micro)' if args.smoke else ''}, "
      f"{common.THREADS} threads",
      ["program", "GFLOP per call", "median s", "GFLOP/s", "fraction of matmul peak", "CPU/wall"])
  results = {"peak_gflops_per_s": peak_flops_per_s / 1e9, "programs": []}
  for prog in programs:
    timing = prog["timing"]
    achieved = prog["flops"] / timing.median_s
    fraction = achieved / peak_flops_per_s
    table.rows.append([prog["program"], prog["flops"] / 1e9, timing.median_s, achieved / 1e9,
                       fraction, timing.cpu_wall_ratio])
    results["programs"].append({"program": prog["program"], "flops": prog["flops"],
                                "gflops_per_s": achieved / 1e9, "fraction_of_peak": fraction,
                                "timing": timing.as_dict()})
  notes = ["FLOPs come from `compiled.cost_analysis()`; the peak is measured, not a datasheet "
           "figure, so 'fraction' is the distance to what this host actually sustains.",
           "The sampler's FLOPs are its 1-step program's times the step count (XLA's cost "
           "analysis counts a while-loop body once)."]
  return common.write_report(NAME, QUESTION, [table], results, smoke=args.smoke,
                             out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main(sys.argv[1:])
