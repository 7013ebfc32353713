"""Periodic training samples: the EMA model, guided by the stage's sampler, on the
first prompts (and exemplars / low-res inputs) of the current batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from suti_jax.diffusion import sampling
from suti_jax.diffusion.schedule import make_schedule
from suti_jax.models import unet as unet_lib
from suti_jax.train import experiment as experiment_lib
from suti_jax.train import step as step_lib
from suti_jax.train.state import TrainState


def sample_batch(exp: experiment_lib.Experiment, state: TrainState, text_params: Any,
                 batch: dict[str, jax.Array], key: jax.Array, num: int) -> jax.Array:
  """Samples `num` images conditioned on the first `num` examples of `batch`.

  Args:
    exp: the experiment (model, text embeddings, sampling and diffusion sections).
    state: uses `ema_params`.
    text_params: the step's frozen T5 params, or None (precomputed embeddings).
    batch: a global batch.
    key: PRNG key.
    num: images to draw (<= batch size).

  Returns:
    [num, H, W, C] in [-1, 1].
  """
  sec, model = exp.sec, exp.model
  schedule = make_schedule(sec.diffusion)
  b = jax.tree.map(lambda x: x[:num], batch)
  params = {"params": state.ema_params}
  text_emb = exp.embed(text_params, b, "text", b["text_mask"])
  aug_key, sample_key = jax.random.split(key)
  extra = {}
  if sec.model.low_res_size:
    extra = step_lib.low_res_inputs(b["image"], sec.model.low_res_size, aug_key, schedule,
                                    t=sec.sampling.noise_aug_level)
  features = None
  if sec.model.exemplar is not None:
    inputs = step_lib.exemplar_inputs(exp.embed, text_params, b,
                                      jnp.ones((num,), bool))["exemplars"]
    features = model.apply(params, inputs.images, inputs.text_emb, inputs.text_mask, inputs.mask,
                           method=unet_lib.UNet.encode_exemplars)

  def predict(x_t, log_snr, text: bool, exemplars: bool):
    mask = b["text_mask"] if text else jnp.zeros_like(b["text_mask"])
    return model.apply(params, x_t, log_snr, text_emb, mask,
                       exemplar_features=features if exemplars else None, **extra)

  shape = (num, sec.model.image_size, sec.model.image_size, sec.model.out_channels)
  return sampling.sample(predict, shape, sample_key, schedule, sec.sampling,
                         sec.diffusion.prediction, has_exemplars=features is not None)


def make_sampler(exp: experiment_lib.Experiment, mesh: Mesh,
                 num: int) -> Callable[[TrainState, Any, dict[str, Any], jax.Array], jax.Array]:
  """A jitted `sample_batch` whose output is replicated (readable on every host)."""
  fn = lambda state, text, batch, key: sample_batch(exp, state, text, batch, key, num)  # noqa: E731
  return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))
