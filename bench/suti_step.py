"""The real suti_jax train step and sampler, built and compiled the way
`train/loop.py` builds them, at a benchmark's config, with a random batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from configs import imagen_base64
from suti_jax.config import MeshConfig
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import experiment as experiment_lib
from suti_jax.train import metrics as metrics_lib
from suti_jax.train import samples as samples_lib
from suti_jax.train import step as step_lib
from suti_jax.train import state as state_lib

# Token ids below this are the byte tokenizer's pad/eos/unk.
FIRST_TEXT_ID = 3


def matched_config(spec: Mapping[str, Any],
                   attention_layout: str = "every_block") -> ml_collections.ConfigDict:
  """`imagen_base64:tiny` resized to a benchmark's UNet, text and batch.

  The T5 encoder (part of the real step) is one narrow layer whose output
  width is the spec's text width, so the step's cost is the UNet's, as in the
  peers, which take precomputed text embeddings.

  Args:
    spec: image_size, base_channels, channel_mults, num_res_blocks,
      attention_resolutions, num_heads, text_embed_dim, text_len, batch_size.
    attention_layout: `UNetConfig.attention_layout`.

  Returns:
    A config for `experiment.sections`; Adam, no warmup, clip 1, EMA.
  """
  c = imagen_base64.get_config("tiny")
  for key in ("image_size", "base_channels", "num_heads"):
    c.model[key] = int(spec[key])
  for key in ("channel_mults", "num_res_blocks", "attention_resolutions"):
    c.model[key] = tuple(int(v) for v in spec[key])
  c.model.text_embed_dim = c.text.d_model = int(spec["text_embed_dim"])
  c.model.attention_layout = attention_layout
  c.text.num_layers = 1
  c.text.max_length = int(spec["text_len"])
  c.train.batch_size = int(spec["batch_size"])
  c.optimizer.update(name="adam", learning_rate=1e-4, warmup_steps=0, clip_norm=1.0,
                     ema_decay=0.9999)
  c.mesh.update(ici_data=-1, ici_fsdp=1)
  return c


def random_batch(spec: Mapping[str, jax.ShapeDtypeStruct], vocab_size: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch shaped like `spec`: images in [-1, 1], every text slot used.

  Args:
    spec: `experiment.abstract_batch` / `input.batch_spec` output.
    vocab_size: text ids are drawn below it.
    seed: numpy seed.

  Returns:
    key -> numpy array.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, s in spec.items():
    if s.dtype == np.bool_:
      out[key] = np.ones(s.shape, bool)
    elif np.issubdtype(s.dtype, np.integer):
      out[key] = rng.integers(FIRST_TEXT_ID, vocab_size, s.shape).astype(s.dtype)
    else:
      out[key] = rng.uniform(-1.0, 1.0, s.shape).astype(s.dtype)
  return out


def conv_dot_flops(jaxpr: Any) -> int:
  """FLOPs of a jaxpr's convolutions and matrix products (2 per multiply-add),
  sub-jaxprs included and scan bodies times their length.

  The same ops as torch's FlopCounterMode counts, so steps of different libraries
  compare by the work their models do rather than by XLA's own estimate (which
  also counts elementwise ops).

  Args:
    jaxpr: a `jax.make_jaxpr` result (or its `.jaxpr`).

  Returns:
    FLOPs.
  """
  total = 0
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(kernel)) // out_features
    elif eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += (2 * int(np.prod(eqn.outvars[0].aval.shape))
                * int(np.prod([lhs[i] for i in contracting])))
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += repeat * conv_dot_flops(sub)
  return total


def num_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class CompiledStep:
  """The compiled train step of a config on a mesh, with its state and a batch.

  Calling the object runs one step and waits for it. Attributes: `exp`,
  `mesh`, `state`, `text` (the step's T5 params), `batch`, `compiled`, `flops` (per device per step),
  `memory` (compiled memory analysis), `unet_params`, `text_params`,
  `abstract` (state, batch and text params as shapes).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None,
               seed: int = 0):
    """Builds the experiment, creates the sharded state and compiles the step.

    Args:
      config: a `configs/*.py` config.
      mesh: default: `config.mesh` over all devices.
      seed: seeds the random batch.
    """
    sec = experiment_lib.sections(config)
    self.exp = experiment_lib.build(sec)
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(sec.mesh)
    abstract, shardings, abstract_batch, abstract_text = experiment_lib.sharded_shapes(
        self.exp, self.mesh)
    # XLA:CPU compiles threefry slowly (the init draws every parameter: ~3x the
    # CPU time of RBG measured at the micro size); values do not matter for
    # timing. The step itself is compiled with the default PRNG, as in training.
    with jax.default_prng_impl("rbg"):
      self.state = state_lib.create_state(self.exp.init, shardings,
                                          jax.random.PRNGKey(sec.train.seed), sec.rules)
      self.text = experiment_lib.create_text_params(self.exp, abstract_text)
    self.compiled = step_lib.compile_train_step(self.exp.step_fn, abstract, abstract_batch,
                                                abstract_text, self.mesh, sec.rules)
    host = random_batch(abstract_batch, sec.text.vocab_size, seed)
    self.batch = sharding_lib.global_batch(host, self.mesh, sec.rules)
    self.flops = metrics_lib.train_step_flops(self.compiled, sec.optimizer.grad_accum_steps)
    self.memory = metrics_lib.memory_summary(self.compiled)
    self.unet_params = num_params(abstract.params)
    self.text_params = num_params(abstract_text)
    self.abstract = (abstract, abstract_batch, abstract_text)

  def conv_dot_flops(self) -> int:
    """Convolution and matmul FLOPs of one step (`conv_dot_flops` of its jaxpr)."""
    return conv_dot_flops(jax.make_jaxpr(self.exp.step_fn)(*self.abstract))

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.batch, self.text)
    jax.block_until_ready((self.state, metrics))


def fsdp_mesh(devices: list[Any]) -> Mesh:
  """All of `devices` on the fsdp axis (params and batch split over them)."""
  return mesh_lib.make_mesh(MeshConfig(ici_data=1, ici_fsdp=-1), devices)


def compile_sampler(step: CompiledStep, num_images: int, num_steps: int):
  """The periodic-sample sampler (EMA weights, the stage's guidance) compiled.

  Args:
    step: a built CompiledStep (its experiment, state and batch are reused).
    num_images: images per call (<= batch size).
    num_steps: denoising steps per call.

  Returns:
    (call() -> images [num_images, H, W, C] after blocking, compiled program).
  """
  sec = step.exp.sec
  sampling = dataclasses.replace(sec.sampling, num_steps=num_steps)
  exp = dataclasses.replace(step.exp, sec=dataclasses.replace(sec, sampling=sampling))
  jitted = samples_lib.make_sampler(exp, step.mesh, num_images)
  key = jax.random.PRNGKey(0)
  compiled = jitted.lower(step.state, step.text, step.batch, key).compile()

  def call():
    return jax.block_until_ready(compiled(step.state, step.text, step.batch, key))

  return call, compiled
