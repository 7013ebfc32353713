"""HF `ViTModel` / `CLIPModel` checkpoints -> Flax params for `dino.DinoViT` and `clip.CLIP`.

Also the converted format (msgpack params + JSON config) and loading either format by path.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import pathlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from suti_jax.eval import clip
from suti_jax.eval import dino
from suti_jax.models import hf_checkpoint

Params = dict[str, Any]
# HF key -> array-like in the torch layout (`np.asarray` reads it), as `read_checkpoint` returns.
StateDict = collections.abc.Mapping[str, Any]
# (flax path below `params`, HF key, transform from the torch layout to the flax layout).
Mapping = list[tuple[tuple[str, ...], str, Callable[[np.ndarray], np.ndarray]]]

_same = lambda a: a
_dense = lambda a: a.T  # torch Linear [out, in] -> flax Dense [in, out].
_conv = lambda a: a.transpose(2, 3, 1, 0)  # torch [out, in, kh, kw] -> flax [kh, kw, in, out].
_flat_token = lambda a: a.reshape(a.shape[-1])  # ViT's cls_token [1, 1, D] -> [D].
_flat_pos = lambda a: a.reshape(a.shape[-2:])  # ViT's position_embeddings [1, N, D] -> [N, D].

# Checkpoint entries that carry no weights the embedders use: position-id buffers (older
# transformers saved them), CLIP's logit scale, and the ViT pooler (DINO embeds the CLS token).
_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "pooler.dense.weight", "pooler.dense.bias")


class ConversionError(ValueError):
  """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


def _norm(path: tuple[str, ...], prefix: str) -> Mapping:
  return [(path + ("scale",), f"{prefix}.weight", _same),
          (path + ("bias",), f"{prefix}.bias", _same)]


def _linear(path: tuple[str, ...], prefix: str, bias: bool = True) -> Mapping:
  out = [(path + ("kernel",), f"{prefix}.weight", _dense)]
  return out + [(path + ("bias",), f"{prefix}.bias", _same)] if bias else out


def _block(path: tuple[str, ...], hf: dict[str, str], qkv_bias: bool) -> Mapping:
  """One `vit.EncoderBlock`; `hf` names its parts in the checkpoint's layout."""
  out = _norm(path + ("ln1",), hf["ln1"]) + _norm(path + ("ln2",), hf["ln2"])
  for name in ("query", "key", "value"):
    out += _linear(path + ("attn", name), hf[name], qkv_bias)
  out += _linear(path + ("attn", "out"), hf["out"])
  return out + _linear(path + ("fc1",), hf["fc1"]) + _linear(path + ("fc2",), hf["fc2"])


def dino_mapping(config: dino.DinoConfig) -> Mapping:
  """Flax <- HF key table for a `ViTModel` checkpoint (as `save_pretrained` writes it).

  Args:
    config: the model config.

  Returns:
    (flax path, HF key, transform) triples covering every parameter.
  """
  patch = "embeddings.patch_embeddings.projection"
  out = [(("patch_embed", "conv", "kernel"), f"{patch}.weight", _conv),
         (("patch_embed", "conv", "bias"), f"{patch}.bias", _same),
         (("cls_token",), "embeddings.cls_token", _flat_token),
         (("pos_embedding",), "embeddings.position_embeddings", _flat_pos)]
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}"
    out += _block(("encoder", f"block_{i}"), {
        "ln1": f"{p}.layernorm_before", "ln2": f"{p}.layernorm_after",
        "query": f"{p}.attention.attention.query", "key": f"{p}.attention.attention.key",
        "value": f"{p}.attention.attention.value", "out": f"{p}.attention.output.dense",
        "fc1": f"{p}.intermediate.dense", "fc2": f"{p}.output.dense"}, config.qkv_bias)
  return out + _norm(("final_norm",), "layernorm")


def _clip_tower(encoder: str, hf_prefix: str, num_layers: int) -> Mapping:
  out = []
  for i in range(num_layers):
    p = f"{hf_prefix}.encoder.layers.{i}"
    out += _block((encoder, f"block_{i}"), {
        "ln1": f"{p}.layer_norm1", "ln2": f"{p}.layer_norm2", "query": f"{p}.self_attn.q_proj",
        "key": f"{p}.self_attn.k_proj", "value": f"{p}.self_attn.v_proj",
        "out": f"{p}.self_attn.out_proj", "fc1": f"{p}.mlp.fc1", "fc2": f"{p}.mlp.fc2"}, True)
  return out


def clip_mapping(config: clip.CLIPConfig) -> Mapping:
  """Flax <- HF key table for a `CLIPModel` checkpoint (as `save_pretrained` writes it).

  Args:
    config: the model config.

  Returns:
    (flax path, HF key, transform) triples covering every parameter.
  """
  v, t = "vision_model", "text_model"
  out = [(("patch_embed", "conv", "kernel"), f"{v}.embeddings.patch_embedding.weight", _conv),
         (("class_embedding",), f"{v}.embeddings.class_embedding", _same),
         (("vision_pos_embedding",), f"{v}.embeddings.position_embedding.weight", _same),
         (("token_embedding", "embedding"), f"{t}.embeddings.token_embedding.weight", _same),
         (("text_pos_embedding",), f"{t}.embeddings.position_embedding.weight", _same)]
  out += _norm(("pre_norm",), f"{v}.pre_layrnorm") + _norm(("post_norm",), f"{v}.post_layernorm")
  out += _norm(("final_norm",), f"{t}.final_layer_norm")
  out += _linear(("visual_projection",), "visual_projection", bias=False)
  out += _linear(("text_projection",), "text_projection", bias=False)
  out += _clip_tower("vision_encoder", v, config.vision.num_layers)
  return out + _clip_tower("text_encoder", t, config.text.num_layers)


