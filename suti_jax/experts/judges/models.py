"""The judges: their CNNs, `SubjectJudge` / `TextJudge` (scoring, save/load) and the
scene attributes a prompt asks the text judge to check.

Trained by `training.train_judges`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from suti_jax.data import synthetic
from suti_jax.data.synthetic import scene as scene_lib
from suti_jax.data.synthetic import subjects as subjects_lib


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """Shape of a judge's CNN.

  Attributes:
    image_size: px; inputs of any size are resized to this.
    widths: channels of the conv stages (each halves the resolution).
    embed_dim: width of the subject embedding / the text judge's features.
    attention_pool: the pooled encoder (subject judge) also pools with learned
      per-location weights, which can single out the subject from a busy
      background that the mean and max pools mix in.
  """

  image_size: int = 32
  widths: tuple[int, ...] = (16, 32, 64)
  embed_dim: int = 64
  attention_pool: bool = False


class ImageEncoder(nn.Module):
  """Conv stages -> pooled or flattened features -> MLP.

  Attributes:
    config: the CNN's shape.
    pool: average+max pool over space (position-invariant: the subject judge) or
      flatten (keeps where things are: the text judge reads position and parts).
  """

  config: JudgeConfig
  pool: bool

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> [B, embed_dim]."""
    b, h, w, _ = images.shape
    # CoordConv (Liu et al. 2018) channels: part roles are defined by where a part
    # sits relative to the body, which plain convolutions localise poorly.
    ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
    coords = einops.repeat(jnp.stack([ys, xs], -1), "h w c -> b h w c", b=b)
    x = jnp.concatenate([images, coords], axis=-1)
    for width in self.config.widths:
      x = nn.gelu(nn.Conv(width, (3, 3))(x))
      x = nn.gelu(nn.GroupNorm(num_groups=8)(nn.Conv(width, (3, 3), strides=2)(x)))
    if self.pool:
      pooled = [x.mean(axis=(1, 2)), x.max(axis=(1, 2))]
      if self.config.attention_pool:
        weights = jax.nn.softmax(einops.rearrange(nn.Dense(1)(x), "b h w 1 -> b (h w)"), -1)
        pooled.append(jnp.einsum("bn,bnc->bc", weights,
                                 einops.rearrange(x, "b h w c -> b (h w) c")))
      x = jnp.concatenate(pooled, axis=-1)
    else:
      x = einops.rearrange(x, "b h w c -> b (h w c)")
    x = nn.gelu(nn.Dense(4 * self.config.embed_dim)(x))
    return nn.Dense(self.config.embed_dim)(x)


class SubjectNet(nn.Module):
  """Position-invariant encoder -> unit-norm subject embedding."""

  config: JudgeConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    emb = ImageEncoder(self.config, pool=True)(images)
    return emb / (jnp.linalg.norm(emb, axis=-1, keepdims=True) + 1e-6)


class AttributeNet(nn.Module):
  """Encoder + one softmax head per scene attribute."""

  config: JudgeConfig
  head_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    features = nn.gelu(ImageEncoder(self.config, pool=False)(images))
    return [nn.Dense(n)(features) for n in self.head_sizes]


def to_model_input(images: np.ndarray | jax.Array, image_size: int) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [-1, 1] at the judge's resolution."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "linear")
  return x


def _save(path: str, config: dict[str, Any], params: Any) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  with open(os.path.join(path, "params.msgpack"), "wb") as f:
    f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))


def _load(path: str) -> tuple[dict[str, Any], Any]:
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(path, "params.msgpack"), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  return config, params


