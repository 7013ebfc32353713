"""DreamBench metrics: DINO and CLIP-I (subject fidelity), CLIP-T (prompt fidelity),
and the embedders that compute them from converted or random weights.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from suti_jax.eval import clip
from suti_jax.eval import clip_tokenizer
from suti_jax.eval import convert
from suti_jax.eval import dino

DINO_ENV = "SUTI_DINO_WEIGHTS"
CLIP_ENV = "SUTI_CLIP_WEIGHTS"


class MissingWeightsError(RuntimeError):
  """DINO/CLIP weights were not given, so no real DINO/CLIP numbers can be computed."""


@dataclasses.dataclass(frozen=True)
class ImageEmbeddings:
  """DINO [N, D_dino] and CLIP image [N, D_clip] embeddings of the same N images."""

  dino: np.ndarray
  clip: np.ndarray


@dataclasses.dataclass(frozen=True)
class Scores:
  """One subject's scores (means over image pairs); `clip_t` is None for the real-images bound."""

  subject: str
  dino: float
  clip_i: float
  clip_t: float | None
  num_images: int


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise cosine similarities [A, B] of rows of a [A, D] and b [B, D] (float64)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


def identical_pairs(generated: Sequence[np.ndarray], real: np.ndarray) -> np.ndarray:
  """bool [G, M]: generated image g is pixel-identical to real photo m.

  Such pairs are a photo compared with itself: the real-images bound excludes them, and so does
  every method (a method returning the photos themselves then scores exactly the bound).
  """
  return np.array([[g.shape == r.shape and np.array_equal(g, r) for r in real] for g in generated],
                  bool).reshape(len(generated), len(real))


def subject_fidelity(generated_emb: np.ndarray, real_emb: np.ndarray, exclude: np.ndarray) -> float:
  """Mean cosine over all (generated, real) pairs not excluded (DINO / CLIP-I).

  Args:
    generated_emb: [G, D] embeddings of generated images.
    real_emb: [M, D] embeddings of the subject's photos.
    exclude: bool [G, M], pairs to leave out (self-pairs).

  Returns:
    The mean similarity.
  """
  keep = ~exclude
  if not keep.any():
    raise ValueError("no (generated, real) pair left to score")
  return float(cosine(generated_emb, real_emb)[keep].mean())


