"""Subject and text fidelity judges: small CNNs trained on the synthetic world.

They stand in for DINO/CLIP scores in the pipeline's fidelity filter and the demo's
evaluation, with the advantage that their accuracy can be measured exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from suti_jax.data import synthetic
from suti_jax.data.synthetic import scene as scene_lib
from suti_jax.data.synthetic import subjects as subjects_lib

# Supervised contrastive loss (Khosla et al. 2020) temperature for the subject
# embedding; a contrastive loss over many subjects transfers to unseen subjects
# better than a classifier over a few.
_TEMPERATURE = 0.1


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """Shape of a judge's CNN.

  Attributes:
    image_size: px; inputs of any size are resized to this.
    widths: channels of the conv stages (each halves the resolution).
    embed_dim: width of the subject embedding / the text judge's features.
  """

  image_size: int = 32
  widths: tuple[int, ...] = (16, 32, 64)
  embed_dim: int = 64


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
      x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    else:
      x = einops.rearrange(x, "b h w c -> b (h w c)")
    x = nn.gelu(nn.Dense(4 * self.config.embed_dim)(x))
    return nn.Dense(self.config.embed_dim)(x)


class _SubjectNet(nn.Module):
  """Position-invariant encoder -> unit-norm subject embedding."""

  config: JudgeConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    emb = ImageEncoder(self.config, pool=True)(images)
    return emb / (jnp.linalg.norm(emb, axis=-1, keepdims=True) + 1e-6)


class _AttributeNet(nn.Module):
  """Encoder + one softmax head per scene attribute."""

  config: JudgeConfig
  head_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    features = nn.gelu(ImageEncoder(self.config, pool=False)(images))
    return [nn.Dense(n)(features) for n in self.head_sizes]


def _to_model_input(images: np.ndarray | jax.Array, image_size: int) -> jax.Array:
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
    net = _SubjectNet(config)
    self._embed = jax.jit(
        lambda p, x: net.apply({"params": p}, _to_model_input(x, config.image_size)))

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
    return _pair_accuracy(self.embed(images), np.asarray(subject_ids), self.threshold)

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
    net = _AttributeNet(config, tuple(len(v) for v in self.attributes.values()))
    self._predict = jax.jit(lambda p, x: [
        jnp.argmax(logits, -1)
        for logits in net.apply({"params": p}, _to_model_input(x, config.image_size))])

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


def _pair_accuracy(emb: np.ndarray, ids: np.ndarray, threshold: float) -> float:
  """Balanced same/different accuracy of thresholded cosines over all pairs."""
  cos = emb @ emb.T
  same = ids[:, None] == ids[None, :]
  upper = np.triu(np.ones_like(same), k=1)
  pred = cos >= threshold
  acc_same = pred[same & upper].mean()
  acc_diff = (~pred)[~same & upper].mean()
  return float((acc_same + acc_diff) / 2)


def _best_threshold(emb: np.ndarray, ids: np.ndarray) -> float:
  """The cosine threshold that maximises balanced pair accuracy on (emb, ids)."""
  candidates = np.linspace(-0.5, 1.0, 151)
  accs = [_pair_accuracy(emb, ids, t) for t in candidates]
  return float(candidates[int(np.argmax(accs))])


# The text judge's heads: one per scene field a prompt can set, plus the colour
# of every part role (attribute modification asks for "a blue head").
_SCENE_FIELDS = {"background": scene_lib.BACKGROUNDS, "position": scene_lib.POSITIONS,
                 "scale": scene_lib.SCALES, "style": scene_lib.STYLES,
                 "view": scene_lib.VIEWS, "accessory": scene_lib.ACCESSORIES}
_ABSENT = "absent"
_PART_VALUES = tuple(subjects_lib.COLOURS) + (_ABSENT,)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    **_SCENE_FIELDS, **{f"colour_{role}": _PART_VALUES for role in subjects_lib.PART_ROLES}}
# Styles after which part colours can not (or, for 1 px outlines, barely) be read
# off the image: colour heads do not train on them.
_COLOURLESS_STYLES = ("grayscale", "sepia", "outline")
_DEFAULT_SCENE = synthetic.Scene()


def scene_attributes(scene: synthetic.Scene) -> dict[str, str]:
  """The attributes a scene specifies: its non-default fields, recolour as a colour.

  A plain scene specifies the plain studio shot, i.e. every field's default.

  Args:
    scene: a synthetic-world scene.

  Returns:
    Attribute name (a key of `ATTRIBUTES`) -> value.
  """
  wanted = {name: getattr(scene, name) for name in _SCENE_FIELDS
            if getattr(scene, name) != getattr(_DEFAULT_SCENE, name)}
  if scene.recolour is not None:
    role, colour = scene.recolour
    wanted[f"colour_{role}"] = colour
  return wanted or {name: getattr(scene, name) for name in _SCENE_FIELDS}


def prompt_attributes(prompt: str) -> dict[str, str]:
  """`scene_attributes` of the scene `prompt` asks for (synthetic prompt grammar)."""
  return scene_attributes(synthetic.parse_prompt(prompt))


def _labels(subject: synthetic.Subject, scene: synthetic.Scene) -> tuple[list[int], list[float]]:
  """Class index and loss weight of every attribute head for one render."""
  colours = {p.role: p.colour for p in subject.parts}
  if scene.recolour is not None:
    colours[scene.recolour[0]] = scene.recolour[1]
  values = [getattr(scene, name) for name in _SCENE_FIELDS]
  values += [colours.get(role, _ABSENT) for role in subjects_lib.PART_ROLES]
  colour_weight = 0.0 if scene.style in _COLOURLESS_STYLES else 1.0
  weights = [1.0] * len(_SCENE_FIELDS) + [colour_weight] * len(subjects_lib.PART_ROLES)
  return [ATTRIBUTES[name].index(v) for name, v in zip(ATTRIBUTES, values)], weights


def _random_scene(subject: synthetic.Subject, rng: np.random.Generator) -> synthetic.Scene:
  """A plain shot, one skill, or (30%) two skills combined, uniformly over skills."""
  options = ("plain",) + synthetic.SKILLS
  skill = options[int(rng.integers(len(options)))]
  if skill == "plain":
    return synthetic.Scene()
  scene = synthetic.random_scene(skill, rng, subject)
  if rng.random() < 0.3:
    other = [s for s in synthetic.SKILLS if s != skill]
    extra = synthetic.random_scene(other[int(rng.integers(len(other)))], rng, subject)
    changed = {f.name: getattr(extra, f.name) for f in dataclasses.fields(extra)
               if getattr(extra, f.name) != getattr(_DEFAULT_SCENE, f.name)}
    scene = dataclasses.replace(scene, **changed)
  return scene


@dataclasses.dataclass
class _RenderSet:
  """Renders with ground truth: images uint8 [N, H, W, 3], subject ids [N],
  attribute labels / weights [N, num_heads], prompts [N]."""

  images: np.ndarray
  subject_ids: np.ndarray
  labels: np.ndarray
  weights: np.ndarray
  prompts: list[str]


def _render_set(subject_seeds: Sequence[int], scenes_per_subject: int, image_size: int,
                rng: np.random.Generator) -> _RenderSet:
  images, ids, labels, weights, prompts = [], [], [], [], []
  for index, seed in enumerate(subject_seeds):
    subject = synthetic.make_subject(int(seed))
    for _ in range(scenes_per_subject):
      scene = _random_scene(subject, rng)
      images.append(synthetic.render(subject, scene, image_size))
      ids.append(index)
      label, weight = _labels(subject, scene)
      labels.append(label)
      weights.append(weight)
      prompts.append(synthetic.write_prompt(subject, scene, rng))
  return _RenderSet(np.stack(images), np.asarray(ids, np.int32),
                    np.asarray(labels, np.int32), np.asarray(weights, np.float32), prompts)


def _losses(params: dict[str, Any], images: jax.Array, subject_ids: jax.Array,
            labels: jax.Array, weights: jax.Array, subject_net: _SubjectNet,
            attribute_net: _AttributeNet) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised contrastive loss of the subject net + weighted CE of every head."""
  emb = subject_net.apply({"params": params["subject"]}, images)
  n = emb.shape[0]
  not_self = ~jnp.eye(n, dtype=bool)
  logits = jnp.where(not_self, emb @ emb.T / _TEMPERATURE, -jnp.inf)
  positive = (subject_ids[:, None] == subject_ids[None, :]) & not_self
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  subject_loss = -jnp.mean(jnp.sum(jnp.where(positive, log_prob, 0.0), -1)
                           / jnp.maximum(positive.sum(-1), 1))
  heads = attribute_net.apply({"params": params["text"]}, images)
  ce = jnp.stack([optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, i])
                  for i, logits in enumerate(heads)], axis=1)
  text_loss = jnp.sum(ce * weights) / jnp.sum(weights) * len(heads)
  return subject_loss + text_loss, {"subject_loss": subject_loss, "text_loss": text_loss}


