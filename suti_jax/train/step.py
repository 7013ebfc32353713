"""The pure train step (text embeddings: precomputed or frozen-T5 encoded in the
step; SR low-res derivation, condition dropout, denoising loss, optional
microbatch accumulation, update, EMA) and its jit with explicit shardings.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from suti_jax.config import DiffusionConfig, OptimizerConfig
from suti_jax.diffusion import loss as loss_lib
from suti_jax.diffusion.schedule import Schedule, make_schedule
from suti_jax.models import exemplar as exemplar_lib
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import t5
from suti_jax.parallel import axes
from suti_jax.parallel import sharding as sharding_lib
from suti_jax.train import optimizer as optimizer_lib
from suti_jax.train.state import TrainState

Batch = dict[str, jax.Array]
# (text_params, batch, name, mask [..., L]) -> embeddings [..., L, D] of the texts
# `name` ('text' or 'exemplar_text'), zero where `mask` is False.
EmbedFn = Callable[[Any, Batch, str, jax.Array], jax.Array]
# (params, text_params, batch, key) -> (scalar loss, aux scalars).
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
# Same inputs -> ((loss, aux), grads).
GradFn = Callable[[Any, Any, Batch, jax.Array], tuple[tuple[jax.Array, dict], Any]]
# (ema_params, params, step) -> ema_params.
EmaFn = Callable[[Any, Any, jax.Array], Any]
# The resize used to derive an SR stage's low-res input; it must match the
# cascade's (`diffusion.cascade.CascadeStage.resize_method`).
LOW_RES_RESIZE = "bicubic"


def encode_text(encoder: t5.T5Encoder, text_params: Any, ids: jax.Array,
                mask: jax.Array) -> jax.Array:
  """Frozen T5 embeddings [N, L, D] (float32, zero at padding) of ids [N, L]."""
  emb = encoder.apply({"params": jax.lax.stop_gradient(text_params)}, ids, mask)
  return jax.lax.stop_gradient(jnp.where(mask[..., None], emb.astype(jnp.float32), 0.0))


def in_step_embeddings(encoder: t5.T5Encoder) -> EmbedFn:
  """Encodes `batch[name + '_ids']` with the frozen T5 inside the step (small runs)."""

  def embed(text_params: Any, batch: Batch, name: str, mask: jax.Array) -> jax.Array:
    ids = batch[f"{name}_ids"]
    length = ids.shape[-1]
    emb = encode_text(encoder, text_params, ids.reshape(-1, length), mask.reshape(-1, length))
    return emb.reshape(*mask.shape, -1)

  return embed


def precomputed_embeddings(text_params: Any, batch: Batch, name: str,
                           mask: jax.Array) -> jax.Array:
  """Reads `batch[name + '_emb']` (written offline by the frozen T5); needs no params.

  Zeroing where `mask` is False makes a dropped text exactly what the in-step
  encoder gives for it: an all-False mask over a zero embedding.
  """
  del text_params  # The embeddings were computed offline.
  return jnp.where(mask[..., None], batch[f"{name}_emb"].astype(jnp.float32), 0.0)


def derive_low_res(image: jax.Array, size: int) -> jax.Array:
  """An SR stage's clean low-res input: the target [B,H,W,C] resized to `size`.

  Bicubic overshoots, so the result is clipped back to [-1, 1].
  """
  b, _, _, c = image.shape
  return jnp.clip(jax.image.resize(image, (b, size, size, c), LOW_RES_RESIZE), -1.0, 1.0)


def low_res_inputs(image: jax.Array, size: int, key: jax.Array, schedule: Schedule,
                   **aug: float) -> dict[str, jax.Array]:
  """SR conditioning from the target: resize to `size`, then noise-augment.

  Args:
    image: [B, H, W, C] targets in [-1, 1].
    size: the stage's low_res_size (px).
    key: PRNG key for the aug level and noise.
    schedule: the stage's schedule.
    **aug: `max_t=` (training: aug time drawn in [0, max_t]) or `t=` (sampling).

  Returns:
    UNet kwargs `low_res` [B, size, size, C] and `aug_log_snr` [B].
  """
  low_res, aug_log_snr = loss_lib.noise_augment(derive_low_res(image, size), key, schedule, **aug)
  return {"low_res": low_res, "aug_log_snr": aug_log_snr}


def exemplar_inputs(embed: EmbedFn, text_params: Any, batch: Batch,
                    keep: jax.Array) -> dict[str, Any]:
  """SuTI conditioning: K exemplars per example, with their caption embeddings.

  Args:
    embed: `in_step_embeddings(encoder)` or `precomputed_embeddings`.
    text_params: the T5 params (None for precomputed embeddings).
    batch: with exemplar_images [B,K,H,W,C], exemplar_text_mask [B,K,L],
      exemplar_mask [B,K], and exemplar_text_ids [B,K,L] or exemplar_text_emb
      [B,K,L,D].
    keep: [B] bool; False drops every exemplar of that example (CFG).

  Returns:
    UNet kwargs `exemplars` (an ExemplarInputs).
  """
  mask = batch["exemplar_text_mask"]
  return {"exemplars": exemplar_lib.ExemplarInputs(
      images=batch["exemplar_images"], text_emb=embed(text_params, batch, "exemplar_text", mask),
      text_mask=mask, mask=batch["exemplar_mask"] & keep[:, None])}


def make_loss_fn(model: unet_lib.UNet, embed: EmbedFn, cfg: DiffusionConfig) -> LossFn:
  """The stage's loss: base or SR, plain Imagen or SuTI, decided here once.

  Args:
    model: the UNet (its config says SR via low_res_size, SuTI via exemplar).
    embed: where text embeddings come from (`in_step_embeddings` or
      `precomputed_embeddings`).
    cfg: schedule, objective, condition dropout and noise aug.

  Returns:
    loss_fn(params, text_params, batch, key) -> (mean loss, aux means).
  """
  schedule = make_schedule(cfg)
  ucfg = model.config
  sr = functools.partial(low_res_inputs, size=ucfg.low_res_size, schedule=schedule,
                         max_t=cfg.noise_aug_max) if ucfg.low_res_size else None
  suti = functools.partial(exemplar_inputs, embed) if ucfg.exemplar is not None else None

  def loss_fn(params, text_params, batch, key):
    drop_key, aug_key, loss_key, dropout_key = jax.random.split(key, 4)
    image = batch["image"]
    keep_text, keep_exemplars = loss_lib.condition_dropout(drop_key, image.shape[0], cfg)
    text_mask = batch["text_mask"] & keep_text[:, None]
    text_emb = embed(text_params, batch, "text", text_mask)
    extra = {}
    if sr is not None:
      extra.update(sr(image, key=aug_key))
    if suti is not None:
      extra.update(suti(text_params, batch, keep_exemplars))

    def predict(x_t, log_snr):
      return model.apply({"params": params}, x_t, log_snr, text_emb, text_mask, train=True,
                         rngs={"dropout": dropout_key}, **extra)

    per_example, aux = loss_lib.denoising_loss(predict, image, loss_key, schedule, cfg)
    return jnp.mean(per_example), {"train/mse": jnp.mean(aux["mse"])}

  return loss_fn


def _microbatches(batch: Batch, steps: int) -> Batch:
  """[B, ...] -> [steps, B/steps, ...], microbatch i = examples i, i+steps, ...

  Striding (not blocking) keeps every device's share of each microbatch equal,
  so the act_batch sharding of dim 1 needs no data movement.
  """

  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f"batch of {x.shape[0]} does not split into {steps} microbatches")
    x = jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(x, (None, axes.ACT_BATCH) + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


def make_grad_fn(loss_fn: LossFn, grad_accum_steps: int) -> GradFn:
  """value_and_grad of `loss_fn`, optionally averaged over microbatches.

  Accumulation is a `lax.scan` inside the step rather than optax.MultiSteps:
  one step stays one optimizer update on one global batch (so step counts,
  keys, schedules, checkpoints and data-iterator state keep their meaning),
  and the float32 gradient sum lives only inside the step instead of as a
  param-sized buffer in the checkpointed optimizer state.

  Args:
    loss_fn: from `make_loss_fn`.
    grad_accum_steps: microbatches per step (1 = no accumulation).

  Returns:
    grad_fn(params, text_params, batch, key) -> ((loss, aux), grads).
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps <= 1:
    return value_and_grad

  def grad_fn(params, text_params, batch, key):
    def body(carry, xs):
      index, micro = xs
      (loss, aux), grads = value_and_grad(params, text_params, micro, jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                         jax.eval_shape(value_and_grad, params, text_params,
                                        jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum_steps)),
                                        key))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps),
                                          _microbatches(batch, grad_accum_steps)))
    mean = jax.tree.map(lambda x: x / grad_accum_steps, total)
    (loss, aux), grads = mean
    return (loss, aux), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

  return grad_fn


