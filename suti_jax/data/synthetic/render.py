"""Exact ground-truth renderer of the synthetic world: (subject, scene, size) -> image.

Draws on a supersampled canvas and area-averages with integer arithmetic, so the same
inputs always give the same bytes and mirrored scenes mirror exactly.
"""

from __future__ import annotations

import numpy as np

from suti_jax.data.synthetic import subjects as subjects_lib
from suti_jax.data.synthetic.scene import Scene

# Subject placement in the image frame ([-1, 1]^2, y up).
_SCALE = {"small": 0.4, "medium": 0.7, "large": 0.95}
_POSITION = {"center": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0),
             "top": (0.0, 1.0), "bottom": (0.0, -1.0)}
_HAT_RGB = (25, 25, 50)
# White is not a subject colour, so the badge is always visible.
_BADGE_RGB = (252, 252, 252)
_FRAME_RGB = (150, 100, 50)
_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
_GRAY = np.array([0.299, 0.587, 0.114])
# Label ids of non-part pixels on the label map (parts use their index).
_BACKGROUND, _HAT, _BADGE = -1, -2, -3


def supersample_factor(size_px: int) -> int:
  """Canvas pixels per output pixel and axis: a canvas of at least 128 px."""
  return max(4, -(-128 // size_px))


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
  # Integer numerators make column j and n-1-j exact negations of each other,
  # which keeps np.fliplr of a render bit-identical to the mirrored render.
  c = (2.0 * np.arange(n) + 1.0 - n) / n
  return np.broadcast_to(c[None, :], (n, n)), np.broadcast_to(-c[:, None], (n, n))


def _polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
  inside = np.zeros(u.shape, bool)
  for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0)):
    crosses = (y0 > v) != (y1 > v)
    with np.errstate(divide="ignore", invalid="ignore"):
      x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (u < x_at)
  return inside


def _star_verts() -> np.ndarray:
  angles = np.pi / 2 + np.arange(10) * np.pi / 5
  radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_STAR = _star_verts()
