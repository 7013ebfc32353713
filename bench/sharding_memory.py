"""How evenly does fsdp split the train state? Per-device bytes of params and
optimizer state over N = 1, 2, 4, 8 devices, against total / N.

  python -m bench.sharding_memory [--smoke]
"""

from __future__ import annotations

import math
import sys
from typing import Any

from bench import common

MAX_DEVICES = 8
common.configure_host(num_devices=MAX_DEVICES)

import flax.linen as nn  # noqa: E402  (after configure_host on purpose)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import suti_step  # noqa: E402
from configs import imagen_base64  # noqa: E402
from suti_jax.train import experiment as experiment_lib  # noqa: E402
from suti_jax.train import state as state_lib  # noqa: E402
from suti_jax.train import step as step_lib  # noqa: E402

NAME = "sharding_memory"
QUESTION = ("Under fsdp over N devices, how many bytes of params + optimizer state does each "
            "device hold for the paper-size Imagen base64, relative to an even split total/N?")
# TrainState fields, then the T5 params a run that encodes text in the step holds.
FIELDS = ("params", "opt_state", "ema_params", "text_params")
GIB = 2**30


def _bytes(tree: Any, shardings: Any | None) -> int:
  """Bytes of `tree` on one device (whole arrays if `shardings` is None).

  The largest shard is counted: with uneven splits it is what a device must fit.
  """
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
  total = 0
  for x, s in zip(leaves, shards):
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def state_bytes(exp: experiment_lib.Experiment, counts: list[int]) -> list[dict[str, Any]]:
  """Per-device bytes of each state field (and the in-step T5) under fsdp over each N.

  Shapes come from one `jax.eval_shape` of each init; nothing is allocated.

  Args:
    exp: the experiment.
    counts: device counts N.

  Returns:
    Per N: {'devices', 'total': {field: bytes}, 'per_device': {field: bytes}}.
  """
  with nn.logical_axis_rules(exp.sec.rules):
    boxed = jax.eval_shape(exp.init, jax.random.PRNGKey(0))
  unboxed = nn.unbox(boxed)
  trees = {f: getattr(unboxed, f) for f in FIELDS[:-1]}
  trees["text_params"] = experiment_lib.abstract_text(exp, suti_step.fsdp_mesh(jax.devices()[:1]))
  totals = {f: _bytes(trees[f], None) for f in FIELDS}
  rows = []
  for n in counts:
    mesh = suti_step.fsdp_mesh(jax.devices()[:n])
    shardings = state_lib.state_shardings(boxed, mesh, exp.sec.rules)
    per_device = {f: _bytes(trees[f], getattr(shardings, f)) for f in FIELDS[:-1]}
    text = experiment_lib.abstract_text(exp, mesh)
    per_device["text_params"] = _bytes(text, jax.tree.map(lambda x: x.sharding, text))
    rows.append({"devices": n, "total": totals, "per_device": per_device})
  return rows


def compiled_bytes(exp: experiment_lib.Experiment, counts: list[int]) -> list[dict[str, Any]]:
  """The compiled train step's per-device memory analysis under fsdp over each N."""
  rows = []
  for n in counts:
    mesh = suti_step.fsdp_mesh(jax.devices()[:n])
    shapes = experiment_lib.sharded_shapes(exp, mesh)
    compiled = step_lib.compile_train_step(exp.step_fn, shapes.state, shapes.batch, shapes.text,
                                           mesh, exp.sec.rules)
    memory = compiled.memory_analysis()
    rows.append({"devices": n, "argument": int(memory.argument_size_in_bytes),
                 "temp": int(memory.temp_size_in_bytes),
                 "output": int(memory.output_size_in_bytes)})
  return rows


def _config(arg: str | None, smoke: bool):
  c = imagen_base64.get_config(arg)
  if smoke:  # The test suite's micro UNet: compiles in seconds.
    c.model.update(base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1),
                   attention_resolutions=(8,))
    c.text.update(num_layers=1, max_length=8)
  c.train.batch_size = MAX_DEVICES
  return c


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = common.base_parser(QUESTION).parse_args(argv)
  counts = [1, 2] if args.smoke else [1, 2, 4, 8]
  # The paper size traces in under a minute under eval_shape; its compiled step
  # (24-layer T5-XXL + 2B-param UNet) is out of a 2-core budget, so the
  # compiled column uses `tiny`.
  abstract_arg = "tiny" if args.smoke else None
  big_exp = experiment_lib.build(experiment_lib.sections(_config(abstract_arg, args.smoke)))
  big = state_bytes(big_exp, counts)
  small_exp = experiment_lib.build(experiment_lib.sections(_config("tiny", args.smoke)))
  small = compiled_bytes(small_exp, counts)
  small_state = state_bytes(small_exp, counts)
  label = "imagen_base64:tiny (micro)" if args.smoke else "imagen_base64 (paper size)"
  big_table = common.Table(
      f"{label}, from eval_shape + shardings (no allocation); fsdp over N",
      ["N", "params GiB/device", "opt_state GiB/device", "params+opt GiB/device",
       "params+opt total/N GiB", "ratio to total/N", "EMA GiB/device", "T5 GiB/device"])
  results = {"abstract_config": label, "abstract": [], "compiled_config": "imagen_base64:tiny",
             "compiled": []}
  for row in big:
    per, tot, n = row["per_device"], row["total"], row["devices"]
    trained = per["params"] + per["opt_state"]
    even = (tot["params"] + tot["opt_state"]) / n
    big_table.rows.append([n, per["params"] / GIB, per["opt_state"] / GIB, trained / GIB,
                           even / GIB, trained / even, per["ema_params"] / GIB,
                           per["text_params"] / GIB])
    results["abstract"].append({**row, "params_plus_opt_per_device": trained,
                                "ratio_to_even": trained / even})
  small_table = common.Table(
      "imagen_base64:tiny train step, compiled `memory_analysis()` per device; fsdp over N "
      f"(batch {MAX_DEVICES})",
      ["N", "argument MiB", "argument total/N MiB", "ratio to total/N", "state MiB (eval_shape)",
       "temp MiB"])
  for row, state_row in zip(small, small_state):
    n = row["devices"]
    even = small[0]["argument"] / n
    state_mib = sum(state_row["per_device"].values()) / 2**20
    small_table.rows.append([n, row["argument"] / 2**20, even / 2**20, row["argument"] / even,
                             state_mib, row["temp"] / 2**20])
    results["compiled"].append({**row, "ratio_to_even": row["argument"] / even})
  notes = ["Bytes per device count the largest shard of each array; arrays whose dims the "
           "mesh does not divide stay replicated (`parallel.sharding.fit_spec`).",
           "T5 (frozen, not optimised) and the EMA copy are listed beside params+opt because "
           "they live in the same TrainState.",
           "The compiled column's argument bytes include the (sharded) batch; Adafactor's "
           "factored statistics are small, so opt_state is a sliver of the paper-size state."]
  return common.write_report(NAME, QUESTION, [big_table, small_table], results,
                             smoke=args.smoke, out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main(sys.argv[1:])
