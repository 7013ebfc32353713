"""The prompt grammar of the synthetic world: Scene <-> text, and random scenes per skill.

Every modifier has a few synonymous phrases; `write_prompt` picks one at random and
`parse_prompt` accepts them all, so `parse_prompt(write_prompt(s, scene, rng)) == scene`.
"""

from __future__ import annotations

import re

import numpy as np

from suti_jax.data.synthetic import scene as scene_lib
from suti_jax.data.synthetic import subjects as subjects_lib
from suti_jax.data.synthetic.scene import SKILLS, Scene

# Modifier -> value -> synonymous phrases (the first is canonical).
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "background": {
        "beach": ("on a beach", "on the beach"),
        "park": ("in a park", "on the grass"),
        "snow": ("in the snow", "on a snowy field"),
        "night": ("at night", "under the night sky"),
        "brick": ("in front of a brick wall", "against a brick wall"),
        "kitchen": ("in a kitchen", "on a kitchen floor"),
        "desert": ("in the desert", "among desert dunes"),
    },
    "position": {
        "left": ("on the left", "on the left side"),
        "right": ("on the right", "on the right side"),
        "top": ("at the top", "near the top edge"),
        "bottom": ("at the bottom", "near the bottom edge"),
    },
    "scale": {"small": ("small", "tiny"), "large": ("large", "big")},
    "style": {
        "outline": ("as an outline", "as a line drawing"),
        "pixelated": ("pixelated", "as pixel art"),
        "inverted": ("with inverted colours", "as a photo negative"),
        "sepia": ("in sepia", "as an old sepia photo"),
        "grayscale": ("in black and white", "in grayscale"),
    },
    "view": {
        "rotated": ("rotated", "turned sideways"),
        "upside_down": ("upside down", "turned upside down"),
        "mirrored": ("mirrored", "flipped left to right"),
    },
    "accessory": {
        "hat": ("wearing a hat", "with a top hat"),
        "frame": ("in a frame", "in a picture frame"),
        "badge": ("with a star badge", "wearing a star badge"),
    },
}
_TEMPLATES = ("a photo of {ref}{mods}", "{ref}{mods}", "a picture of {ref}{mods}",
              "a render of {ref}{mods}", "an image of {ref}{mods}")
_RECOLOUR_RE = re.compile(
    r"\bwith an? (%s) (%s)\b" % ("|".join(subjects_lib.COLOURS), "|".join(subjects_lib.PART_ROLES)))


def _phrase_re(phrase: str) -> re.Pattern:
  return re.compile(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])")


# Longest phrases first, so "turned upside down" wins over "upside down" and
# "with a top hat" is consumed before anything else could read "top".
_MATCHERS = sorted(
    ((_phrase_re(p), field, value) for field, table in PHRASES.items()
     for value, phrases in table.items() for p in phrases),
    key=lambda m: -len(m[0].pattern))


def parse_prompt(text: str) -> Scene:
  """Parses a prompt (or caption) of the grammar into a Scene.

  Unknown words are ignored; a modifier without a phrase keeps its default.

  Args:
    text: the prompt, any case.

  Returns:
    The Scene the prompt asks for.

  Raises:
    ValueError: two different values of one modifier (e.g. 'on the left ... on
      the right').
  """
  rest = " " + text.lower() + " "
  found: dict[str, object] = {}

  def put(field, value):
    if found.get(field, value) != value:
      raise ValueError(f"prompt {text!r} sets {field} twice: {found[field]!r}, {value!r}")
    found[field] = value

  match = _RECOLOUR_RE.search(rest)
  if match:
    put("recolour", (match.group(2), match.group(1)))
    rest = rest[:match.start()] + " | " + rest[match.end():]
  for pattern, field, value in _MATCHERS:
    if pattern.search(rest):
      put(field, value)
      # A consumed phrase can not also match a shorter phrase inside it.
      rest = pattern.sub(" | ", rest)
  return Scene(**found)


def _article(word: str) -> str:
  return "an" if word[:1] in "aeiou" else "a"


_INDEFINITE_RE = re.compile(r"\b(a|an) (\w+)")