_TRIANGLE = np.array([[0.0, 0.95], [-0.95, -0.75], [0.95, -0.75]])


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside test of a unit shape in its local frame ([-1, 1]^2, y up).

  Args:
    shape: one of `subjects.SHAPES`.
    u, v: local coordinates, any (equal) shapes.

  Returns:
    Boolean mask, shaped like `u`.
  """
  r2 = u * u + v * v
  if shape == "circle":
    return r2 <= 1.0
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if shape == "triangle":
    return _polygon(u, v, _TRIANGLE)
  if shape == "ring":
    return (r2 <= 1.0) & (r2 >= 0.3)
  if shape == "cross":
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
  if shape == "star":
    return _polygon(u, v, _STAR)
  if shape == "diamond":
    return np.abs(u) / 0.75 + np.abs(v) <= 1.0
  raise ValueError(f"unknown shape {shape!r}; known: {subjects_lib.SHAPES}")


def _texture_rgb(texture: str, rgb: tuple[int, int, int], u, v) -> np.ndarray:
  base = np.array(rgb, np.float64)
  lum = float(base @ _GRAY)
  # The second texture colour is a darker shade, or a lighter one for dark colours,
  # so the part keeps its named hue either way.
  shade = base + (255 - base) * 0.45 if lum < 90 else base * 0.6
  if texture == "solid":
    alt = np.zeros(u.shape, bool)
  elif texture == "stripes":
    alt = np.floor((u + v) * 2.5) % 2 == 1
  elif texture == "dots":
    alt = (np.mod(u * 2.5, 1.0) - 0.5) ** 2 + (np.mod(v * 2.5, 1.0) - 0.5) ** 2 < 0.09
  elif texture == "checker":
    alt = (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 1
  else:
    raise ValueError(f"unknown texture {texture!r}; known: {subjects_lib.TEXTURES}")
  return np.where(alt[..., None], shade, base).round().astype(np.uint8)


def _background(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  def fill(rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), x.shape + (3,)).copy()

  def split(mask, rgb_true, rgb_false):
    return np.where(mask[..., None], np.array(rgb_true, np.uint8), np.array(rgb_false, np.uint8))

  if name == "plain":
    return fill((238, 238, 238))
  if name == "beach":
    out = split(y > -0.1, (150, 200, 240), (225, 205, 150))
    out[(y <= -0.1) & (y > -0.3)] = (50, 120, 190)
    return out
  if name == "park":
    return split(y > -0.25, (175, 215, 245), (95, 165, 75))
  if name == "snow":
    return split(y > -0.3, (205, 215, 230), (250, 250, 252))
  if name == "night":
    out = fill((20, 25, 55))
    out[(x - 0.65) ** 2 + (y - 0.65) ** 2 < 0.15 ** 2] = (240, 235, 200)
    return out
  if name == "brick":
    row = np.floor(y / 0.25)
    col_x = x + 0.25 * (row % 2)
    mortar = (np.mod(y, 0.25) < 0.04) | (np.mod(col_x, 0.5) < 0.04)
    return split(mortar, (215, 205, 190), (165, 70, 50))
  if name == "kitchen":
    tiles = (np.floor(x / 0.25) + np.floor(y / 0.25)) % 2 == 0
    out = split(tiles, (70, 70, 80), (230, 230, 225))
    out[y > -0.35] = (240, 225, 190)
    return out
  if name == "desert":
    return split(y > -0.2 + 0.08 * np.sin(3.0 * x), (250, 200, 130), (215, 160, 90))
  raise ValueError(f"unknown background {name!r}")


def _subject_frame(scene: Scene, x: np.ndarray, y: np.ndarray):
  s = _SCALE[scene.scale]
  # The offset keeps a moved subject inside the image at every scale.
  offset = max(0.05, 0.98 - s)
  dx, dy = _POSITION[scene.position]
  sx, sy = (x - dx * offset) / s, (y - dy * offset) / s
  if scene.view == "mirrored":
    return -sx, sy
  if scene.view == "rotated":  # A quarter turn counter-clockwise.
    return sy, -sx
  if scene.view == "upside_down":  # Half a turn.
    return -sx, -sy
  return sx, sy


def _local(part: subjects_lib.Part, sx, sy):
  a = np.deg2rad(part.angle_deg)
  px, py = (sx - part.centre[0]) / part.radius, (sy - part.centre[1]) / part.radius
  return np.cos(a) * px + np.sin(a) * py, -np.sin(a) * px + np.cos(a) * py


def _draw_subject(subject, scene, sx, sy, canvas, labels):
  recolour = {}
  if scene.recolour:
    subject.part(scene.recolour[0])  # Raises a KeyError naming the parts.
    recolour = dict([scene.recolour])
  for i, part in enumerate(subject.parts):
    u, v = _local(part, sx, sy)
    mask = shape_mask(part.shape, u, v)
    rgb = subjects_lib.COLOURS[recolour.get(part.role, part.colour)]
    canvas[mask] = _texture_rgb(part.texture, rgb, u, v)[mask]
    labels[mask] = i
  if not subject.parts:  # An empty subject (a banner) has nothing to wear them.
    return
  if scene.accessory == "hat":
    top = max(subject.parts, key=lambda p: p.centre[1] + p.radius)
    hx, hy = top.centre[0], top.centre[1] + top.radius
    brim = (np.abs(sx - hx) <= 0.32) & (sy >= hy - 0.05) & (sy <= hy + 0.04)
    crown = (np.abs(sx - hx) <= 0.19) & (sy > hy + 0.04) & (sy <= hy + 0.36)
    canvas[brim | crown] = _HAT_RGB
    labels[brim | crown] = _HAT
  elif scene.accessory == "badge":
    body = subject.parts[0]
    u = (sx - body.centre[0] - 0.4 * body.radius) / 0.22
    v = (sy - body.centre[1] - 0.3 * body.radius) / 0.22
    mask = shape_mask("star", u, v)
    canvas[mask] = _BADGE_RGB
    labels[mask] = _BADGE


def _outline(canvas, labels, background, thickness):
  # A pixel is on the outline when a pixel within `thickness` has another label.
  n = labels.shape[0]
  padded = np.pad(labels, thickness, constant_values=_BACKGROUND)
  edge = np.zeros(labels.shape, bool)
  for d in range(1, thickness + 1):
    for oy, ox in ((d, 0), (-d, 0), (0, d), (0, -d)):
      edge |= padded[thickness + oy:thickness + oy + n, thickness + ox:thickness + ox + n] != labels
  keep = edge & (labels != _BACKGROUND)
  return np.where(keep[..., None], canvas, background)


def _compose(subject, scene, size_px):
  if size_px < 8:
    raise ValueError(f"size_px must be >= 8, got {size_px}")
  ss = supersample_factor(size_px)
  n = size_px * ss
  x, y = _grid(n)
  background = _background(scene.background, x, y)
  canvas = background.copy()
  labels = np.full((n, n), _BACKGROUND, np.int32)
  sx, sy = _subject_frame(scene, x, y)
  _draw_subject(subject, scene, sx, sy, canvas, labels)
  if scene.style == "outline":
    canvas = _outline(canvas, labels, background, ss * max(1, size_px // 32))
  if scene.accessory == "frame":
    width = max(ss, round(0.08 * n))
    border = np.ones((n, n), bool)
    border[width:-width, width:-width] = False
    canvas[border] = _FRAME_RGB
  return canvas, labels, ss


def _area_mean(canvas: np.ndarray, ss: int) -> np.ndarray:
  n = canvas.shape[0] // ss
  sums = canvas.reshape(n, ss, n, ss, -1).astype(np.int32).sum(axis=(1, 3))
  # Integer rounding: order-independent, hence exactly mirror-symmetric.
  return ((sums + ss * ss // 2) // (ss * ss)).astype(np.uint8)


def _pixelate(image: np.ndarray) -> np.ndarray:
  n = image.shape[0]
  block = max(2, n // 8)
  m = -(-n // block)
  padded = np.pad(image, ((0, m * block - n), (0, m * block - n), (0, 0)), mode="edge")
  blocks = _area_mean(padded, block)
  return np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)[:n, :n]


def render(subject: subjects_lib.Subject, scene: Scene, size_px: int) -> np.ndarray:
  """Renders the exact ground-truth image of `subject` under `scene`.

  Args:
    subject: the subject to draw.
    scene: what the prompt asks for (background, view, style, ...).
    size_px: output height and width (>= 8).

  Returns:
    uint8 [size_px, size_px, 3]; the same inputs always give the same bytes.

  Raises:
    KeyError: the scene recolours a part the subject does not have.
  """
  canvas, _, ss = _compose(subject, scene, size_px)
  image = _area_mean(canvas, ss)
  if scene.style == "pixelated":
    image = _pixelate(image)
  elif scene.style == "inverted":
    image = 255 - image
  elif scene.style in ("sepia", "grayscale"):
    matrix = _SEPIA if scene.style == "sepia" else np.tile(_GRAY, (3, 1))
    image = np.clip(image.astype(np.float64) @ matrix.T, 0, 255).round().astype(np.uint8)
  return image


def part_masks(subject: subjects_lib.Subject, scene: Scene, size_px: int
               ) -> dict[str, np.ndarray]:
  """Output pixels each visible part (or accessory) touches, before any style.

  Args:
    subject: the subject.
    scene: the scene (its style is ignored: masks are geometric).
    size_px: output size.

  Returns:
    {role or 'hat'/'badge': bool [size_px, size_px]}; a pixel is in a mask when
    any of its supersamples shows that part.
  """
  _, labels, ss = _compose(subject, scene, size_px)
  n = size_px
  blocks = labels.reshape(n, ss, n, ss).transpose(0, 2, 1, 3).reshape(n, n, ss * ss)
  names = {i: p.role for i, p in enumerate(subject.parts)}
  names.update({_HAT: "hat", _BADGE: "badge"})
  return {name: (blocks == label).any(axis=-1) for label, name in names.items()
          if (blocks == label).any()}


def subject_mask(subject: subjects_lib.Subject, scene: Scene, size_px: int) -> np.ndarray:
  """Fraction of each output pixel covered by the subject's parts, float [H, W]."""
  _, labels, ss = _compose(subject, scene, size_px)
  covered = (labels >= 0).astype(np.float64)
  return covered.reshape(size_px, ss, size_px, ss).mean(axis=(1, 3))
