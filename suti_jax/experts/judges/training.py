"""Training the judges: renders with ground-truth labels, the losses, the training loop
and the held-out report (`train_judges`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from suti_jax.data import synthetic
from suti_jax.data.synthetic import subjects as subjects_lib
from suti_jax.experts.judges import models

# Supervised contrastive loss (Khosla et al. 2020) temperature for the subject
# embedding; a contrastive loss over many subjects transfers to unseen subjects
# better than a classifier over a few.
_TEMPERATURE = 0.1
# Styles after which part colours can not (or, for 1 px outlines, barely) be read
# off the image: colour heads do not train on them.
_COLOURLESS_STYLES = ("grayscale", "sepia", "outline")


def _labels(subject: synthetic.Subject, scene: synthetic.Scene) -> tuple[list[int], list[float]]:
  """Class index and loss weight of every attribute head for one render."""
  colours = {p.role: p.colour for p in subject.parts}
  if scene.recolour is not None:
    colours[scene.recolour[0]] = scene.recolour[1]
  values = [getattr(scene, name) for name in models.SCENE_FIELDS]
  values += [colours.get(role, models.ABSENT) for role in subjects_lib.PART_ROLES]
  colour_weight = 0.0 if scene.style in _COLOURLESS_STYLES else 1.0
  weights = [1.0] * len(models.SCENE_FIELDS) + [colour_weight] * len(subjects_lib.PART_ROLES)
  return [models.ATTRIBUTES[name].index(v) for name, v in zip(models.ATTRIBUTES, values)], weights


def _random_scene(subject: synthetic.Subject, rng: np.random.Generator) -> synthetic.Scene:
  """A plain shot, one skill, or (30%) two skills combined, uniformly over skills:
  the distribution of the prompts the judges are evaluated on."""
  options = ("plain",) + synthetic.SKILLS
  skill = options[int(rng.integers(len(options)))]
  if skill == "plain":
    return synthetic.Scene()
  scene = synthetic.random_scene(skill, rng, subject)
  if rng.random() < 0.3:
    other = [s for s in synthetic.SKILLS if s != skill]
    extra = synthetic.random_scene(other[int(rng.integers(len(other)))], rng, subject)
    default = synthetic.Scene()
    changed = {f.name: getattr(extra, f.name) for f in dataclasses.fields(extra)
               if getattr(extra, f.name) != getattr(default, f.name)}
    scene = dataclasses.replace(scene, **changed)
  return scene


# Per field, how often a training scene from `_rich_scene` sets a non-default value.
_RICH_RATES = {"background": 0.6, "position": 0.4, "scale": 0.4, "style": 0.35,
               "view": 0.4, "accessory": 0.4, "recolour": 0.35}


def _rich_scene(subject: synthetic.Subject, rng: np.random.Generator) -> synthetic.Scene:
  """A training scene that sets every field independently (`_RICH_RATES`).

  Prompt-like scenes set one or two fields, so a rare value (a large subject, an
  outline, a badge) shows up in ~3% of them: too few for the heads to learn it,
  and too few backgrounds / scales for the subject judge to learn to ignore them.
  """
  def pick(options):
    return str(rng.choice(options[1:]))  # options[0] is the default.

  fields = {name: pick(values) for name, values in models.SCENE_FIELDS.items()
            if rng.random() < _RICH_RATES[name]}
  if rng.random() < _RICH_RATES["recolour"]:
    part = subject.parts[int(rng.integers(len(subject.parts)))]
    fields["recolour"] = (part.role, pick(
        [part.colour] + [c for c in subjects_lib.COLOURS if c != part.colour]))
  return synthetic.Scene(**fields)


@dataclasses.dataclass
class _RenderSet:
  """Renders with ground truth: images uint8 [N, H, W, 3], subject ids [N],
  attribute labels / weights [N, num_heads], prompts [N], and per subject (not
  per render) the class-noun index [num_subjects]. Each subject's renders are
  consecutive: first its prompt-like scenes, then its `_rich_scene`s."""

  images: np.ndarray
  subject_ids: np.ndarray
  labels: np.ndarray
  weights: np.ndarray
  prompts: list[str]
  noun_ids: np.ndarray


def _render_set(subject_seeds: Sequence[int], scenes_per_subject: int, image_size: int,
                rng: np.random.Generator, rich_scenes: int = 0, desc: str = "") -> _RenderSet:
  images, ids, labels, weights, prompts, nouns = [], [], [], [], [], []
  seeds = tqdm.tqdm(subject_seeds, desc=desc, unit="subject", leave=False, disable=not desc)
  for index, seed in enumerate(seeds):
    subject = synthetic.make_subject(int(seed))
    nouns.append(subjects_lib.CLASS_NOUNS.index(subject.class_noun))
    for i in range(scenes_per_subject):
      rich = i >= scenes_per_subject - rich_scenes
      scene = _rich_scene(subject, rng) if rich else _random_scene(subject, rng)
      images.append(synthetic.render(subject, scene, image_size))
      ids.append(index)
      label, weight = _labels(subject, scene)
      labels.append(label)
      weights.append(weight)
      prompts.append(synthetic.write_prompt(subject, scene, rng))
  return _RenderSet(np.stack(images), np.asarray(ids, np.int32),
                    np.asarray(labels, np.int32), np.asarray(weights, np.float32), prompts,
                    np.asarray(nouns, np.int32))


def _pick_subjects(rng: np.random.Generator, noun_ids: np.ndarray, count: int,
                   group: int) -> np.ndarray:
  """`count` distinct training subjects for one batch, in groups of `group` that
  share a class noun (hard negatives: same body shape, and head or not), so the
  subject judge must tell such subjects apart by parts, colours and textures.
  `group` <= 1 draws uniformly."""
  if group <= 1:
    return rng.choice(len(noun_ids), count, replace=False)
  chosen: list[int] = []
  for noun in rng.permutation(np.unique(noun_ids)):
    members = np.flatnonzero(noun_ids == noun)
    take = min(group, len(members), count - len(chosen))
    chosen.extend(int(i) for i in rng.choice(members, take, replace=False))
    if len(chosen) == count:
      break
  if len(chosen) < count:  # Few nouns: fill uniformly from the rest.
    rest = np.setdiff1d(np.arange(len(noun_ids)), chosen)
    chosen.extend(int(i) for i in rng.choice(rest, count - len(chosen), replace=False))
  return np.asarray(chosen)


def _augment_for_subject(x: jax.Array, key: jax.Array) -> jax.Array:
  """Scene changes the subject judge must ignore anyway, applied per image:
  one of the 8 flips / quarter turns (views), colour inversion and grayscale
  (styles), each exactly as the renderer would apply it to a centred subject."""
  k_view, k_invert, k_gray = jax.random.split(key, 3)
  n = x.shape[0]
  turns = [x, jnp.rot90(x, 1, (1, 2)), jnp.rot90(x, 2, (1, 2)), jnp.rot90(x, 3, (1, 2))]
  views = jnp.stack(turns + [t[:, :, ::-1] for t in turns])
  x = views[jax.random.randint(k_view, (n,), 0, 8), jnp.arange(n)]
  x = jnp.where(jax.random.bernoulli(k_invert, 0.15, (n, 1, 1, 1)), -x, x)
  gray = jnp.einsum("nhwc,c->nhw", x, jnp.asarray([0.299, 0.587, 0.114]))[..., None]
  return jnp.where(jax.random.bernoulli(k_gray, 0.15, (n, 1, 1, 1)),
                   jnp.broadcast_to(gray, x.shape), x)


def _supcon_loss(emb: jax.Array, subject_ids: jax.Array) -> jax.Array:
  """Supervised contrastive loss (Khosla et al. 2020, L_out) of unit embeddings."""
  n = emb.shape[0]
  not_self = ~jnp.eye(n, dtype=bool)
  logits = jnp.where(not_self, emb @ emb.T / _TEMPERATURE, -1e9)
  positive = (subject_ids[:, None] == subject_ids[None, :]) & not_self
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.sum(jnp.where(positive, log_prob, 0.0), -1)
                   / jnp.maximum(positive.sum(-1), 1))


def _losses(params: dict[str, Any], subject_images: jax.Array, text_images: jax.Array,
            subject_ids: jax.Array, labels: jax.Array, weights: jax.Array,
            subject_net: models.SubjectNet, attribute_net: models.AttributeNet
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised contrastive loss of the subject net + weighted CE of every head."""
  emb = subject_net.apply({"params": params["subject"]}, subject_images)
  subject_loss = _supcon_loss(emb, subject_ids)
  heads = attribute_net.apply({"params": params["text"]}, text_images)
  ce = jnp.stack([optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, i])
                  for i, logits in enumerate(heads)], axis=1)
  text_loss = jnp.sum(ce * weights) / jnp.sum(weights) * len(heads)
  return subject_loss + text_loss, {"subject_loss": subject_loss, "text_loss": text_loss}