class SubjectJudge:
  """Embeds images so that the same subject under any scene lands close.

  Attributes:
    config: the CNN's shape.
    threshold: cosine above which two images are called the same subject
      (calibrated on subjects kept out of training and evaluation).
  """

  def __init__(self, config: JudgeConfig, params: Any, threshold: float):
    self.config = config
    self.params = params
    self.threshold = threshold
    net = SubjectNet(config)
    self._embed = jax.jit(
        lambda p, x: net.apply({"params": p}, to_model_input(x, config.image_size)))

  def embed(self, images: np.ndarray) -> np.ndarray:
    """Unit-norm embeddings.

    Args:
      images: uint8 [N, H, W, 3].

    Returns:
      float32 [N, embed_dim].
    """
    return np.asarray(self._embed(self.params, np.asarray(images)))

  def score(self, image: np.ndarray, exemplar_images: np.ndarray) -> float:
    """Cosine of `image` [H, W, 3] to the mean embedding of exemplars [K, H, W, 3].

    Same-subject images score near 1, other subjects near or below `threshold`.
    """
    return float(self.score_batch(image[None], exemplar_images[None])[0])

  def score_batch(self, images: np.ndarray, exemplar_images: np.ndarray) -> np.ndarray:
    """Batched `score`.

    Args:
      images: uint8 [N, H, W, 3].
      exemplar_images: uint8 [N, K, H, W, 3] (per-image exemplars) or
        [K, H, W, 3] (one exemplar set for all).

    Returns:
      float32 [N] cosines.
    """
    emb = self.embed(images)
    if exemplar_images.ndim == 4:
      exemplar_images = np.broadcast_to(exemplar_images[None],
                                        (len(images),) + exemplar_images.shape)
    k = exemplar_images.shape[1]
    ex = self.embed(einops.rearrange(exemplar_images, "n k h w c -> (n k) h w c"))
    mean = einops.reduce(ex, "(n k) d -> n d", "mean", k=k)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True) + 1e-6
    return np.sum(emb * mean, axis=-1)

  def same_subject_accuracy(self, images: np.ndarray, subject_ids: np.ndarray) -> float:
    """Balanced accuracy of `cos >= threshold` over all image pairs.

    Args:
      images: uint8 [N, H, W, 3].
      subject_ids: int [N].

    Returns:
      Mean of the accuracy on same-subject pairs and on different-subject pairs.
    """
    return pair_accuracy(self.embed(images), np.asarray(subject_ids), self.threshold)

  def save(self, path: str) -> None:
    """Writes `config.json` and `params.msgpack` under directory `path`."""
    _save(path, dict(kind="subject", judge=dataclasses.asdict(self.config),
                     threshold=self.threshold),
          self.params)

  @classmethod
  def load(cls, path: str) -> SubjectJudge:
    """Reads a judge written by `save`."""
    config, params = _load(path)
    return cls(_judge_config(config["judge"]), params, config["threshold"])


