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
  """A plain shot, one skill, or (30%) two skills combined, uniformly over skills."""
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
            labels: jax.Array, weights: jax.Array, subject_net: models.SubjectNet,
            attribute_net: models.AttributeNet) -> tuple[jax.Array, dict[str, jax.Array]]:
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


def _best_threshold(emb: np.ndarray, ids: np.ndarray) -> float:
  """The cosine threshold that maximises balanced pair accuracy on (emb, ids)."""
  candidates = np.linspace(-0.5, 1.0, 151)
  accs = [models.pair_accuracy(emb, ids, t) for t in candidates]
  return float(candidates[int(np.argmax(accs))])


def train_judges(image_size: int = 32, num_subjects: int = 200, steps: int = 500,
                 seed: int = 0, *, scenes_per_subject: int = 6,
                 num_heldout_subjects: int = 24, batch_size: int = 64,
                 learning_rate: float = 2e-3
                 ) -> tuple[models.SubjectJudge, models.TextJudge, dict[str, float]]:
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

  config = models.JudgeConfig(image_size=image_size)
  subject_net = models.SubjectNet(config)
  attribute_net = models.AttributeNet(config, tuple(len(v) for v in models.ATTRIBUTES.values()))
  dummy = jnp.zeros((1, image_size, image_size, 3))
  subject_key, text_key = jax.random.split(jax.random.PRNGKey(seed))
  params = {"subject": subject_net.init(subject_key, dummy)["params"],
            "text": attribute_net.init(text_key, dummy)["params"]}
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)
  loss_fn = functools.partial(_losses, subject_net=subject_net, attribute_net=attribute_net)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(params, opt_state, images, subject_ids, labels, weights):
    x = models.to_model_input(images, image_size)
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
  probe = models.SubjectJudge(config, params["subject"], threshold=0.0)
  threshold = _best_threshold(probe.embed(calibration.images), calibration.subject_ids)
  subject_judge = models.SubjectJudge(config, params["subject"], threshold)
  text_judge = models.TextJudge(config, {k: list(v) for k, v in models.ATTRIBUTES.items()},
                                params["text"])
  return subject_judge, text_judge, _report(subject_judge, text_judge, heldout, rng,
                                            render_s=render_s, train_s=train_s)


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