def make_ema_fn(cfg: OptimizerConfig, trainable: Any) -> EmaFn:
  """EMA update with the configured decay rule; frozen leaves are not touched."""
  return lambda ema, params, step: optimizer_lib.update_ema(
      ema, params, optimizer_lib.ema_decay(cfg, step), trainable)


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def train_step(state: TrainState, batch: Batch, text_params: Any, *, grad_fn: GradFn,
               tx: optax.GradientTransformation, ema_fn: EmaFn, trainable: Any,
               lr_fn: optax.Schedule, seed: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on one global batch.

  A non-finite loss or gradient norm leaves the whole state (step included)
  unchanged; `train/finite` reports it and the host halts.

  Args:
    state: the train state (donated by the jitted caller).
    batch: a global batch (docs/architecture.md batch table).
    text_params: the frozen T5 params for in-step encoding (not donated), or
      None when the batch carries precomputed embeddings.
    grad_fn: from `make_grad_fn`.
    tx: from `optimizer.make_optimizer`.
    ema_fn: from `make_ema_fn`.
    trainable: bool tree like params (frozen leaves are kept bit-identical), or None.
    lr_fn: the learning-rate schedule (reported only).
    seed: base seed; the step key is fold_in(PRNGKey(seed), step).

  Returns:
    (new state, flat dict of float32 scalars named 'train/...').
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  (loss, aux), grads = grad_fn(state.params, text_params, batch, key)
  if trainable is not None:
    grads = jax.tree.map(lambda t, g: g if t else jnp.zeros_like(g), trainable, grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if trainable is not None:
    params = jax.tree.map(lambda t, new, old: new if t else old, trainable, params, state.params)
  ema_params = ema_fn(state.ema_params, params, state.step)
  new = (state.step + 1, params, ema_params, opt_state)
  step, params, ema_params, opt_state = _select(
      finite, new, (state.step, state.params, state.ema_params, state.opt_state))
  metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
             "train/param_norm": optax.global_norm(params),
             "train/lr": jnp.asarray(lr_fn(state.step), jnp.float32),
             "train/finite": finite.astype(jnp.float32), **aux}
  new_state = state.replace(step=step, params=params, ema_params=ema_params, opt_state=opt_state)
  return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)


