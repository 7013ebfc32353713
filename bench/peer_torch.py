"""The peer side of bench/train_step_vs_peers.py: trains an imagen-pytorch or
diffusers UNet for a fixed number of steps in the peer venv (torch CPU) and
writes parameter count and step timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types
from typing import Any, Callable

from bench import common

LIBRARIES = ("imagen_pytorch", "diffusers")
# Imagen trains with 10% of captions dropped for classifier-free guidance.
TEXT_DROP_PROB = 0.1


def _import_torch(threads: int):
  """torch limited to `threads` intra-op threads and one inter-op thread."""
  import torch  # pylint: disable=import-outside-toplevel  (only in the peer venv)
  import torch.utils.flop_counter  # noqa: F401  pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)
  return torch


def _import_imagen_unet():
  """imagen_pytorch.Unet, importable without torchvision.

  imagen_pytorch imports torchvision.transforms only to turn samples into PIL
  images, and PyPI's torchvision wheel does not load beside CPU torch 2.13
  (importing it fails with `operator torchvision::nms does not exist`), so
  the peer venv has none. An empty module stands in for it while
  imagen_pytorch imports; any real use would raise AttributeError. Libraries
  that probe for torchvision with find_spec are imported first, so they see it
  missing.
  """
  # pylint: disable=import-outside-toplevel
  import accelerate  # noqa: F401
  import datasets  # noqa: F401
  import diffusers  # noqa: F401
  import transformers  # noqa: F401
  empty = types.ModuleType("torchvision")
  empty.transforms = types.ModuleType("torchvision.transforms")
  sys.modules.setdefault("torchvision", empty)
  sys.modules.setdefault("torchvision.transforms", empty.transforms)
  import imagen_pytorch
  return imagen_pytorch.Unet, imagen_pytorch.__version__


def _attention_flags(spec: dict[str, Any]) -> list[bool]:
  """Per level: does this level's resolution have attention?"""
  return [spec["image_size"] // 2**i in spec["attention_resolutions"]
          for i in range(len(spec["channel_mults"]))]


def _norm_groups(spec: dict[str, Any]) -> int:
  """GroupNorm groups dividing every level's channels (32 at Imagen sizes)."""
  return math.gcd(32, *(spec["base_channels"] * m for m in spec["channel_mults"]))


def build_imagen(spec: dict[str, Any]):
  """imagen-pytorch's Unet configured like suti_jax's Imagen base UNet.

  Text joins the self-attention keys/values (layer_attns_add_text_cond, the
  'concat' mode), no separate cross-attention, plain 3x3 input conv, no extra
  blocks suti_jax lacks (global-context attention, final ResBlock, skip scaling).

  Returns:
    (module, forward(x_t, log_snr, t, text_emb, text_mask) -> eps, version).
  """
  unet_cls, version = _import_imagen_unet()
  attn = _attention_flags(spec)
  first_attn_level = attn.index(True) if any(attn) else 0
  head_dim = spec["base_channels"] * spec["channel_mults"][first_attn_level] // spec["num_heads"]
  model = unet_cls(
      dim=spec["base_channels"], dim_mults=tuple(spec["channel_mults"]),
      num_resnet_blocks=tuple(spec["num_res_blocks"]), text_embed_dim=spec["text_embed_dim"],
      max_text_len=spec["text_len"], channels=3, attn_heads=spec["num_heads"],
      attn_dim_head=head_dim, layer_attns=tuple(attn), layer_attns_add_text_cond=True,
      layer_cross_attns=False, attend_at_middle=attn[-1], init_cross_embed=False,
      init_conv_kernel_size=3, use_global_context_attn=False, scale_skip_connection=False,
      final_resnet_block=False, memory_efficient=False)

  def forward(x_t, log_snr, t, text_emb, text_mask):
    del t  # imagen-pytorch's continuous-time UNet is conditioned on log-SNR.
    return model(x_t, log_snr, text_embeds=text_emb, text_mask=text_mask,
                 cond_drop_prob=TEXT_DROP_PROB)

  return model, forward, version


