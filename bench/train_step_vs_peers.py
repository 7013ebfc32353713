"""How fast does suti_jax train an Imagen UNet on CPU next to imagen-pytorch and
diffusers at the same configuration? Examples/s, parameter counts and ratios.

  python -m bench.train_step_vs_peers [--smoke] [--peers=auto|none]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from bench import common

common.configure_host(num_devices=1)

import jax  # noqa: E402  (after configure_host on purpose)

from bench import peer_torch  # noqa: E402
from bench import suti_step  # noqa: E402
from suti_jax.models import unet  # noqa: E402

NAME = "train_step_vs_peers"
QUESTION = ("At one UNet configuration, how many training examples/s does the real jitted "
            "suti_jax train step reach against imagen-pytorch and diffusers (torch CPU), "
            f"each on {common.THREADS} threads, each peer against suti_jax in its attention "
            "layout?")
# The matched configuration: an Imagen-base-shaped UNet scaled to 2 CPU cores.
FULL_SPEC = dict(image_size=32, base_channels=64, channel_mults=(1, 2, 4), num_res_blocks=(2, 2, 2),
                 attention_resolutions=(16, 8), num_heads=4, text_embed_dim=256, text_len=16,
                 batch_size=8)
SMOKE_SPEC = dict(image_size=16, base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1),
                  attention_resolutions=(8,), num_heads=2, text_embed_dim=16, text_len=8,
                  batch_size=2)
REPO = common.REPO
PEER_VENV = os.path.join(REPO, ".venv-bench")
PEER_TIMEOUT_S = 3600
# The suti_jax attention layout (UNetConfig.attention_layout) of each peer's UNet:
# imagen-pytorch attends once per level, after its ResBlocks; diffusers after
# every ResBlock. Each peer is compared with suti_jax in its own layout.
PEER_LAYOUTS = {"imagen_pytorch": "level_end", "diffusers": "every_block"}


def run_suti(spec: dict[str, Any], layout: str, warmup: int, steps: int) -> dict[str, Any]:
  """Times the compiled suti_jax step (1 device) at `spec` with attention `layout`."""
  step = suti_step.CompiledStep(suti_step.matched_config(spec, layout))
  timing = common.time_calls(step, warmup, steps)
  return {"library": f"suti_jax ({layout})", "attention_layout": layout,
          "version": f"jax {jax.__version__}", "params": step.unet_params,
          "text_params": step.text_params, "timing": timing.as_dict(),
          "examples_per_s": spec["batch_size"] / timing.median_s,
          "conv_dot_flops": step.conv_dot_flops()}


def run_peer(library: str, spec: dict[str, Any], warmup: int, steps: int,
             venv: str) -> dict[str, Any]:
  """Runs bench/peer_torch.py in the peer venv and reads its JSON result.

  Raises:
    RuntimeError: the peer process failed (its stderr tail is in the message).
  """
  request = {"library": library, "spec": spec, "warmup": warmup, "steps": steps,
             "threads": common.THREADS}
  env = dict(os.environ, HF_HOME=os.path.join(venv, "hf-home"), HF_HUB_OFFLINE="1",
             OMP_NUM_THREADS=str(common.THREADS), MKL_NUM_THREADS=str(common.THREADS),
             PYTHONPATH=REPO)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    proc = subprocess.run(
        [os.path.join(venv, "bin", "python"), "-m", "bench.peer_torch",
         "--request", json.dumps(request), "--out", out],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=PEER_TIMEOUT_S,
        check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{library} peer failed:\n{proc.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
      return json.load(f)


def peers_skipped(peers: str, venv: str) -> str | None:
  """Why the peers cannot run ('none' asked, or no peer venv), or None if they can."""
  if peers == "none":
    return "Peers skipped (--peers=none): suti_jax alone."
  if not os.access(os.path.join(venv, "bin", "python"), os.X_OK):
    return (f"Peer venv {venv} is not set up (run `bash bench/setup_peers.sh`): suti_jax alone.")
  return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(QUESTION)
  p.add_argument("--peers", default="auto", choices=("auto", "none"),
                 help="auto: run the peers if the peer venv exists; none: suti_jax alone.")
  p.add_argument("--peer_venv", default=PEER_VENV)
  p.add_argument("--steps", type=int, default=None, help="Timed steps (default 20; smoke 2).")
  args = p.parse_args(argv)
  spec = dict(SMOKE_SPEC if args.smoke else FULL_SPEC)
  warmup, steps = (1, args.steps or 2) if args.smoke else (3, args.steps or 20)
  venv = os.path.abspath(args.peer_venv)
  skipped = peers_skipped(args.peers, venv)
  notes = [skipped] if skipped else []
  suti = {layout: run_suti(spec, layout, warmup, steps) for layout in unet.ATTENTION_LAYOUTS}
  peers = [] if skipped else [run_peer(lib, spec, warmup, steps, venv)
                              for lib in peer_torch.LIBRARIES]
  systems = [*suti.values(), *peers]
  table = common.Table(
      f"Train step, {spec['image_size']}px, base {spec['base_channels']} x "
      f"{spec['channel_mults']}, ResBlocks {spec['num_res_blocks']}, attention at "
      f"{spec['attention_resolutions']}, text {spec['text_len']} x {spec['text_embed_dim']}, "
      f"batch {spec['batch_size']}; median of {steps} steps after {warmup} warm-up",
      ["system", "version", "UNet params", "GFLOP per example", "examples/s",
       "GFLOP/s", "median step s", "CPU/wall", "suti_jax (same layout) / system",
       "per FLOP"])
  for s in systems:
    s["gflop_per_example"] = s["conv_dot_flops"] / spec["batch_size"] / 1e9
    s["gflop_per_s"] = s["gflop_per_example"] * s["examples_per_s"]
  ratios, work_ratios = {}, {}
  for s in peers:
    matched = suti[PEER_LAYOUTS[s["library"]]]
    ratios[s["library"]] = matched["examples_per_s"] / s["examples_per_s"]
    work_ratios[s["library"]] = matched["gflop_per_s"] / s["gflop_per_s"]
  for s in systems:
    table.rows.append([s["library"], s["version"], s["params"], s["gflop_per_example"],
                       s["examples_per_s"], s["gflop_per_s"], s["timing"]["median_s"],
                       s["timing"]["cpu_wall_ratio"], ratios.get(s["library"], "-"),
                       work_ratios.get(s["library"], "-")])
  notes += [
      "suti_jax runs in both attention layouts (`model.attention_layout`): 'every_block' "
      "attends after every ResBlock of a level with attention, as diffusers does, "
      "'level_end' once per level after its ResBlocks, as imagen-pytorch does; each peer's "
      "ratio is taken against suti_jax in its own layout.",
      f"suti_jax runs the real compiled train step (train/step.py): it also encodes the text "
      f"with a 1-layer T5 ({suti['every_block']['text_params']:,} params), drops 10% of captions, clips the "
      "global norm at 1, applies Adam and an EMA; the peer steps do the same around their UNet "
      "with precomputed text embeddings.",
      "Architectures differ in detail (block layout, attention/FF internals), so the same "
      "widths and depths are not the same work: GFLOP per example counts each step's "
      "convolutions and matrix products, forward and backward (2 per multiply-add; suti_jax "
      "from the step's jaxpr, the peers with torch's FlopCounterMode), and 'per FLOP' "
      "compares GFLOP/s, the speed at equal work.",
      "CPU/wall well below the thread count means the cores were shared during the run; "
      "torch's OpenMP regions suffer more from that than XLA's thread pool, so only ratios "
      "from rows with CPU/wall near the thread count compare the libraries themselves.",
  ]
  return common.write_report(
      NAME, QUESTION, [table],
      {"spec": spec, "systems": systems, "suti_over_peer": ratios,
       "suti_over_peer_per_flop": work_ratios, "peer_layouts": PEER_LAYOUTS,
       "peers_ran": bool(peers)},
      smoke=args.smoke, out_dir=args.out_dir, notes=notes)


if __name__ == "__main__":
  main(sys.argv[1:])