def text_fidelity(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
  """Mean cosine between each image [N, D] and its prompt [N, D] (CLIP-T)."""
  return float(np.mean(np.diagonal(cosine(image_emb, text_emb))))


def score(subject: str, generated: Sequence[np.ndarray], generated_emb: ImageEmbeddings,
          real: np.ndarray, real_emb: ImageEmbeddings,
          text_emb: np.ndarray | None = None) -> Scores:
  """All scores of one subject.

  Args:
    subject: the subject's name.
    generated: G uint8 images [H, W, 3] (for self-pair detection).
    generated_emb: their embeddings.
    real: the subject's photos, uint8 [M, H, W, 3].
    real_emb: their embeddings.
    text_emb: [G, D_clip] CLIP text embedding of each generated image's prompt; None skips CLIP-T.

  Returns:
    The subject's `Scores`.
  """
  exclude = identical_pairs(generated, real)
  clip_t = None if text_emb is None else text_fidelity(generated_emb.clip, text_emb)
  return Scores(subject, subject_fidelity(generated_emb.dino, real_emb.dino, exclude),
                subject_fidelity(generated_emb.clip, real_emb.clip, exclude), clip_t,
                len(generated))


def overall(scores: Sequence[Scores]) -> dict[str, float | None]:
  """Means over subjects (each subject weighs the same, whatever its image count).

  Args:
    scores: per-subject scores.

  Returns:
    {"dino", "clip_i", "clip_t"} means; clip_t is None when no subject has one.
  """
  clip_t = [s.clip_t for s in scores if s.clip_t is not None]
  return {"dino": float(np.mean([s.dino for s in scores])),
          "clip_i": float(np.mean([s.clip_i for s in scores])),
          "clip_t": float(np.mean(clip_t)) if clip_t else None}


def resolve_weights(flag_value: str | None, env_var: str) -> str | None:
  """The weights path from a flag, else from an environment variable, else None."""
  return flag_value or os.environ.get(env_var) or None


def _batched(fn, params: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies jitted `fn(params, x)` in fixed-size batches (one compile per input shape)."""
  outs = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
    outs.append(np.asarray(fn(params, padded))[:len(chunk)])
  return np.concatenate(outs)


def _random_params(rng: np.random.Generator, model: Any, *inputs: jax.Array) -> Any:
  """LeCun-normal kernels, N(0, 0.02) embeddings, unit LayerNorm scales, zero biases.

  Drawn with numpy on `eval_shape`'s tree: compiling a Flax init takes tens of seconds on a
  loaded CPU, while these tiny random models only need to be deterministic.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.02
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class Embedders:
  """DINO and CLIP embedders with their params, preprocessing and the CLIP tokenizer."""

  def __init__(self, dino_config: dino.DinoConfig, dino_params: Any, clip_config: clip.CLIPConfig,
               clip_params: Any, tokenizer: clip_tokenizer.CLIPTokenizer, batch_size: int = 16):
    """Builds the jitted embedders.

    Args:
      dino_config: DINO sizes.
      dino_params: DINO params (`convert.load_dino`).
      clip_config: CLIP sizes.
      clip_params: CLIP params (`convert.load_clip`).
      tokenizer: CLIP tokenizer whose max_length fits the text tower.
      batch_size: images/texts per device call.
    """
    if tokenizer.max_length > clip_config.text.max_length:
      raise ValueError(f"tokenizer length {tokenizer.max_length} exceeds CLIP's "
                       f"{clip_config.text.max_length} positions")
    self.dino_config, self.clip_config = dino_config, clip_config
    self.tokenizer, self.batch_size = tokenizer, batch_size
    dino_model, clip_model = dino.DinoViT(dino_config), clip.CLIP(clip_config)
    self._dino_params, self._clip_params = dino_params, clip_params
    self._dino = jax.jit(lambda p, x: dino_model.apply({"params": p}, x))
    self._clip_image = jax.jit(lambda p, x: clip_model.apply({"params": p}, x,
                                                             method="encode_image"))
    self._clip_text = jax.jit(lambda p, ids: clip_model.apply({"params": p}, ids,
                                                              method="encode_text"))

  @classmethod
  def load(cls, dino_path: str, clip_path: str, vocab_dir: str | None = None,
           batch_size: int = 16) -> Embedders:
    """Loads converted (msgpack) or HF-folder weights.

    Args:
      dino_path: DINO weights (see `convert.load_dino`).
      clip_path: CLIP weights (see `convert.load_clip`).
      vocab_dir: folder with CLIP's vocab.json + merges.txt; defaults to `clip_path` when that
        is an HF folder.
      batch_size: images/texts per device call.

    Returns:
      The embedders.
    """
    vocab_dir = vocab_dir or (clip_path if pathlib.Path(clip_path).is_dir() else None)
    if vocab_dir is None:
      raise MissingWeightsError("CLIP-T needs CLIP's vocab.json and merges.txt: pass "
                                "--clip_vocab_dir (or point --clip_weights at the HF folder)")
    dino_config, dino_params = convert.load_dino(dino_path)
    clip_config, clip_params = convert.load_clip(clip_path)
    tokenizer = clip_tokenizer.CLIPTokenizer.from_dir(vocab_dir, clip_config.text.max_length)
    return cls(dino_config, dino_params, clip_config, clip_params, tokenizer, batch_size)

  @classmethod
  def random(cls, seed: int = 0, batch_size: int = 16) -> Embedders:
    """Tiny randomly initialised models: tests and pipeline checks only, never real scores.

    Args:
      seed: init seed.
      batch_size: images/texts per device call.

    Returns:
      The embedders (byte-level CLIP tokenizer, 514-entry vocabulary).
    """
    tokenizer = clip_tokenizer.CLIPTokenizer.bytes_only()
    dino_config = dino.DinoConfig(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                                  patch_size=8, image_size=32)
    clip_config = clip.CLIPConfig(
        vision=clip.CLIPVisionConfig(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                                     patch_size=8, image_size=32),
        text=clip.CLIPTextConfig(vocab_size=len(tokenizer.vocab), hidden_size=64, num_layers=2,
                                 num_heads=4, mlp_dim=128, eos_token_id=tokenizer.eos_id),
        projection_dim=32)
    image, ids = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32)
    rng = np.random.default_rng(seed)
    dino_params = _random_params(rng, dino.DinoViT(dino_config), image)
    clip_params = _random_params(rng, clip.CLIP(clip_config), image, ids)
    return cls(dino_config, dino_params, clip_config, clip_params, tokenizer, batch_size)

  def embed_images(self, images: Sequence[np.ndarray]) -> ImageEmbeddings:
    """DINO and CLIP image embeddings of uint8 images [H, W, 3] (sizes may differ)."""
    return ImageEmbeddings(
        _batched(self._dino, self._dino_params, dino.preprocess(images, self.dino_config),
                 self.batch_size),
        _batched(self._clip_image, self._clip_params, clip.preprocess(images, self.clip_config),
                 self.batch_size))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """CLIP text embeddings [N, D_clip] of N prompts."""
    ids, _ = self.tokenizer(list(texts))
    return _batched(self._clip_text, self._clip_params, ids, self.batch_size)