class TextJudge:
  """Predicts the scene attributes a prompt can specify, from the image alone.

  Attributes:
    config: the CNN's shape.
    attributes: attribute name -> its possible values, in head order.
  """

  def __init__(self, config: JudgeConfig, attributes: dict[str, list[str]], params: Any):
    self.config = config
    self.attributes = {k: list(v) for k, v in attributes.items()}
    self.params = params
    net = AttributeNet(config, tuple(len(v) for v in self.attributes.values()))
    self._predict = jax.jit(lambda p, x: [
        jnp.argmax(logits, -1)
        for logits in net.apply({"params": p}, to_model_input(x, config.image_size))])

  def predict(self, images: np.ndarray) -> list[dict[str, str]]:
    """uint8 [N, H, W, 3] -> per image, attribute name -> predicted value."""
    indices = [np.asarray(i) for i in self._predict(self.params, np.asarray(images))]
    names = list(self.attributes)
    return [{name: self.attributes[name][int(idx[n])] for name, idx in zip(names, indices)}
            for n in range(len(images))]

  def score(self, image: np.ndarray, prompt: str) -> float:
    """Fraction of the prompt's attributes that `image` [H, W, 3] shows."""
    return float(self.score_batch(image[None], [prompt])[0])

  def score_batch(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Batched `score`: uint8 [N, H, W, 3] and N prompts -> float32 [N]."""
    scores = []
    for predicted, prompt in zip(self.predict(images), prompts):
      wanted = prompt_attributes(prompt)
      hits = [predicted[name] == value for name, value in wanted.items()]
      scores.append(np.mean(hits) if hits else 1.0)
    return np.asarray(scores, np.float32)

  def recaption(self, image: np.ndarray, prompt: str) -> str:
    """`prompt` without the modifiers `image` [H, W, 3] does not show.

    'a photo of the toy upside down on a beach' for a render that is upside down
    but not on a beach becomes 'a photo of the toy upside down', so the prompt
    says only what the image shows. A prompt without modifiers is kept.
    """
    scene = synthetic.parse_prompt(prompt)
    if scene == _DEFAULT_SCENE:
      return prompt
    predicted = self.predict(image[None])[0]
    unshown = {"recolour" if name.startswith("colour_") else name
               for name, value in scene_attributes(scene).items() if predicted[name] != value}
    return synthetic.drop_modifiers(prompt, unshown) if unshown else prompt

  def save(self, path: str) -> None:
    """Writes `config.json` and `params.msgpack` under directory `path`."""
    _save(path, dict(kind="text", judge=dataclasses.asdict(self.config),
                     attributes=self.attributes), self.params)

  @classmethod
  def load(cls, path: str) -> TextJudge:
    """Reads a judge written by `save`."""
    config, params = _load(path)
    return cls(_judge_config(config["judge"]), config["attributes"], params)


def _judge_config(values: dict[str, Any]) -> JudgeConfig:
  return JudgeConfig(**{**values, "widths": tuple(values["widths"])})


def pair_accuracy(emb: np.ndarray, ids: np.ndarray, threshold: float) -> float:
  """Balanced same/different accuracy of thresholded cosines over all pairs."""
  cos = emb @ emb.T
  same = ids[:, None] == ids[None, :]
  upper = np.triu(np.ones_like(same), k=1)
  pred = cos >= threshold
  acc_same = pred[same & upper].mean()
  acc_diff = (~pred)[~same & upper].mean()
  return float((acc_same + acc_diff) / 2)


# The text judge's heads: one per scene field a prompt can set, plus the colour
# of every part role (attribute modification asks for "a blue head").
SCENE_FIELDS = {"background": scene_lib.BACKGROUNDS, "position": scene_lib.POSITIONS,
                "scale": scene_lib.SCALES, "style": scene_lib.STYLES,
                "view": scene_lib.VIEWS, "accessory": scene_lib.ACCESSORIES}
# The colour head's value for a part role the subject does not have.
ABSENT = "absent"
_PART_VALUES = tuple(subjects_lib.COLOURS) + (ABSENT,)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    **SCENE_FIELDS, **{f"colour_{role}": _PART_VALUES for role in subjects_lib.PART_ROLES}}
_DEFAULT_SCENE = synthetic.Scene()


def scene_attributes(scene: synthetic.Scene) -> dict[str, str]:
  """The attributes a scene specifies: its non-default fields, recolour as a colour.

  A plain scene specifies the plain studio shot, i.e. every field's default.

  Args:
    scene: a synthetic-world scene.

  Returns:
    Attribute name (a key of `ATTRIBUTES`) -> value.
  """
  wanted = {name: getattr(scene, name) for name in SCENE_FIELDS
            if getattr(scene, name) != getattr(_DEFAULT_SCENE, name)}
  if scene.recolour is not None:
    role, colour = scene.recolour
    wanted[f"colour_{role}"] = colour
  return wanted or {name: getattr(scene, name) for name in SCENE_FIELDS}


def prompt_attributes(prompt: str) -> dict[str, str]:
  """`scene_attributes` of the scene `prompt` asks for (synthetic prompt grammar)."""
  return scene_attributes(synthetic.parse_prompt(prompt))
