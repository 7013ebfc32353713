"""The demo's synthetic world: the training web and the held-out evaluation subjects.

Held-out subjects are checked to be disjoint from every subject the web or the
judges train on, and each gets exemplars plus prompts with exact ground truth.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from suti_jax.data import synthetic
from suti_jax.data.synthetic import subjects as subjects_lib
from suti_jax.experts import dreambooth

# Held-out subjects are drawn above every seed the web (< 1e6) uses, and are
# still checked against the web's subjects and the judges' seed block.
_HELDOUT_FIRST_SEED = 2_000_000


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  """One evaluation prompt for a held-out subject.

  Attributes:
    skill: the one skill the prompt exercises (one of `synthetic.SKILLS`).
    prompt: names the subject by its description ('a photo of the red and blue
      toy on a beach'); SuTI's prompt, and the text judge's.
    class_prompt: the same prompt naming only the class noun (text-only model).
    expert_prompt: the same prompt with the DreamBooth identifier ('sks toy').
    target: uint8 [H, W, 3], the exact ground truth.
  """

  skill: str
  prompt: str
  class_prompt: str
  expert_prompt: str
  target: np.ndarray


@dataclasses.dataclass(frozen=True)
class EvalSubject:
  """A held-out subject: its exemplars (3-5, with captions) and prompts."""

  subject_id: str
  class_noun: str
  description: str
  exemplar_images: np.ndarray
  exemplar_captions: tuple[str, ...]
  prompts: tuple[EvalPrompt, ...]


def make_web(num_clusters: int, seed: int, size_px: int) -> list[synthetic.WebPair]:
  """The training web (deterministic per seed); see `synthetic.generate_web_pairs`."""
  return synthetic.generate_web_pairs(num_clusters, seed, size_px)


def web_subject_ids(pairs: Iterable[synthetic.WebPair]) -> set[str]:
  """Every subject that appears in the web (banners show none)."""
  return {p.true_subject_id for p in pairs if p.true_subject_id}


def in_judge_block(seed: int, judge_seed: int) -> bool:
  """Whether `judges.train_judges(seed=judge_seed)` may render subject `seed`.

  The judges draw their training, calibration and held-out subjects from the
  block [judge_seed * 1e5, + 1e5); the whole block is kept out of evaluation.
  """
  return judge_seed * 10**5 <= seed < (judge_seed + 1) * 10**5


def description(subject: synthetic.Subject) -> str:
  """How a consolidated caption names the subject: 'red, blue and green toy'."""
  colours = list(subject.colours)
  head = ", ".join(colours[:-1]) + " and " + colours[-1] if len(colours) > 1 else colours[0]
  return f"{head} {subject.class_noun}"


def heldout_subject_seeds(num_subjects: int, excluded_ids: set[str],
                          judge_seed: int) -> list[int]:
  """Subject seeds that are not in `excluded_ids` nor in the judges' block.

  Args:
    num_subjects: how many.
    excluded_ids: subject ids seen in training (e.g. `web_subject_ids`).
    judge_seed: the judges' `train_judges(seed=...)`.

  Returns:
    `num_subjects` seeds.
  """
  seeds, seed = [], _HELDOUT_FIRST_SEED
  while len(seeds) < num_subjects:
    if (subjects_lib.subject_id_for(seed) not in excluded_ids
        and not in_judge_block(seed, judge_seed)):
      seeds.append(seed)
    seed += 1
  return seeds


def _prompt_variants(subject: synthetic.Subject, scene: synthetic.Scene,
                     seed: Sequence[int]) -> tuple[str, str]:
  """(description prompt, class-noun prompt) with the same template and synonyms.

  `write_prompt` draws the same random choices whatever the subject is called,
  so one seed gives two prompts that differ only in how they name the subject.
  """
  named = synthetic.write_prompt(None, scene, np.random.default_rng(seed),
                                 subject_ref=description(subject))
  plain = synthetic.write_prompt(subject, scene, np.random.default_rng(seed))
  return named, plain


def make_eval_subject(seed: int, *, image_size: int, min_exemplars: int, max_exemplars: int,
                      prompts_per_skill: int, identifier: str) -> EvalSubject:
  """One held-out subject with exemplars and prompts over all five skills.

  Exemplars are web-like: a plain shot first, then product shots
  (`synthetic.product_shot`) with web-style captions.

  Args:
    seed: the subject's seed.
    image_size: px of exemplars and targets.
    min_exemplars / max_exemplars: inclusive range of the exemplar count.
    prompts_per_skill: prompts per skill.
    identifier: DreamBooth's rare token for the expert prompts.

  Returns:
    The evaluation subject.
  """
  subject = synthetic.make_subject(seed)
  rng = np.random.default_rng([seed, 0xE7A1])
  scenes = [synthetic.Scene()]
  num_exemplars = int(rng.integers(min_exemplars, max_exemplars + 1))
  while len(scenes) < num_exemplars:
    scenes.append(synthetic.product_shot(rng, subject))
  exemplars = np.stack([synthetic.render(subject, s, image_size) for s in scenes])
  captions = tuple(synthetic.write_caption(subject, s, rng) for s in scenes)
  desc = description(subject)
  prompts = []
  for skill in synthetic.SKILLS:
    for i in range(prompts_per_skill):
      scene = synthetic.random_scene(skill, rng, subject)
      named, plain = _prompt_variants(subject, scene, [seed, synthetic.SKILLS.index(skill), i])
      expert = dreambooth.identifier_prompt(named, desc, subject.class_noun, identifier)
      prompts.append(EvalPrompt(skill, named, plain, expert,
                                synthetic.render(subject, scene, image_size)))
  return EvalSubject(subject.subject_id, subject.class_noun, desc, exemplars, captions,
                     tuple(prompts))


def make_eval_set(seeds: Sequence[int], **kwargs) -> list[EvalSubject]:
  """`make_eval_subject` for each seed; kwargs as there."""
  return [make_eval_subject(s, **kwargs) for s in seeds]
