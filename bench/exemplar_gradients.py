"""What does back-propagating through the exemplar encoding cost the demo's SuTI step?

The demo's SuTI train step (`configs/demo.py`: tiny UNet at 16 px, K_max = 5
exemplars encoded by the UNet's own downstack, batch 16, precomputed text
embeddings) compiled with `model.exemplar.encoder_gradients` on and off, both in
one process and timed in alternation, with jaxlib's default XLA:CPU flags as the
demo runs them.

  python -m bench.exemplar_gradients [--smoke]
"""

from __future__ import annotations

import os
import statistics
from typing import Any

# The demo keeps jaxlib's XLA:CPU defaults (launch/demo/__main__.py); so does this
# row. Set before anything imports suti_jax, which adds its flag on import.
os.environ.setdefault("SUTI_JAX_KEEP_XLA_FLAGS", "1")

from bench import common  # noqa: E402

common.configure_host(num_devices=1)

from bench import suti_step  # noqa: E402  (after configure_host on purpose)
from configs import demo  # noqa: E402

NAME = "exemplar_gradients"
QUESTION = ("How much faster is the demo's SuTI train step when the encoded exemplars are "
            "constants of the step (no backward pass through K_max downstack passes)?")
VARIANTS = {"through the exemplars": True, "exemplars as constants": False}
# The shipped base's T5: the demo's SuTI stages name it as the encoder that wrote
# their precomputed embeddings (the step itself holds no T5 params).
SHIPPED_T5 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "pretrained", "demo_base", "checkpoints", "text_encoder")


def _config(encoder_gradients: bool, smoke: bool):
  c = demo.get_config().suti
  c.text.weights_path = SHIPPED_T5
  c.model.exemplar.encoder_gradients = encoder_gradients
  if smoke:
    c.train.batch_size = 2
  c.mesh.update(ici_data=-1, ici_fsdp=1)
  return c


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = common.base_parser(__doc__.split("\n")[0]).parse_args(argv)
  rounds, calls = (1, 1) if args.smoke else (3, 10)
  steps = {name: suti_step.CompiledStep(_config(on, args.smoke))
           for name, on in VARIANTS.items()}
  medians = {name: [] for name in steps}
  cpu_wall = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      timing = common.time_calls(step, 2, calls)
      medians[name].append(timing.median_s)
      cpu_wall[name].append(timing.cpu_wall_ratio)
  sec = next(iter(steps.values())).exp.sec
  batch = sec.train.batch_size
  table = common.Table(
      f"Demo SuTI step (batch {batch}, K_max {sec.model.exemplar.max_exemplars}, "
      f"{sec.model.image_size} px), alternated {rounds} x {calls} calls",
      ["exemplar encoding", "ms per step", "examples/s", "conv+matmul GFLOP per step",
       "CPU/wall"])
  results: dict[str, Any] = {}
  for name, step in steps.items():
    ms = 1e3 * statistics.median(medians[name])
    gflop = step.conv_dot_flops() / 1e9
    table.rows.append([name, ms, batch / ms * 1e3, gflop, statistics.mean(cpu_wall[name])])
    results[name] = {"ms_per_step": ms, "gflop_per_step": gflop, "rounds_ms":
                     [1e3 * m for m in medians[name]]}
  through, constant = (results[name]["ms_per_step"] for name in VARIANTS)
  results["speedup"] = through / constant
  notes = [f"Exemplars as constants: {results['speedup']:.2f}x the step's speed "
           "(`configs/demo.py` sets `suti.model.exemplar.encoder_gradients=False`)."]
  common.write_report(NAME, QUESTION, [table], results, smoke=args.smoke,
                      out_dir=args.out_dir, notes=notes)
  return results


if __name__ == "__main__":
  main()
