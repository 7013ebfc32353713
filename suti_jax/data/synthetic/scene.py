"""The scene a prompt asks for: what to change about a subject's rendering.

A `Scene` holds one value per modifier of the five SuTI skills; the renderer draws it
and the prompt grammar (`prompts.py`) reads and writes it.
"""

from __future__ import annotations

import dataclasses

from suti_jax.data.synthetic import subjects

BACKGROUNDS = ("plain", "beach", "park", "snow", "night", "brick", "kitchen", "desert")
POSITIONS = ("center", "left", "right", "top", "bottom")
SCALES = ("medium", "small", "large")
STYLES = ("none", "outline", "pixelated", "inverted", "sepia", "grayscale")
VIEWS = ("none", "rotated", "upside_down", "mirrored")
ACCESSORIES = ("none", "hat", "frame", "badge")

# SuTI's five skills (Sec. 3 of the paper), in the order the paper lists them.
SKILLS = ("recontextualization", "stylization", "novel_view",
          "attribute_modification", "accessorization")


@dataclasses.dataclass(frozen=True)
class Scene:
  """How to render a subject; the default is the plain studio shot.

  Attributes:
    background: one of `BACKGROUNDS` (re-contextualisation).
    position: one of `POSITIONS` (re-contextualisation).
    scale: one of `SCALES` (re-contextualisation).
    style: one of `STYLES` (stylisation).
    view: one of `VIEWS` (multi-view).
    recolour: (part role, colour name) or None (attribute modification).
    accessory: one of `ACCESSORIES` (accessorisation).
  """

  background: str = "plain"
  position: str = "center"
  scale: str = "medium"
  style: str = "none"
  view: str = "none"
  recolour: tuple[str, str] | None = None
  accessory: str = "none"

  def __post_init__(self):
    for name, allowed in (("background", BACKGROUNDS), ("position", POSITIONS),
                          ("scale", SCALES), ("style", STYLES), ("view", VIEWS),
                          ("accessory", ACCESSORIES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"Scene.{name}={getattr(self, name)!r}; allowed: {allowed}")
    if self.recolour is not None:
      role, colour = self.recolour
      if role not in subjects.PART_ROLES or colour not in subjects.COLOURS:
        raise ValueError(f"Scene.recolour={self.recolour!r}: role must be one of "
                         f"{subjects.PART_ROLES}, colour one of {tuple(subjects.COLOURS)}")

  @property
  def skills(self) -> tuple[str, ...]:
    """The skills this scene exercises, in `SKILLS` order (empty = plain shot)."""
    used = {
        "recontextualization": (self.background != "plain" or self.position != "center"
                                or self.scale != "medium"),
        "stylization": self.style != "none",
        "novel_view": self.view != "none",
        "attribute_modification": self.recolour is not None,
        "accessorization": self.accessory != "none",
    }
    return tuple(s for s in SKILLS if used[s])