def build_diffusers(spec: dict[str, Any]):
  """diffusers' UNet2DConditionModel at the same widths, depths and attention levels.

  Returns:
    (module, forward(x_t, log_snr, t, text_emb, text_mask) -> eps, version).
  """
  import diffusers  # pylint: disable=import-outside-toplevel
  attn = _attention_flags(spec)
  model = diffusers.UNet2DConditionModel(
      sample_size=spec["image_size"], in_channels=3, out_channels=3,
      block_out_channels=tuple(spec["base_channels"] * m for m in spec["channel_mults"]),
      layers_per_block=tuple(spec["num_res_blocks"]),
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
      mid_block_type="UNetMidBlock2DCrossAttn" if attn[-1] else None,
      cross_attention_dim=spec["text_embed_dim"],
      # diffusers reads `attention_head_dim` as the number of heads (see its comment).
      attention_head_dim=spec["num_heads"], norm_num_groups=_norm_groups(spec))

  def forward(x_t, log_snr, t, text_emb, text_mask):
    del log_snr  # diffusers' UNet is conditioned on the timestep (t * 1000).
    return model(x_t, t * 1000.0, encoder_hidden_states=text_emb,
                 encoder_attention_mask=text_mask).sample

  return model, forward, diffusers.__version__


def make_step(torch, model, forward: Callable[..., Any], spec: dict[str, Any]):
  """One denoising-loss Adam step with the suti_jax step's extras.

  Like suti_jax's step: text dropped for 10% of examples, cosine log-SNR,
  eps-MSE, global-norm clip at 1, Adam, and an EMA of the weights (0.9999).

  Returns:
    step() -> None.
  """
  gen = torch.Generator().manual_seed(0)
  b, size, length, dim = (spec["batch_size"], spec["image_size"], spec["text_len"],
                          spec["text_embed_dim"])
  x0 = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
  text_emb = torch.randn(b, length, dim, generator=gen)
  text_mask = torch.ones(b, length, dtype=torch.bool)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
  params = [p for p in model.parameters() if p.requires_grad]
  ema = [p.detach().clone() for p in params]

  def step():
    t = torch.rand(b, generator=gen)
    log_snr = -2.0 * torch.log(torch.tan(math.pi * t.clamp(1e-4, 1 - 1e-4) / 2))
    alpha = torch.sigmoid(log_snr).sqrt().view(b, 1, 1, 1)
    sigma = torch.sigmoid(-log_snr).sqrt().view(b, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=gen)
    keep = (torch.rand(b, generator=gen) >= TEXT_DROP_PROB).view(b, 1)
    pred = forward(alpha * x0 + sigma * eps, log_snr, t, text_emb, text_mask & keep)
    loss = torch.mean((pred - eps) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - 0.9999)  # pylint: disable=protected-access

  return step


def run(request: dict[str, Any]) -> dict[str, Any]:
  """Builds and times one library's train step.

  Args:
    request: 'library', 'spec' (the matched UNet, see train_step_vs_peers),
      'warmup', 'steps', 'threads'.

  Returns:
    library, version, torch_version, params, timing (Timing.as_dict), examples_per_s.
  """
  torch = _import_torch(request["threads"])
  torch.manual_seed(0)
  spec = request["spec"]
  build = {"imagen_pytorch": build_imagen, "diffusers": build_diffusers}[request["library"]]
  model, forward, version = build(spec)
  model.train()
  step = make_step(torch, model, forward, spec)
  with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
    step()  # Counted once, untimed: convolutions and matmuls, forward and backward.
  timing = common.time_calls(step, request["warmup"], request["steps"])
  return {"library": request["library"], "version": version, "torch_version": torch.__version__,
          "params": sum(p.numel() for p in model.parameters()), "timing": timing.as_dict(),
          "examples_per_s": spec["batch_size"] / timing.median_s,
          "conv_dot_flops": int(counter.get_total_flops())}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--request", required=True, help="JSON request (see run()).")
  p.add_argument("--out", required=True, help="Where the JSON result is written.")
  args = p.parse_args()
  # Libraries print advice to stdout; the result goes to its own file.
  result = run(json.loads(args.request))
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f)


if __name__ == "__main__":
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  main()