def _best_threshold(emb: np.ndarray, ids: np.ndarray) -> float:
  """The cosine threshold that maximises balanced pair accuracy on (emb, ids)."""
  candidates = np.linspace(-0.5, 1.0, 151)
  accs = [models.pair_accuracy(emb, ids, t) for t in candidates]
  return float(candidates[int(np.argmax(accs))])


def train_judges(image_size: int = 16, num_subjects: int = 200, steps: int = 500,
                 seed: int = 0, *, scenes_per_subject: int = 6,
                 num_heldout_subjects: int = 24, batch_size: int = 64,
                 learning_rate: float = 3e-3, judge_config: models.JudgeConfig | None = None,
                 views_per_subject: int = 2, hard_negative_group: int = 4,
                 warmup_steps: int | None = None, augment: bool = True,
                 rich_scenes_per_subject: int | None = None,
                 ) -> tuple[models.SubjectJudge, models.TextJudge, dict[str, float]]:
  """Trains both judges on renders of random subjects under random scenes.

  Subject seeds: training [seed * 10**5, + num_subjects), then as many calibration
  subjects (they set the same-subject threshold), then the held-out subjects of
  the report, which neither training nor calibration saw.

  Args:
    image_size: render resolution, px: that of the images the judges will score.
    num_subjects: training subjects.
    steps: Adam steps (both judges train in the same jitted step).
    seed: seeds the subjects, scenes and init.
    scenes_per_subject: training renders per subject (prompt-like ones >=
      views_per_subject).
    num_heldout_subjects: evaluation subjects, 8 renders each; also the number of
      calibration subjects.
    batch_size: images per step: batch_size / views_per_subject subjects.
    learning_rate: Adam peak step size (linear warmup, then cosine-decayed to 0).
    judge_config: the CNNs' shape; default `default_config(image_size)`.
    views_per_subject: different renders of each batch subject (the positives).
    hard_negative_group: batch subjects come in groups this large that share a
      class noun; <= 1 draws them uniformly.
    warmup_steps: linear warmup; default steps // 20.
    augment: random flips / quarter turns / inversion / grayscale of the subject
      judge's inputs.
    rich_scenes_per_subject: training renders per subject whose scene sets every
      field at random (`_rich_scene`); only the text judge trains on them. The
      rest, like calibration and held-out renders, follow the prompts'
      distribution (`_random_scene`). Default: half of scenes_per_subject, as
      long as views_per_subject prompt-like ones remain.

  Returns:
    (subject judge, text judge, report) with report keys
    'subject_pair_accuracy' (balanced same/different accuracy on held-out pairs),
    'subject_threshold', 'text_attribute_accuracy' (fraction of held-out prompts'
    attributes predicted right), 'text_score_matched' / 'text_score_mismatched'
    (mean text score with the image's own / another image's prompt), per-head
    'head_accuracy/<name>', 'render_s' and 'train_s'.
  """
  rich = rich_scenes_per_subject
  if rich is None:
    rich = max(0, min(scenes_per_subject // 2, scenes_per_subject - views_per_subject))
  if scenes_per_subject - rich < views_per_subject or views_per_subject < 2:
    raise ValueError(f"need scenes_per_subject - rich_scenes_per_subject "
                     f"({scenes_per_subject} - {rich}) >= views_per_subject "
                     f"({views_per_subject}) >= 2")
  start = time.time()
  rng = np.random.default_rng([seed, 0x7D6E])
  first = seed * 10**5
  train = _render_set(range(first, first + num_subjects), scenes_per_subject, image_size, rng,
                      rich, desc="judges: render")
  first += num_subjects
  calibration = _render_set(range(first, first + num_heldout_subjects), 8, image_size, rng)
  first += num_heldout_subjects
  heldout = _render_set(range(first, first + num_heldout_subjects), 8, image_size, rng)
  render_s = time.time() - start

  config = judge_config or default_config(image_size)
  subject_net = models.SubjectNet(config)
  attribute_net = models.AttributeNet(config, tuple(len(v) for v in models.ATTRIBUTES.values()))
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3))
  subject_key, text_key, augment_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"subject": subject_net.init(subject_key, dummy)["params"],
            "text": attribute_net.init(text_key, dummy)["params"]}
  warmup = steps // 20 if warmup_steps is None else warmup_steps
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps))
  opt_state = tx.init(params)
  loss_fn = functools.partial(_losses, subject_net=subject_net, attribute_net=attribute_net)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(params, opt_state, subject_images, subject_ids, text_images, labels, weights,
              key):
    x_subject = models.to_model_input(subject_images, config.image_size)
    if augment:
      x_subject = _augment_for_subject(x_subject, key)
    x_text = models.to_model_input(text_images, config.image_size)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, x_subject, x_text, subject_ids,
                                                     labels, weights)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  m, v = scenes_per_subject, views_per_subject
  for step in tqdm.trange(steps, desc="judges: train", unit="step", leave=False):
    # The subject judge: `v` different prompt-like renders of each of
    # batch_size / v subjects, so every anchor has positives, and every other
    # subject in the batch (some sharing its class noun) is a negative.
    subjects = _pick_subjects(rng, train.noun_ids, batch_size // v, hard_negative_group)
    scenes = np.argsort(rng.random((len(subjects), m - rich)), axis=1)[:, :v]
    pairs = (subjects[:, None] * m + scenes).T.reshape(-1)
    # The text judge: any renders.
    idx = rng.choice(len(train.images), batch_size, replace=False)
    params, opt_state, _ = step_fn(params, opt_state, train.images[pairs],
                                   train.subject_ids[pairs], train.images[idx],
                                   train.labels[idx], train.weights[idx],
                                   jax.random.fold_in(augment_key, step))
  jax.block_until_ready(params)
  train_s = time.time() - start - render_s

  params = jax.device_get(params)
  probe = models.SubjectJudge(config, params["subject"], threshold=0.0)
  threshold = _best_threshold(probe.embed(calibration.images), calibration.subject_ids)
  subject_judge = models.SubjectJudge(config, params["subject"], threshold)
  text_judge = models.TextJudge(config, {k: list(v) for k, v in models.ATTRIBUTES.items()},
                                params["text"])
  return subject_judge, text_judge, _report(subject_judge, text_judge, heldout, rng,
                                            render_s=render_s, train_s=train_s)


def default_config(image_size: int) -> models.JudgeConfig:
  """The judges' CNN for renders of `image_size` px: run at twice that (at least
  32 px), which gives 16 px renders' 1-2 px parts room in the first convs, with
  attention pooling for the subject judge."""
  return models.JudgeConfig(image_size=max(32, 2 * image_size), attention_pool=True)


def _report(subject_judge: models.SubjectJudge, text_judge: models.TextJudge, heldout: _RenderSet,
            rng: np.random.Generator, **timings: float) -> dict[str, float]:
  """Held-out accuracies of both judges (see `train_judges`)."""
  predicted = text_judge.predict(heldout.images)
  hits = total = 0
  for pred, prompt in zip(predicted, heldout.prompts):
    wanted = models.prompt_attributes(prompt)
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
  for i, name in enumerate(models.ATTRIBUTES):
    seen = heldout.weights[:, i] > 0
    correct = [models.ATTRIBUTES[name].index(p[name]) == label
               for p, label, s in zip(predicted, heldout.labels[:, i], seen) if s]
    report[f"head_accuracy/{name}"] = float(np.mean(correct))
  return report
