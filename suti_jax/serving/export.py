"""Exports a cascade's text-to-image and personalisation samplers as one TF
SavedModel (jax2tf, polymorphic batch, steps fixed at export, noise from a seed
input), checks checkpoint/config agreement, and writes the JSON model card.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from suti_jax import config as config_lib
from suti_jax.inference import sampler
from suti_jax.inference import stage as stage_lib
from suti_jax.inference.pipeline import Pipeline
from suti_jax.inference.stage import MODEL_SECTIONS, StageModel, StageSpec
from suti_jax.models.text import tokenizers
from suti_jax.serving import serving_checkpoint
from suti_jax.train import checkpoint as checkpoint_lib
from suti_jax.train.experiment import Sections

MODEL_CARD = "model_card.json"


class ConfigMismatchError(ValueError):
  """A checkpoint was trained with a config that differs from the one given."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_config(checkpoint_config: Mapping[str, Any], stage: str, spec: StageSpec,
                 source: str = "checkpoint") -> None:
  """Raises ConfigMismatchError if the stage or a model-defining section differs.

  Sampling, optimizer, data, mesh and train sections may differ: they do not
  change what the params compute.

  Args:
    checkpoint_config: the config JSON stored with the checkpoint.
    stage: the stage name given for export.
    spec: the typed sections given for export.
    source: names the checkpoint in the message.
  """
  theirs_stage, theirs_spec, _ = stage_lib.stage_config(checkpoint_config)
  typed = lambda name, sp: {"stage": name, **{  # noqa: E731
      k: config_lib.to_dict(getattr(sp, k)) for k in MODEL_SECTIONS}}
  a, b = _flatten(typed(theirs_stage, theirs_spec)), _flatten(typed(stage, spec))
  diffs = [f"  {k}: checkpoint {a.get(k, '<missing>')!r} != config {b.get(k, '<missing>')!r}"
           for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if diffs:
    raise ConfigMismatchError(
        f"{source} was trained with a different config ({len(diffs)} field(s) differ):\n"
        + "\n".join(diffs))


def byte_tokenize_tf(texts: tf.Tensor, max_length: int) -> tuple[tf.Tensor, tf.Tensor]:
  """In-graph twin of `tokenizers.ByteTokenizer.encode` (bytes + 3, eos, pad 0).

  Args:
    texts: string [N].
    max_length: L.

  Returns:
    (ids int32 [N, L], mask bool [N, L]).
  """
  tok = tokenizers.ByteTokenizer
  raw = tf.io.decode_raw(texts, tf.uint8, fixed_length=max_length)
  kept = tf.minimum(tf.strings.length(texts), max_length - 1)[:, None]
  pos = tf.range(max_length)[None, :]
  ids = tf.where(pos < kept, tf.cast(raw, tf.int32) + tok.offset,
                 tf.where(pos == kept, tok.eos_id, tokenizers.PAD_ID))
  return ids, pos <= kept


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Shapes the exported signatures fix."""

  num_stages: int
  text_len: int
  image_size: int
  max_exemplars: int | None


def _scales(vectors: Sequence[jax.Array], n: int) -> tuple[sampler.Scales, ...]:
  g, t, e = vectors
  return tuple(sampler.Scales(g[i], t[i], e[i]) for i in range(n))


def export_saved_model(stages: Sequence[StageModel], output_dir: str, *,
                       num_steps: int | Sequence[int] | None = None,
                       guidance: str | None = None,
                       platforms: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the cascade's samplers as a TF SavedModel.

  Signatures (batch b of prompts is polymorphic; S = last stage size; K =
  K_max; n = number of stages; every scale input is float32 [n]):
    text_to_image_ids(text_ids int32 [b,L], text_mask bool [b,L], seed int32 [],
      guidance_scale) -> {'images': uint8 [b,S,S,3]}
    personalize_ids(exemplar_images uint8 [K,S,S,3], exemplar_mask bool [K],
      exemplar_text_ids int32 [K,L], exemplar_text_mask bool [K,L], text_ids,
      text_mask, seed, guidance_scale, text_guidance_scale,
      exemplar_guidance_scale) -> {'images'} (SuTI cascades)
    text_to_image / personalize: the same with string `prompt` [b] and
      `exemplar_captions` [K] tokenized in-graph (byte tokenizer only).
  The tf.functions on the loaded object also accept calls without the scale
  inputs, which then take the exported config's values.

  Args:
    stages: the cascade (as for `Pipeline`).
    output_dir: SavedModel directory.
    num_steps: sampling steps fixed into the export; all or per stage.
    guidance: personalisation guidance mode; default each stage's config.
    platforms: lowering platforms, e.g. ('cpu', 'tpu'); default the current one.

  Returns:
    A summary for the model card (signatures, steps, default scales).
  """
  pipeline = Pipeline(stages)
  specs = pipeline.specs(num_steps)
  n = len(stages)
  layout = _Layout(n, specs[0].text.max_length, pipeline.image_size, pipeline.max_exemplars)
  defaults = [sampler.default_scales(s) for s in specs]
  default_vectors = [np.array([getattr(d, f) for d in defaults], np.float32)
                     for f in ("guidance", "text", "exemplar")]
  leaves, treedef = jax.tree.flatten(
      (tuple(s.params for s in stages), tuple(s.text_params for s in stages)))
  module = tf.Module()
  module.weights = [tf.Variable(np.asarray(jax.device_get(x)), trainable=False) for x in leaves]
  convert = lambda fn, poly: jax2tf.convert(  # noqa: E731
      fn, polymorphic_shapes=poly, with_gradient=False,
      native_serialization_platforms=tuple(platforms) if platforms else None)

  def t2i_jax(weights, text_ids, text_mask, seed, g):
    params, text_params = jax.tree.unflatten(treedef, weights)
    return sampler.generate(specs, params, text_params, text_ids, text_mask,
                            jax.random.PRNGKey(seed), _scales([g] + default_vectors[1:], n))

  t2i_tf = convert(t2i_jax, [None, "(b, _)", "(b, _)", None, None])
  ids_spec = lambda name, k=None: tf.TensorSpec([k, layout.text_len], tf.int32, name)  # noqa: E731
  mask_spec = lambda name, k=None: tf.TensorSpec([k, layout.text_len], tf.bool, name)  # noqa: E731
  seed_spec = tf.TensorSpec([], tf.int32, "seed")
  scale_spec = lambda name: tf.TensorSpec([n], tf.float32, name)  # noqa: E731

  # autograph=False: the converted JAX code is plain Python; AutoGraph would only
  # slow the trace down trying to rewrite JAX internals.
  @tf.function(autograph=False, input_signature=[
      ids_spec("text_ids"), mask_spec("text_mask"), seed_spec, scale_spec("guidance_scale")])
  def text_to_image_ids(text_ids, text_mask, seed, guidance_scale):
    return {"images": t2i_tf(list(module.weights), text_ids, text_mask, seed, guidance_scale)}

  module.text_to_image_ids = text_to_image_ids
  signatures = {"text_to_image_ids": text_to_image_ids}
  byte = specs[0].text.tokenizer == "byte"
  if byte:
    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, "prompt"), seed_spec, scale_spec("guidance_scale")])
    def text_to_image(prompt, seed, guidance_scale):
      ids, mask = byte_tokenize_tf(prompt, layout.text_len)
      return text_to_image_ids(ids, mask, seed, guidance_scale)

    module.text_to_image = _with_default_scales(text_to_image, 2, default_vectors[:1])
    signatures["text_to_image"] = text_to_image
  if layout.max_exemplars is not None:
    k, size = layout.max_exemplars, layout.image_size

    def personalize_jax(weights, images, ex_mask, ex_ids, ex_text_mask, text_ids, text_mask,
                        seed, g, t, e):
      params, text_params = jax.tree.unflatten(treedef, weights)
      exemplars = sampler.Exemplars(images=sampler.from_uint8(images), text_ids=ex_ids,
                                    text_mask=ex_text_mask, mask=ex_mask)
      return sampler.generate(specs, params, text_params, text_ids, text_mask,
                              jax.random.PRNGKey(seed), _scales([g, t, e], n), exemplars,
                              guidance)

    personalize_tf = convert(personalize_jax, [None] * 5 + ["(b, _)", "(b, _)"] + [None] * 4)
    exemplar_specs = [tf.TensorSpec([k, size, size, 3], tf.uint8, "exemplar_images"),
                      tf.TensorSpec([k], tf.bool, "exemplar_mask")]
    scale_specs = [scale_spec(f"{p}guidance_scale") for p in ("", "text_", "exemplar_")]

    @tf.function(autograph=False, input_signature=exemplar_specs + [
        ids_spec("exemplar_text_ids", k), mask_spec("exemplar_text_mask", k),
        ids_spec("text_ids"), mask_spec("text_mask"), seed_spec] + scale_specs)
    def personalize_ids(exemplar_images, exemplar_mask, exemplar_text_ids, exemplar_text_mask,
                        text_ids, text_mask, seed, guidance_scale, text_guidance_scale,
                        exemplar_guidance_scale):
      return {"images": personalize_tf(
          list(module.weights), exemplar_images, exemplar_mask, exemplar_text_ids,
          exemplar_text_mask, text_ids, text_mask, seed, guidance_scale, text_guidance_scale,
          exemplar_guidance_scale)}

    module.personalize_ids = personalize_ids
    signatures["personalize_ids"] = personalize_ids
    if byte:
      @tf.function(autograph=False, input_signature=exemplar_specs + [
          tf.TensorSpec([k], tf.string, "exemplar_captions"),
          tf.TensorSpec([None], tf.string, "prompt"), seed_spec] + scale_specs)
      def personalize(exemplar_images, exemplar_mask, exemplar_captions, prompt, seed,
                      guidance_scale, text_guidance_scale, exemplar_guidance_scale):
        ex_ids, ex_mask = byte_tokenize_tf(exemplar_captions, layout.text_len)
        ids, mask = byte_tokenize_tf(prompt, layout.text_len)
        return personalize_ids(exemplar_images, exemplar_mask, ex_ids, ex_mask, ids, mask, seed,
                               guidance_scale, text_guidance_scale, exemplar_guidance_scale)

      module.personalize = _with_default_scales(personalize, 5, default_vectors)
      signatures["personalize"] = personalize
  tf.saved_model.save(module, output_dir, signatures=signatures)
  return {"signatures": sorted(signatures), "num_steps": [s.sampling.num_steps for s in specs],
          "guidance": [guidance or s.sampling.guidance for s in specs],
          "default_guidance_scale": default_vectors[0].tolist(),
          "default_text_guidance_scale": default_vectors[1].tolist(),
          "default_exemplar_guidance_scale": default_vectors[2].tolist(),
          "image_size": layout.image_size, "text_length": layout.text_len,
          "max_exemplars": layout.max_exemplars, "tokenizer": specs[0].text.tokenizer,
          "platforms": list(platforms) if platforms else [jax.default_backend()]}