def train_judges(image_size: int = 32, num_subjects: int = 200, steps: int = 500,
                 seed: int = 0, *, scenes_per_subject: int = 6,
                 num_heldout_subjects: int = 24, batch_size: int = 64,
                 learning_rate: float = 2e-3
                 ) -> tuple[SubjectJudge, TextJudge, dict[str, float]]:
  """Trains both judges on renders of random subjects under random scenes.

  Subject seeds: training [seed * 10**5, + num_subjects), then as many calibration
  subjects (they set the same-subject threshold), then the held-out subjects of
  the report, which neither training nor calibration saw.

  Args:
    image_size: render and judge resolution, px.
    num_subjects: training subjects.
    steps: Adam steps (both judges train in the same jitted step).
    seed: seeds the subjects, scenes and init.
    scenes_per_subject: training renders per subject (>= 2).
    num_heldout_subjects: evaluation subjects, 8 renders each; also the number of
      calibration subjects.
    batch_size: images per step: batch_size / 2 subjects, two renders each.
    learning_rate: Adam step size (cosine-decayed to 0).

  Returns:
    (subject judge, text judge, report) with report keys
    'subject_pair_accuracy' (balanced same/different accuracy on held-out pairs),
    'subject_threshold', 'text_attribute_accuracy' (fraction of held-out prompts'
    attributes predicted right), 'text_score_matched' / 'text_score_mismatched'
    (mean text score with the image's own / another image's prompt), per-head
    'head_accuracy/<name>', 'render_s' and 'train_s'.
  """
  start = time.time()
  rng = np.random.default_rng([seed, 0x7D6E])
  first = seed * 10**5
  train = _render_set(range(first, first + num_subjects), scenes_per_subject, image_size, rng)
  first += num_subjects
  calibration = _render_set(range(first, first + num_heldout_subjects), 8, image_size, rng)
  first += num_heldout_subjects
  heldout = _render_set(range(first, first + num_heldout_subjects), 8, image_size, rng)
  render_s = time.time() - start

  config = JudgeConfig(image_size=image_size)
  subject_net = _SubjectNet(config)
  attribute_net = _AttributeNet(config, tuple(len(v) for v in ATTRIBUTES.values()))
  dummy = jnp.zeros((1, image_size, image_size, 3))
  subject_key, text_key = jax.random.split(jax.random.PRNGKey(seed))
  params = {"subject": subject_net.init(subject_key, dummy)["params"],
            "text": attribute_net.init(text_key, dummy)["params"]}
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)
  loss_fn = functools.partial(_losses, subject_net=subject_net, attribute_net=attribute_net)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(params, opt_state, images, subject_ids, labels, weights):
    x = _to_model_input(images, image_size)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, x, subject_ids, labels, weights)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  m = scenes_per_subject
  for _ in range(steps):
    # Two different renders of each of batch_size / 2 subjects: every anchor has
    # a positive, and every other subject in the batch is a negative.
    subjects = rng.choice(num_subjects, batch_size // 2, replace=False)
    first_scene = rng.integers(0, m, len(subjects))
    second_scene = (first_scene + rng.integers(1, m, len(subjects))) % m
    idx = np.concatenate([subjects * m + first_scene, subjects * m + second_scene])
    params, opt_state, _ = step_fn(params, opt_state, train.images[idx],
                                   train.subject_ids[idx], train.labels[idx],
                                   train.weights[idx])
  jax.block_until_ready(params)
  train_s = time.time() - start - render_s

  params = jax.device_get(params)
  probe = SubjectJudge(config, params["subject"], threshold=0.0)
  threshold = _best_threshold(probe.embed(calibration.images), calibration.subject_ids)
  subject_judge = SubjectJudge(config, params["subject"], threshold)
  text_judge = TextJudge(config, {k: list(v) for k, v in ATTRIBUTES.items()},
                         params["text"])
  return subject_judge, text_judge, _report(subject_judge, text_judge, heldout, rng,
                                            render_s=render_s, train_s=train_s)


def _report(subject_judge: SubjectJudge, text_judge: TextJudge, heldout: _RenderSet,
            rng: np.random.Generator, **timings: float) -> dict[str, float]:
  """Held-out accuracies of both judges (see `train_judges`)."""
  predicted = text_judge.predict(heldout.images)
  hits = total = 0
  for pred, prompt in zip(predicted, heldout.prompts):
    wanted = prompt_attributes(prompt)
    hits += sum(pred[name] == value for name, value in wanted.items())
    total += len(wanted)
  shuffled = [heldout.prompts[i] for i in rng.permutation(len(heldout.prompts))]
  report = dict(
      subject_pair_accuracy=subject_judge.same_subject_accuracy(heldout.images,
                                                                heldout.subject_ids),
      subject_threshold=subject_judge.threshold,
      text_attribute_accuracy=hits / total,
      text_score_matched=float(text_judge.score_batch(heldout.images, heldout.prompts).mean()),
      text_score_mismatched=float(text_judge.score_batch(heldout.images, shuffled).mean()),
      **timings)
  for i, name in enumerate(ATTRIBUTES):
    seen = heldout.weights[:, i] > 0
    correct = [ATTRIBUTES[name].index(p[name]) == label
               for p, label, s in zip(predicted, heldout.labels[:, i], seen) if s]
    report[f"head_accuracy/{name}"] = float(np.mean(correct))
  return report
