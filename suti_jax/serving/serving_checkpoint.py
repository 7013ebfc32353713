"""The slim serving checkpoint of a cascade: per-stage EMA UNet params and the
distinct frozen T5 params in one chosen dtype (Orbax), plus a JSON manifest of
the typed configs and axis rules; restores sharded by those rules onto any mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from suti_jax import config as config_lib
from suti_jax.inference.stage import StageModel, StageSpec, default_mesh
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import t5
from suti_jax.parallel import axes
from suti_jax.parallel import sharding as sharding_lib

MANIFEST = "manifest.json"
PARAMS = "params"
FORMAT_VERSION = 1


def _cast(tree: Any, dtype: str) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), tree)


def _same_tree(a: Any, b: Any) -> bool:
  if a is b:
    return True
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(x.shape == y.shape and bool(jnp.array_equal(x, y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _spec_to_dict(spec: StageSpec) -> dict[str, Any]:
  return {name: config_lib.to_dict(getattr(spec, name))
          for name in ("model", "text", "diffusion", "sampling")}


def _spec_from_dict(d: dict[str, Any]) -> StageSpec:
  s = config_lib.section
  return StageSpec(model=s(config_lib.UNetConfig, d["model"], "model"),
                   text=s(config_lib.TextEncoderConfig, d["text"], "text"),
                   diffusion=s(config_lib.DiffusionConfig, d["diffusion"], "diffusion"),
                   sampling=s(config_lib.SamplingConfig, d["sampling"], "sampling"))


def stage_rules(stage: StageModel) -> sharding_lib.Rules:
  """The axis rules the stage was trained with (its config's `axis_rules`).

  Random stages and configs without the key get `axes.DEFAULT_RULES`.
  """
  return sharding_lib.normalize_rules(stage.config.get("axis_rules") or axes.DEFAULT_RULES)


def _rules_json(rules: sharding_lib.Rules) -> list[list[Any]]:
  return [[name, list(t) if isinstance(t, tuple) else t] for name, t in rules]


def save_serving_checkpoint(stages: Sequence[StageModel], directory: str, *,
                            dtype: str = "bfloat16") -> dict[str, Any]:
  """Writes the stages' params in `dtype` and their configs.

  Stages whose text params are equal share one stored copy (a cascade trained
  with one frozen T5 stores it once). Each stage's axis rules (`stage_rules`)
  go into the manifest, so a restore shards as the stage was trained.

  Args:
    stages: the cascade (params are saved as given: pass EMA-loaded stages).
    directory: output directory (must not exist yet).
    dtype: storage dtype of every param, e.g. 'bfloat16' or 'float32'.

  Returns:
    The manifest written beside the params.
  """
  text_groups: list[Any] = []
  text_index = []
  for stage in stages:
    match = next((i for i, t in enumerate(text_groups) if _same_tree(t, stage.text_params)), None)
    if match is None:
      text_groups.append(stage.text_params)
      match = len(text_groups) - 1
    text_index.append(match)
  tree = {"unet": {f"stage_{i}": _cast(s.params, dtype) for i, s in enumerate(stages)},
          "text": {f"text_{i}": _cast(t, dtype) for i, t in enumerate(text_groups)}}
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS), tree)
  checkpointer.wait_until_finished()
  manifest = {
      "format_version": FORMAT_VERSION, "dtype": dtype,
      "stages": [dict(stage=s.stage, step=s.step, source=s.source, text_index=t,
                      axis_rules=_rules_json(stage_rules(s)), **_spec_to_dict(s.spec))
                 for s, t in zip(stages, text_index)]}
  if jax.process_index() == 0:
    with open(os.path.join(directory, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  return manifest


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory!r} is not a serving checkpoint (no {MANIFEST})")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"serving checkpoint format {manifest.get('format_version')} in "
                     f"{directory!r}; this code reads {FORMAT_VERSION}")
  return manifest


def _abstract(boxed: Any, dtype: str, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=s),
                      nn.unbox(boxed), shardings)


def load_serving_checkpoint(directory: str, *, mesh: Mesh | None = None,
                            rules: sharding_lib.Rules | None = None) -> list[StageModel]:
  """Restores the cascade, each param sharded by its logical axes on `mesh`.

  Args:
    directory: a `save_serving_checkpoint` directory.
    mesh: any (data, fsdp, tensor) mesh; default one device.
    rules: logical axis rules for every stage; default each stage's rules as
      stored in the manifest (`axes.DEFAULT_RULES` for a manifest without them).
      A shared T5 copy follows the rules of the first stage that uses it.

  Returns:
    StageModels (params in the stored dtype) in cascade order.
  """
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  mesh = mesh or default_mesh()
  dtype = manifest["dtype"]
  specs = [_spec_from_dict(s) for s in manifest["stages"]]
  stage_rules_ = [rules or sharding_lib.normalize_rules(s.get("axis_rules") or axes.DEFAULT_RULES)
                  for s in manifest["stages"]]
  key = jax.random.PRNGKey(0)
  target = {"unet": {}, "text": {}}
  for i, (entry, spec, rules_i) in enumerate(zip(manifest["stages"], specs, stage_rules_)):
    with nn.logical_axis_rules(rules_i):
      boxed = jax.eval_shape(
          lambda k, c=spec: unet_lib.init_params(c.model, k, c.text.max_length)["params"], key)
      target["unet"][f"stage_{i}"] = _abstract(boxed, dtype, mesh, rules_i)
      name = f"text_{entry['text_index']}"
      if name not in target["text"]:
        boxed = jax.eval_shape(lambda k, c=spec: t5.init_t5_params(c.text, k), key)
        target["text"][name] = _abstract(boxed, dtype, mesh, rules_i)
  restored = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS), target)
  return [StageModel(stage=entry["stage"], spec=spec,
                     params=restored["unet"][f"stage_{i}"],
                     text_params=restored["text"][f"text_{entry['text_index']}"],
                     step=entry["step"], source=entry["source"],
                     config={k: entry[k] for k in ("stage", "model", "text", "diffusion",
                                                   "sampling")})
          for i, (entry, spec) in enumerate(zip(manifest["stages"], specs))]
