"""Typed, frozen views of the config sections that library code receives.

`configs/*.py` return `ml_collections.ConfigDict`s, converted once per run by
`train.experiment.sections` (`section(cls, cfg.x)` rejects unknown keys and wrong
types, naming the field). Only launch/, the demo, `gin_bindings` and
`train.loop.run(config, workdir)` handle a ConfigDict; modules below take these
dataclasses, and checkpoints' saved configs are read back into them from JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

import jax

T = TypeVar("T")


class ConfigError(ValueError):
  """A config section has an unknown key or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class ExemplarConfig:
  """SuTI exemplar attention (Re-Imagen style retrieval attention).

  Attributes:
    max_exemplars: K_max, number of exemplar slots (padded slots are masked).
    attention_resolutions: feature-map sizes (px) where exemplar attention
      layers are added, in the down, middle and up blocks alike.
    include_caption_tokens: also attend to each exemplar's caption tokens.
    encoder_log_snr: noise level of the exemplar images fed to the shared
      downstack, as a log-SNR; the default (20.0) is practically clean.
    position_embedding: add a fixed 2D sinusoidal position embedding (no
      parameters) to the exemplar image tokens and to the generating queries,
      so attention can align locations; caption tokens get none.
    encoder_gradients: back-propagate the loss through the exemplar encoding
      into the shared downstack. False treats the encoded exemplars as
      constants of the step (the downstack still learns from generation, the
      exemplar attention from its tokens), which skips the backward pass of
      K downstack passes per example.
  """

  max_exemplars: int = 5
  attention_resolutions: tuple[int, ...] = (16, 8)
  include_caption_tokens: bool = True
  encoder_log_snr: float = 20.0
  position_embedding: bool = True
  encoder_gradients: bool = True


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """An Imagen UNet (base) or Efficient UNet (super-resolution).

  Attributes:
    image_size: output resolution in px.
    low_res_size: resolution of the conditioning low-res image; 0 = base model.
    base_channels: channels of the first level.
    channel_mults: per-level multiplier of `base_channels`.
    num_res_blocks: ResBlocks per level (one entry per level).
    attention_resolutions: resolutions (px) with self-attention blocks.
    cross_attention_resolutions: resolutions (px) with text attention; by
      default (empty) the same as `attention_resolutions`.
    text_attention: 'concat' (text tokens join the self-attention keys/values,
      Imagen base) or 'cross' (a separate cross-attention layer).
    attention_layout: where a level with attention attends: 'every_block'
      (after each of its ResBlocks, as ADM and diffusers) or 'level_end' (once,
      after its last ResBlock, as Imagen's Efficient U-Net blocks and
      imagen-pytorch). Self, text and exemplar attention follow it alike.
    num_heads: attention heads.
    efficient: Efficient UNet layout (skip connections scaled by 1/sqrt(2),
      downsample before / upsample after the convolutions).
    text_embed_dim: width of the text encoder output.
    dropout: dropout rate inside ResBlocks.
    dtype: compute dtype ('float32' or 'bfloat16').
    param_dtype: parameter dtype.
    exemplar: exemplar attention (SuTI); None for a plain Imagen UNet.
  """

  image_size: int = 64
  low_res_size: int = 0
  in_channels: int = 3
  out_channels: int = 3
  base_channels: int = 512
  channel_mults: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: tuple[int, ...] = (3, 3, 3, 3)
  attention_resolutions: tuple[int, ...] = (32, 16, 8)
  cross_attention_resolutions: tuple[int, ...] = ()
  text_attention: str = "concat"
  attention_layout: str = "every_block"
  num_heads: int = 8
  efficient: bool = False
  text_embed_dim: int = 4096
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  exemplar: ExemplarConfig | None = None


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """A T5 v1.1 encoder and its tokenizer.

  Attributes:
    tokenizer: 'byte' (embedded default, UTF-8 bytes + 3 special ids) or
      'sentencepiece' (needs `spm_path`).
    spm_path: SentencePiece model file for the 'sentencepiece' tokenizer.
    weights_path: converted encoder params; empty = random init (tests, demo).
    max_length: tokens per text (Imagen: 128).
  """

  tokenizer: str = "byte"
  spm_path: str = ""
  weights_path: str = ""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  max_length: int = 128
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Schedule, objective and training-time conditioning of one stage.

  Attributes:
    schedule: 'cosine', 'linear' (log-SNR linear in t) or 'linear_beta'
      (Imagen's continuous linear-beta) log-SNR schedule.
    prediction: 'eps', 'v' or 'x0' (what the UNet outputs).
    loss_weighting: 'none' or 'min_snr'.
    text_drop_prob / exemplar_drop_prob / both_drop_prob: condition dropout
      probabilities for classifier-free guidance (disjoint events).
    noise_aug_max: SR stages: training noise-aug time drawn in [0, max].
  """

  schedule: str = "cosine"
  prediction: str = "eps"
  loss_weighting: str = "none"
  min_snr_gamma: float = 5.0
  log_snr_min: float = -20.0
  log_snr_max: float = 20.0
  text_drop_prob: float = 0.1
  exemplar_drop_prob: float = 0.0
  both_drop_prob: float = 0.0
  noise_aug_max: float = 0.5


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How one stage samples.

  Attributes:
    sampler: 'ddim', 'ddpm' (ancestral) or 'dpm_solver_2m' (DPM-Solver++(2M),
      second order, eta = 0).
    guidance: 'cfg' (joint), 'compositional' (separate text and exemplar
      scales) or 'interleaved' (Re-Imagen: alternate the guided condition).
    threshold: 'dynamic', 'static' or 'none'.
    noise_aug_level: SR stages: the fixed noise-aug time at sampling.
  """

  sampler: str = "ddim"
  num_steps: int = 50
  eta: float = 0.0
  guidance: str = "cfg"
  guidance_scale: float = 1.35
  text_guidance_scale: float = 1.35
  exemplar_guidance_scale: float = 1.35
  threshold: str = "dynamic"
  threshold_percentile: float = 0.995
  noise_aug_level: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer, schedule, clipping, EMA and gradient accumulation.

  Attributes:
    name: 'adafactor', 'adam' or 'adamw'.
    schedule: 'constant' or 'cosine' after linear warmup.
    trainable: 'all' or 'exemplar_only' (SuTI: only the new layers train).
  """

  name: str = "adafactor"
  learning_rate: float = 1e-4
  warmup_steps: int = 10_000
  schedule: str = "constant"
  decay_steps: int = 0
  end_learning_rate: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float = 1.0
  ema_decay: float = 0.9999
  ema_warmup_steps: int = 0
  grad_accum_steps: int = 1
  trainable: str = "all"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes per axis (data, fsdp, tensor); -1 = fill.

  `ici_*` are sizes inside one slice; `dcn_*` across slices (multi-slice).
  """

  ici_data: int = -1
  ici_fsdp: int = 1
  ici_tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training input.

  Attributes:
    kind: 'synthetic' (made on the fly), 'caption_tfrecord' or 'icl_tfrecord'.
    pattern: glob of TFRecord files for the tfrecord kinds.
    corrupt_policy: 'fail' or 'skip' (skipped records are logged and counted
      in the scalar data/skipped_records).
    cache: read, decode and tokenise the source once and batch from host memory
      (`suti_jax.data.cached`): for data sets that fit in RAM, such as the demo's.
    precomputed_embeddings: read the T5 embeddings the records carry
      (`launch.embed_text`) instead of encoding text in the train step; the run
      then holds no T5 params (`text.weights_path` names the encoder used).
  """

  kind: str = "synthetic"
  pattern: str = ""
  shuffle_buffer: int = 1000
  corrupt_policy: str = "fail"
  cache: bool = False
  precomputed_embeddings: bool = False
  num_subjects: int = 64
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop.

  Attributes:
    restore_step: resume from this saved step instead of the latest (0), e.g.
      when the latest is damaged; the later steps are moved to
      `<workdir>/discarded_checkpoints/`.
  """

  batch_size: int = 2048
  total_steps: int = 2_500_000
  seed: int = 0
  log_every_steps: int = 100
  checkpoint_every_steps: int = 5000
  keep_checkpoints: int = 3
  sample_every_steps: int = 0
  peak_flops_per_device: float = 0.0
  restore_step: int = 0


# Every section is frozen and hashable: register them as static pytree nodes so
# they pass through `jax.jit` / `jax.eval_shape` as compile-time constants
# (e.g. `jax.eval_shape(init_t5_params, text_cfg, key)` needs no partial).
for _cls in (ExemplarConfig, UNetConfig, TextEncoderConfig, DiffusionConfig,
             SamplingConfig, OptimizerConfig, MeshConfig, DataConfig, TrainConfig):
  jax.tree_util.register_static(_cls)


def _check_type(value: Any, hint: Any, where: str) -> Any:
  """Returns `value` converted to `hint`, or raises ConfigError naming `where`."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    non_none = [a for a in args if a is not type(None)]
    return _check_type(value, non_none[0], where)
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{where}: expected a tuple, got {value!r}")
    return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
  if dataclasses.is_dataclass(hint):
    return section(hint, value, where)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool) and not isinstance(value, hint):
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
  if hint is int and isinstance(value, bool):
    raise ConfigError(f"{where}: expected int, got {value!r}")
  return value


def section(cls: type[T], values: Mapping[str, Any] | None, where: str = "") -> T:
  """Builds dataclass `cls` from a mapping, rejecting unknown keys and bad types.

  Args:
    cls: one of the config dataclasses above.
    values: a dict or ConfigDict; missing keys take the dataclass default.
    where: dotted path used in error messages, e.g. 'config.model'.

  Returns:
    A frozen `cls` instance.
  """
  where = where or cls.__name__
  if values is None:
    return cls()
  values = dict(values.items()) if hasattr(values, "items") else values
  hints = typing.get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    also = f"; also unknown: {unknown[1:]}" if len(unknown) > 1 else ""
    raise ConfigError(unknown_key_message(f"{where}.{unknown[0]}", known) + also)
  kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
  return cls(**kwargs)


def unknown_key_message(path: str, known: Iterable[str]) -> str:
  """One line for a config key path whose last part does not exist.

  Args:
    path: the dotted path as the user wrote it, e.g. 'train.bogus'.
    known: the keys that do exist where the last part was looked up.

  Returns:
    e.g. "train.totl_steps: no such config key (did you mean 'total_steps'?);
    keys of train: batch_size, ..., total_steps".
  """
  parent, _, key = path.rpartition(".")
  known = sorted(known)
  close = difflib.get_close_matches(key, known, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return (f"{path}: no such config key{hint}; keys of {parent or 'the config'}: "
          f"{', '.join(known)}")


def find_unknown_key(config: Any, path: str) -> str | None:
  """Checks that dotted `path` names a key of the nested `config`.

  Args:
    config: a ConfigDict or dict of dicts.
    path: e.g. 'train.total_steps'.

  Returns:
    None if every part exists, else `unknown_key_message` for the first part
    that does not (or a line saying which part holds no keys at all).
  """
  node, parts = config, path.split(".")
  for i, key in enumerate(parts):
    here = ".".join(parts[:i + 1])
    if not hasattr(node, "keys"):
      return f"{here}: {'.'.join(parts[:i])} is {node!r}, which has no keys"
    if key not in node:
      return unknown_key_message(here, node.keys())
    node = node[key]
  return None


def to_dict(obj: Any) -> dict[str, Any]:
  """A dataclass config as a JSON-friendly dict (inverse of `section`)."""
  return dataclasses.asdict(obj)
