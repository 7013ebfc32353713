"""Procedural subjects of the synthetic world: seeded compositions of shapes.

A subject is 2-3 coloured, textured parts in a fixed layout with an identity and a
class noun; `make_subject(seed)` always returns the same subject for the same seed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# Subject colours (RGB). White and grey are left out on purpose: the default
# background is light grey, so they would vanish.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 205, 40),
    "green": (50, 160, 70),
    "teal": (30, 160, 160),
    "blue": (40, 90, 210),
    "purple": (130, 60, 180),
    "pink": (240, 120, 170),
    "brown": (130, 80, 40),
    "black": (35, 35, 35),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "diamond")
TEXTURES = ("solid", "stripes", "dots", "checker")
# Where a non-body part sits relative to the body; the role doubles as the part's
# name in prompts ("with a red head").
ROLES = ("head", "base", "wing", "tail", "core")
PART_ROLES = ("body",) + ROLES

# Class noun by body shape, without / with a head: the noun is a function of the
# composition so a caption's noun is evidence about the subject's identity.
_NOUNS = {
    "circle": ("ball", "owl"),
    "square": ("box", "robot"),
    "triangle": ("tent", "gnome"),
    "ring": ("donut", "lamp"),
    "cross": ("badge", "doll"),
    "star": ("toy", "mascot"),
    "diamond": ("kite", "puppet"),
}
CLASS_NOUNS = tuple(sorted({n for pair in _NOUNS.values() for n in pair}))

_ID_RE = re.compile(r"^s(\d{6,})$")


@dataclasses.dataclass(frozen=True)
class Part:
  """One part of a subject, in the subject frame ([-1, 1]^2, y up).

  Attributes:
    role: the part's name ('body', 'head', 'base', 'wing', 'tail', 'core').
    shape: one of `SHAPES`.
    colour: one of `COLOURS`.
    texture: one of `TEXTURES`.
    centre: (x, y) of the part's centre.
    radius: half-size of the part's bounding square.
    angle_deg: in-plane rotation of the shape.
  """

  role: str
  shape: str
  colour: str
  texture: str
  centre: tuple[float, float]
  radius: float
  angle_deg: float


@dataclasses.dataclass(frozen=True)
class Subject:
  """A synthetic subject: an identity, a class noun and its parts (drawn in order)."""

  subject_id: str
  class_noun: str
  parts: tuple[Part, ...]

  @property
  def colours(self) -> tuple[str, ...]:
    """Distinct part colours, body first."""
    return tuple(dict.fromkeys(p.colour for p in self.parts))

  def part(self, role: str) -> Part:
    """Returns the part named `role`; raises KeyError if the subject has none."""
    for p in self.parts:
      if p.role == role:
        return p
    raise KeyError(f"subject {self.subject_id} has no part {role!r}; "
                   f"it has {[p.role for p in self.parts]}")


def subject_id_for(seed: int) -> str:
  """Returns the identity string of the subject made from `seed`."""
  return f"s{seed:06d}"


def seed_from_id(seed_or_id: int | str) -> int:
  """Returns the integer seed for a seed or a subject id like 's000042'."""
  if isinstance(seed_or_id, (int, np.integer)):
    if seed_or_id < 0:
      raise ValueError(f"subject seed must be >= 0, got {seed_or_id}")
    return int(seed_or_id)
  match = _ID_RE.match(seed_or_id)
  if not match:
    raise ValueError(f"not a subject id: {seed_or_id!r} (expected like 's000042')")
  return int(match.group(1))


def _offset(role: str, body_r: float, r: float) -> tuple[float, float]:
  # Parts overlap the body (0.7) so a subject reads as one object.
  d = 0.7 * (body_r + r)
  return {"head": (0.0, d), "base": (0.0, -d), "wing": (d, 0.0),
          "tail": (-d, 0.0), "core": (0.0, 0.0), "body": (0.0, 0.0)}[role]


def make_subject(seed_or_id: int | str) -> Subject:
  """Makes the subject for a seed (or its id); deterministic.

  Args:
    seed_or_id: a non-negative integer seed or a subject id ('s000042').

  Returns:
    The frozen `Subject`, scaled and centred to fit the subject frame.
  """
  seed = seed_from_id(seed_or_id)
  rng = np.random.default_rng([seed, 0x5B1EC7])
  num_parts = int(rng.integers(2, 4))
  roles = ["body"] + [str(r) for r in rng.choice(ROLES, size=num_parts - 1, replace=False)]
  # Distinct colours per part keep every attribute edit and every part visible.
  colours = rng.choice(list(COLOURS), size=num_parts, replace=False)
  raw = []
  body_r = float(rng.uniform(0.42, 0.55))
  for i, role in enumerate(roles):
    r = body_r if role == "body" else float(
        rng.uniform(0.42, 0.55) * body_r if role == "core" else rng.uniform(0.22, 0.32))
    shape = str(rng.choice(SHAPES))
    raw.append((role, shape, str(colours[i]), str(rng.choice(TEXTURES)),
                _offset(role, body_r, r), r, float(rng.choice([0.0, 0.0, 15.0, 45.0]))))
  # Centre the union of part discs and scale it to radius 0.9.
  xs = [c[0] + s * r for _, _, _, _, c, r, _ in raw for s in (-1, 1)]
  ys = [c[1] + s * r for _, _, _, _, c, r, _ in raw for s in (-1, 1)]
  cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
  k = 0.9 / max(max(xs) - cx, max(ys) - cy)
  parts = tuple(
      Part(role, shape, colour, texture,
           (round((c[0] - cx) * k, 4), round((c[1] - cy) * k, 4)), round(r * k, 4), angle)
      for role, shape, colour, texture, c, r, angle in raw)
  # Cores are drawn last so the body never covers them.
  parts = tuple(sorted(parts, key=lambda p: p.role == "core"))
  has_head = "head" in roles
  return Subject(subject_id_for(seed), _NOUNS[parts[0].shape][int(has_head)], parts)