def _with_default_scales(full: Any, num_inputs: int, defaults: Sequence[np.ndarray]) -> Any:
  """A tf.function taking `full`'s inputs with the trailing scales optional.

  Both call forms are traced, so the loaded object serves either; the scale-less
  one calls `full` with the export-time defaults.
  """
  specs = list(full.input_signature)

  @tf.function(autograph=False)
  def fn(*args):
    scales = args[num_inputs:] or [tf.constant(d) for d in defaults]
    return full(*args[:num_inputs], *scales)

  fn.get_concrete_function(*specs[:num_inputs])
  fn.get_concrete_function(*specs)
  return fn


def write_model_card(path: str, stages: Sequence[StageModel], *, export_summary: Mapping[str, Any],
                     serving_dtype: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes the JSON model card: configs, steps, sources, parameter counts, date.

  Args:
    path: output JSON file.
    stages: the exported cascade.
    export_summary: `export_saved_model`'s return value.
    serving_dtype: dtype of the serving checkpoint.
    extra: more top-level fields (e.g. the verification tolerance).

  Returns:
    The card.
  """
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
  card = {
      "export_date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "serving_dtype": serving_dtype,
      "stages": [{"stage": s.stage, "training_step": s.step, "source_checkpoint": s.source,
                  "unet_parameters": count(s.params), "text_encoder_parameters":
                  count(s.text_params), "config": dict(s.config)} for s in stages],
      "export": dict(export_summary), **dict(extra or {})}
  with open(path, "w") as f:
    json.dump(card, f, indent=2, default=str)
  return card


def export_cascade(checkpoints: Sequence[str], configs: Sequence[Sections], output_dir: str, *,
                   step: int | None = None, num_steps: int | Sequence[int] | None = None,
                   guidance: str | None = None, dtype: str = "bfloat16",
                   platforms: Sequence[str] | None = None) -> dict[str, Any]:
  """Trainer checkpoints -> `<output_dir>/{serving_checkpoint, saved_model,
  model_card.json}`; the SavedModel is made from the serving checkpoint's params.

  Args:
    checkpoints: workdirs or checkpoint dirs, base stage then SR stages.
    configs: the typed config of each stage (`experiment.sections(...)`); model,
      text and diffusion must match the checkpoint's, and its sampling section
      is what gets exported.
    output_dir: created if missing.
    step: checkpoint step (default each one's latest).
    num_steps: sampling steps fixed in the export (default the configs').
    guidance: personalisation guidance mode (default the configs').
    dtype: serving param dtype.
    platforms: SavedModel lowering platforms (default the current backend).

  Returns:
    The model card.
  """
  if len(checkpoints) != len(configs):
    raise ValueError(f"{len(checkpoints)} checkpoints but {len(configs)} configs")
  stages = []
  for path, sec in zip(checkpoints, configs):
    check_config(checkpoint_lib.read_config(path, step)[0], sec.stage,
                 stage_lib.spec_from_sections(sec), source=path)
    stages.append(stage_lib.load_stage(path, step=step).with_sampling(
        **config_lib.to_dict(sec.sampling)))
  os.makedirs(output_dir, exist_ok=True)
  ckpt_dir = os.path.join(output_dir, "serving_checkpoint")
  serving_checkpoint.save_serving_checkpoint(stages, ckpt_dir, dtype=dtype)
  served = serving_checkpoint.load_serving_checkpoint(ckpt_dir)
  summary = export_saved_model(served, os.path.join(output_dir, "saved_model"),
                               num_steps=num_steps, guidance=guidance, platforms=platforms)
  return write_model_card(os.path.join(output_dir, MODEL_CARD), stages, export_summary=summary,
                          serving_dtype=dtype)
