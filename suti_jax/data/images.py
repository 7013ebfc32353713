"""Image decode, RGB conversion, resize and [-1, 1] normalisation.

Two paths with one policy: in-graph (tf, for tf.data) and host-side (numpy/PIL).
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import tensorflow as tf

# Only PNG and JPEG are part of the record schema (docs: ICL group record), so
# both paths reject the other formats tf.io.decode_image / PIL would accept.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Alpha is composited over white: transparent web images (logos, product
# shots) are drawn on white backgrounds, and black would invent dark halos.
_BACKGROUND = 255.0


class ImageError(ValueError):
  """An image field can not be decoded or has the wrong shape."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field '{field}': {problem}")
    self.field = field
    self.problem = problem


def _composite(pixels: np.ndarray) -> np.ndarray:
  """[H, W, C] uint8 with C in {1, 2, 3, 4} -> [H, W, 3] uint8 RGB."""
  channels = pixels.shape[-1]
  has_alpha = channels in (2, 4)
  color = pixels[..., :channels - 1] if has_alpha else pixels
  if color.shape[-1] == 1:
    color = np.repeat(color, 3, axis=-1)
  if not has_alpha:
    return color.astype(np.uint8)
  alpha = pixels[..., -1:].astype(np.float32) / 255.0
  mixed = color.astype(np.float32) * alpha + _BACKGROUND * (1.0 - alpha)
  return np.round(mixed).astype(np.uint8)


def decode_array(data: bytes, *, field: str = "image") -> np.ndarray:
  """Decodes PNG/JPEG bytes on the host (PIL), grayscale/alpha -> RGB.

  Args:
    data: encoded PNG or JPEG bytes.
    field: record field name used in the error message.

  Returns:
    uint8 [H, W, 3]; alpha is composited over white.

  Raises:
    ImageError: not PNG/JPEG, truncated or otherwise undecodable.
  """
  if not (data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC)):
    raise ImageError(field, "undecodable image: not PNG or JPEG data")
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.load()  # PIL decodes lazily; force it so truncation shows here.
      if image.mode not in ("L", "LA", "RGB", "RGBA"):
        alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
      pixels = np.asarray(image)
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(field, f"undecodable image: {e}") from e
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  return _composite(pixels)


def check_array(image: np.ndarray, *, field: str = "image") -> np.ndarray:
  """Checks a host image is uint8 [H, W, 3] with H, W > 0 and returns it.

  Args:
    image: candidate image array.
    field: field name used in the error message.

  Returns:
    `image` as a numpy array.

  Raises:
    ImageError: wrong dtype, rank, channel count or an empty side.
  """
  image = np.asarray(image)
  if (image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or
      min(image.shape[:2]) == 0):
    raise ImageError(
        field, f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
  return image


def preprocess_array(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square, resizes (antialiased bilinear), -> [-1, 1].

  Args:
    image: uint8 [H, W, 3].
    size: output side in px.

  Returns:
    float32 [size, size, 3] in [-1, 1].
  """
  image = check_array(image)
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = PIL.Image.fromarray(image[top:top + side, left:left + side])
  # PIL widens the bilinear kernel when downscaling, i.e. it antialiases.
  resized = np.asarray(square.resize((size, size), PIL.Image.BILINEAR))
  return resized.astype(np.float32) / 127.5 - 1.0


def decode_tf(encoded: tf.Tensor, field: str = "image") -> tf.Tensor:
  """In-graph twin of `decode_array`; fails (InvalidArgumentError) on bad data.

  Args:
    encoded: string scalar, PNG or JPEG bytes.
    field: record field name put in the assertion message.

  Returns:
    uint8 [h, w, 3]; alpha is composited over white.
  """
  is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
  is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)),
                     _JPEG_MAGIC)
  check = tf.debugging.Assert(
      tf.logical_or(is_png, is_jpeg),
      [f"field '{field}': undecodable image: not PNG or JPEG data"])
  with tf.control_dependencies([check]):
    pixels = tf.io.decode_image(encoded, channels=0, expand_animations=False)
  channels = tf.shape(pixels)[-1]
  has_alpha = tf.equal(channels % 2, 0)  # LA (2) and RGBA (4) end in alpha.
  color = pixels[..., :channels - tf.cast(has_alpha, tf.int32)]
  color = tf.cond(tf.equal(tf.shape(color)[-1], 1),
                  lambda: tf.tile(color, [1, 1, 3]), lambda: color)
  color = tf.cast(color, tf.float32)
  alpha = tf.cond(has_alpha,
                  lambda: tf.cast(pixels[..., -1:], tf.float32) / 255.0,
                  lambda: tf.ones_like(color[..., :1]))
  mixed = color * alpha + _BACKGROUND * (1.0 - alpha)
  rgb = tf.cast(tf.round(mixed), tf.uint8)
  rgb.set_shape([None, None, 3])
  return rgb


def preprocess_tf(image: tf.Tensor, size: int) -> tf.Tensor:
  """In-graph twin of `preprocess_array`; works on [h, w, 3] or [n, h, w, 3].

  Args:
    image: uint8 images.
    size: output side in px.

  Returns:
    float32 [..., size, size, 3] in [-1, 1].
  """
  shape = tf.shape(image)
  h, w = shape[-3], shape[-2]
  side = tf.minimum(h, w)
  square = tf.image.crop_to_bounding_box(image, (h - side) // 2,
                                         (w - side) // 2, side, side)
  resized = tf.image.resize(square, (size, size), method="bilinear",
                            antialias=True)
  return resized / 127.5 - 1.0