def convert(state_dict: StateDict, mapping: Mapping,
            target: Params) -> Params:
  """Rearranges an HF state dict into a Flax param tree, checking every key and shape.

  Args:
    state_dict: e.g. from `hf_checkpoint.read_checkpoint`.
    mapping: from `dino_mapping` / `clip_mapping`.
    target: the model's param tree or its `jax.eval_shape` (gives the expected shapes).

  Returns:
    The param tree (float32 numpy arrays), with the same structure as `target`.

  Raises:
    ConversionError: naming the first missing, unexpected or mis-shaped key.
  """
  expected = flax.traverse_util.flatten_dict(target)
  mapped = {path for path, _, _ in mapping}
  if mapped != set(expected):
    raise ConversionError(f"key table and model disagree on {sorted(mapped ^ set(expected))}")
  used = {key for _, key, _ in mapping}
  for key in sorted(state_dict):
    if key not in used and not key.endswith(_IGNORED_SUFFIXES):
      raise ConversionError(f"unexpected checkpoint key {key!r} (not used by the model)")
  flat = {}
  for path, key, transform in mapping:
    if key not in state_dict:
      raise ConversionError(f"checkpoint lacks key {key!r} (for flax param {'/'.join(path)})")
    array = np.array(state_dict[key], np.float32)  # A copy: checkpoints are memory-mapped.
    want = tuple(expected[path].shape)
    try:
      value = transform(array)
    except ValueError as e:
      raise ConversionError(f"{key!r}: checkpoint shape {array.shape} does not fit the model "
                            f"param {'/'.join(path)} {want}") from e
    if value.shape != want:
      raise ConversionError(f"{key!r}: checkpoint shape {array.shape} gives {value.shape}, "
                            f"model param {'/'.join(path)} expects {want}")
    flat[path] = value
  return flax.traverse_util.unflatten_dict(flat)


def _strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
  """Drops a wrapper prefix (e.g. `vit.` from `ViTForImageClassification`) if every key has it."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def convert_dino_dir(directory: str | pathlib.Path) -> tuple[dino.DinoConfig, Params]:
  """Converts an HF ViT (DINO) checkpoint folder (config.json + weights).

  Args:
    directory: the folder `ViTModel.save_pretrained` wrote.

  Returns:
    (config, params) for `dino.DinoViT`.
  """
  directory = pathlib.Path(directory)
  config = dino.DinoConfig.from_hf(json.loads((directory / "config.json").read_text()))
  shape = (1, config.image_size, config.image_size, 3)
  target = jax.eval_shape(dino.DinoViT(config).init, jax.random.key(0), jnp.zeros(shape))["params"]
  state = _strip_prefix(hf_checkpoint.read_checkpoint(directory), "vit.")
  return config, convert(state, dino_mapping(config), target)


def convert_clip_dir(directory: str | pathlib.Path) -> tuple[clip.CLIPConfig, Params]:
  """Converts an HF CLIP checkpoint folder (config.json + weights).

  Args:
    directory: the folder `CLIPModel.save_pretrained` wrote.

  Returns:
    (config, params) for `clip.CLIP`.
  """
  directory = pathlib.Path(directory)
  config = clip.CLIPConfig.from_hf(json.loads((directory / "config.json").read_text()))
  size = config.vision.image_size
  target = jax.eval_shape(clip.CLIP(config).init, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                          jnp.zeros((1, config.text.max_length), jnp.int32))["params"]
  return config, convert(hf_checkpoint.read_checkpoint(directory), clip_mapping(config), target)


def save(path: str | pathlib.Path, model: str, config: Any, params: Params) -> None:
  """Writes params to `path` (msgpack) and `{model, config}` to `path` with suffix .json.

  Args:
    path: output file, e.g. `weights/dino.msgpack`.
    model: "dino" or "clip".
    config: a `DinoConfig` or `CLIPConfig`.
    params: the param tree.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
  meta = {"model": model, "config": dataclasses.asdict(config)}
  path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def _load_converted(path: pathlib.Path, model: str) -> tuple[Any, Params]:
  if not path.is_file():
    raise FileNotFoundError(f"{model} weights {path} not found")
  meta_path = path.with_suffix(".json")
  if not meta_path.is_file():
    raise FileNotFoundError(f"{meta_path} (the config written beside {path}) not found")
  meta = json.loads(meta_path.read_text())
  if meta["model"] != model:
    raise ConversionError(f"{path} holds {meta['model']!r} weights, expected {model!r}")
  config = (dino.DinoConfig(**meta["config"]) if model == "dino"
            else clip.CLIPConfig.from_json(meta["config"]))
  return config, flax.serialization.msgpack_restore(path.read_bytes())


def load_dino(path: str | pathlib.Path) -> tuple[dino.DinoConfig, Params]:
  """Loads DINO weights from an HF checkpoint folder or a converted msgpack file.

  Args:
    path: a folder (converted on the fly) or the msgpack file `save` wrote.

  Returns:
    (config, params).
  """
  path = pathlib.Path(path)
  return convert_dino_dir(path) if path.is_dir() else _load_converted(path, "dino")


def load_clip(path: str | pathlib.Path) -> tuple[clip.CLIPConfig, Params]:
  """Loads CLIP weights from an HF checkpoint folder or a converted msgpack file.

  Args:
    path: a folder (converted on the fly) or the msgpack file `save` wrote.

  Returns:
    (config, params).
  """
  path = pathlib.Path(path)
  return convert_clip_dir(path) if path.is_dir() else _load_converted(path, "clip")