def lower_train_step(step_fn: Callable[..., Any], abstract_state: TrainState,
                     abstract_batch: Batch, abstract_text: Any, mesh: Mesh,
                     rules: sharding_lib.Rules):
  """Jits the partial'd step with explicit shardings and lowers it.

  The mesh is set while tracing, so the model's `with_logical_constraint`
  calls become activation sharding constraints (without a mesh flax drops them).

  Args:
    step_fn: `functools.partial(train_step, grad_fn=..., ...)`.
    abstract_state: ShapeDtypeStructs carrying the state shardings.
    abstract_batch: ShapeDtypeStructs carrying the global batch shardings.
    abstract_text: ShapeDtypeStructs carrying the T5 param shardings, or None
      (precomputed embeddings).
    mesh: the mesh.
    rules: logical axis rules.

  Returns:
    The `jax.stages.Lowered` step(state, batch, text_params); only the state
    is donated (the frozen T5 params are read again every step).
  """
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  jitted = jax.jit(step_fn, in_shardings=(shardings(abstract_state), shardings(abstract_batch),
                                          shardings(abstract_text)),
                   out_shardings=(shardings(abstract_state), NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jitted.lower(abstract_state, abstract_batch, abstract_text)


def compile_train_step(step_fn: Callable[..., Any], abstract_state: TrainState,
                       abstract_batch: Batch, abstract_text: Any, mesh: Mesh,
                       rules: sharding_lib.Rules):
  """`lower_train_step(...)` compiled: (state, batch, text_params) -> (state, metrics)."""
  compiled = lower_train_step(step_fn, abstract_state, abstract_batch, abstract_text, mesh,
                              rules).compile()
  logging.info("compiled train step; memory per device: %s", compiled.memory_analysis())
  return compiled


def build_step_fn(model: unet_lib.UNet, embed: EmbedFn, diffusion: DiffusionConfig,
                  optimizer: OptimizerConfig, tx: optax.GradientTransformation, trainable: Any,
                  seed: int) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
  """`train_step` with every static dependency bound (ready for jit).

  Args:
    model: the stage's UNet.
    embed: `in_step_embeddings(encoder)` or `precomputed_embeddings`.
    diffusion: the stage's diffusion section.
    optimizer: EMA rule and grad_accum_steps.
    tx: the optimizer built from `optimizer` and `trainable`.
    trainable: bool tree like params, or None (all train).
    seed: run seed.

  Returns:
    step(state, batch, text_params) -> (state, metrics).
  """
  loss_fn = make_loss_fn(model, embed, diffusion)
  return functools.partial(
      train_step, grad_fn=make_grad_fn(loss_fn, optimizer.grad_accum_steps), tx=tx,
      ema_fn=make_ema_fn(optimizer, trainable), trainable=trainable,
      lr_fn=optimizer_lib.learning_rate_schedule(optimizer), seed=seed)