def drop_modifiers(text: str, fields: set[str]) -> str:
  """Removes the phrases of `fields` from a prompt of the grammar, keeping the rest.

  E.g. dropping {'background'} from 'a photo of the small toy on a beach' gives
  'a photo of the small toy'. Phrases are consumed longest first, as `parse_prompt`
  reads them, so a kept 'with a top hat' is not mistaken for a dropped 'top'.

  Args:
    text: the prompt.
    fields: Scene field names ('background', ..., 'recolour') whose phrases go.

  Returns:
    The prompt without them; `parse_prompt` of it is the prompt's scene with
    those fields at their defaults.

  Raises:
    ValueError: an unknown field name.
  """
  unknown = set(fields) - set(PHRASES) - {"recolour"}
  if unknown:
    raise ValueError(f"drop_modifiers: unknown fields {sorted(unknown)}; known: "
                     f"{sorted(PHRASES) + ['recolour']}")
  # Kept phrases are masked by placeholders (so no shorter phrase matches inside
  # them) and put back once the dropped ones are gone.
  kept: list[str] = []

  def consume(match: re.Match, field: str) -> str:
    if field in fields:
      return ""
    kept.append(match.group(0))
    return f"\x00{len(kept) - 1}\x00"

  rest = _RECOLOUR_RE.sub(lambda m: consume(m, "recolour"), text)
  for pattern, field, _ in _MATCHERS:
    rest = pattern.sub(lambda m, field=field: consume(m, field), rest)
  rest = re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], rest)
  rest = " ".join(rest.split())
  return _INDEFINITE_RE.sub(lambda m: f"{_article(m.group(2))} {m.group(2)}", rest)


def _modifiers(scene: Scene, rng: np.random.Generator) -> list[str]:
  mods = []
  for field in ("view", "accessory", "background", "position", "style"):
    value = getattr(scene, field)
    if value in PHRASES[field]:
      mods.append(str(rng.choice(PHRASES[field][value])))
  if scene.recolour:
    role, colour = scene.recolour
    mods.insert(0, f"with {_article(colour)} {colour} {role}")
  return mods


def write_prompt(subject: subjects_lib.Subject | None, scene: Scene,
                 rng: np.random.Generator, subject_ref: str | None = None) -> str:
  """Writes a prompt for `scene` that `parse_prompt` reads back as `scene`.

  Args:
    subject: the subject; its class noun names it unless `subject_ref` is given
      (then it may be None, e.g. when only a description is known).
    scene: what the prompt asks for.
    rng: picks the template and the synonyms.
    subject_ref: how to name the subject without an article (e.g. a consolidated
      description 'red and blue toy'); must not contain grammar phrases.

  Returns:
    The prompt, e.g. 'a photo of the small toy upside down on a beach'.
  """
  if not subject_ref and subject is None:
    raise ValueError("write_prompt needs a subject or a subject_ref")
  noun = subject_ref or subject.class_noun
  size = PHRASES["scale"].get(scene.scale)
  head = f"{str(rng.choice(size))} {noun}" if size else noun
  det = str(rng.choice(["the", _article(head)]))
  mods = _modifiers(scene, rng)
  template = str(rng.choice(_TEMPLATES))
  return template.format(ref=f"{det} {head}", mods="".join(" " + m for m in mods))


def write_caption(subject: subjects_lib.Subject, scene: Scene,
                  rng: np.random.Generator) -> str:
  """A web-style caption: class noun, part colours and the scene's phrases.

  Args:
    subject: the subject shown.
    scene: how it is shown.
    rng: picks the synonyms.

  Returns:
    e.g. 'a red and blue toy on a beach'; `parse_prompt` reads back `scene`.
  """
  colours = list(subject.colours)
  desc = " and ".join([", ".join(colours[:-1]), colours[-1]] if len(colours) > 1 else colours)
  size = PHRASES["scale"].get(scene.scale)
  head = f"{str(rng.choice(size))} {desc}" if size else desc
  mods = _modifiers(scene, rng)
  return f"{_article(head)} {head} {subject.class_noun}" + "".join(" " + m for m in mods)


def random_scene(skill: str, rng: np.random.Generator,
                 subject: subjects_lib.Subject | None = None) -> Scene:
  """Draws a scene that exercises exactly one skill.

  Args:
    skill: one of `SKILLS`.
    rng: the random source.
    subject: with a subject, attribute modification picks one of its parts and a
      colour it does not have; without, it recolours the body (every subject has one).

  Returns:
    A non-plain Scene whose `skills` is `(skill,)`.
  """
  def pick(options):
    return str(rng.choice([o for o in options if o not in ("plain", "center", "medium", "none")]))

  if skill == "recontextualization":
    fields = {"background": pick(scene_lib.BACKGROUNDS)}
    if rng.random() < 0.5:
      fields["position"] = pick(scene_lib.POSITIONS)
    if rng.random() < 0.3:
      fields["scale"] = pick(scene_lib.SCALES)
    return Scene(**fields)
  if skill == "stylization":
    return Scene(style=pick(scene_lib.STYLES))
  if skill == "novel_view":
    return Scene(view=pick(scene_lib.VIEWS))
  if skill == "attribute_modification":
    part = subject.parts[int(rng.integers(len(subject.parts)))] if subject else None
    role = part.role if part else "body"
    taken = {part.colour} if part else set()
    return Scene(recolour=(role, pick([c for c in subjects_lib.COLOURS if c not in taken])))
  if skill == "accessorization":
    return Scene(accessory=pick(scene_lib.ACCESSORIES))
  raise ValueError(f"unknown skill {skill!r}; known: {SKILLS}")
