"""Image decode, RGB conversion, resize and [-1, 1] normalisation.

Two paths with one policy: in-graph (tf, for tf.data) and host-side (numpy/PIL).
Both check the pixel budget from the header before decoding (untrusted input).
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import PIL.Image
from PIL import JpegImagePlugin
from PIL import PngImagePlugin
import tensorflow as tf

# Only PNG and JPEG are part of the record schema (docs: ICL group record), so
# both paths reject the other formats tf.io.decode_image / PIL would accept.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Alpha is composited over white: transparent web images (logos, product
# shots) are drawn on white backgrounds, and black would invent dark halos.
_BACKGROUND = 255.0
# Most pixels (width * height) any decode path accepts, checked from the header
# before decoding: a 200 KB PNG can claim 40000^2 px (4.8 GB decoded). The
# 4096^2 default (48 MB as RGB) is 16x the pixels of the largest stage
# (imagen_sr1024); callers with larger images pass `max_pixels`.
MAX_PIXELS = 4096 * 4096
# Header parsers by magic: they read the size without PIL.Image.open's own
# decompression-bomb check, so `max_pixels` is the only limit and it is exact.
_PIL_PARSERS = ((_PNG_MAGIC, PngImagePlugin.PngImageFile),
                (_JPEG_MAGIC, JpegImagePlugin.JpegImageFile))
# What PIL raises on malformed data, from header parsing through decoding.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, IndexError, TypeError,
               EOFError, struct.error)


class ImageError(ValueError):
  """An image (a record field or a file) can not be decoded or has the wrong shape."""

  def __init__(self, field: str, problem: str, *, path: str = ""):
    super().__init__(f"{path}: {problem}" if path else
                     f"field '{field}': {problem}")
    self.field = field
    self.problem = problem
    self.path = path


class PixelBudgetError(ImageError):
  """An image's header declares more pixels than the budget allows."""


def _check_pixels(width: int, height: int, *, max_pixels: int = MAX_PIXELS,
                 field: str = "image") -> None:
  """Raises PixelBudgetError if a width x height image exceeds `max_pixels`."""
  if width * height > max_pixels:
    raise PixelBudgetError(
        field, f"{width}x{height} px exceeds the pixel budget of {max_pixels} px")


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


def decode_array(data: bytes, *, field: str = "image",
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Decodes PNG/JPEG bytes on the host (PIL), grayscale/alpha -> RGB.

  Args:
    data: encoded PNG or JPEG bytes.
    field: record field name used in the error message.
    max_pixels: pixel budget, checked from the header before decoding.

  Returns:
    uint8 [H, W, 3]; alpha is composited over white.

  Raises:
    PixelBudgetError: the header declares more than `max_pixels` pixels.
    ImageError: not PNG/JPEG, truncated or otherwise undecodable.
  """
  parser = next((p for magic, p in _PIL_PARSERS if data.startswith(magic)), None)
  if parser is None:
    raise ImageError(field, "undecodable image: not PNG or JPEG data")
  try:
    image = parser(io.BytesIO(data))  # Reads the header only.
  except _PIL_ERRORS as e:
    raise ImageError(field, f"undecodable image: {e}") from e
  with image:
    _check_pixels(*image.size, max_pixels=max_pixels, field=field)
    try:
      image.load()  # PIL decodes lazily; force it so truncation shows here.
      if image.mode not in ("L", "LA", "RGB", "RGBA"):
        alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
      pixels = np.asarray(image)
    except _PIL_ERRORS as e:
      raise ImageError(field, f"undecodable image: {e}") from e
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  return _composite(pixels)


def read_image(path: str | os.PathLike[str], *,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Reads a PNG/JPEG file with `decode_array`'s checks; errors name the file.

  Args:
    path: the image file.
    max_pixels: pixel budget, checked from the header before decoding.

  Returns:
    uint8 [H, W, 3]; alpha is composited over white.

  Raises:
    PixelBudgetError, ImageError: as `decode_array`, with `path` in the message.
    OSError: the file can not be read.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    return decode_array(data, max_pixels=max_pixels)
  except ImageError as e:
    raise type(e)(e.field, e.problem, path=path) from e


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


def _header_size_tf(encoded: tf.Tensor, is_png: tf.Tensor) -> tf.Tensor:
  """int64 [width, height] from a PNG or JPEG header, without decoding."""

  def png():
    # IHDR must be the first chunk: u32 big-endian width, height at bytes
    # 16..24. Padding keeps a short input from failing the slice.
    head = tf.strings.join([tf.strings.substr(encoded, 0, 24), b"\0" * 24])
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.uint8),
                  tf.int64)
    return raw[0::4] * 2**24 + raw[1::4] * 2**16 + raw[2::4] * 2**8 + raw[3::4]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded, output_type=tf.int32)
    return tf.cast(tf.stack([shape[1], shape[0]]), tf.int64)

  return tf.cond(is_png, png, jpeg)


def _to_rgb_tf(pixels: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, 1|2|4] (L, LA, RGBA) -> [h, w, 3], alpha composited over white."""
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
  return tf.cast(tf.round(mixed), tf.uint8)


def decode_tf(encoded: tf.Tensor, field: str = "image", *,
              max_pixels: int = MAX_PIXELS) -> tf.Tensor:
  """In-graph twin of `decode_array`; fails (InvalidArgumentError) on bad data.

  Args:
    encoded: string scalar, PNG or JPEG bytes.
    field: record field name put in the assertion message.
    max_pixels: pixel budget, checked from the header before decoding.

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
    size = _header_size_tf(encoded, is_png)
  # float64: a u32 x u32 product can overflow int64.
  pixels_claimed = tf.reduce_prod(tf.cast(size, tf.float64))
  budget = tf.debugging.Assert(
      pixels_claimed <= max_pixels,
      [f"field '{field}': width, height", size,
       f"exceed the pixel budget of {max_pixels} px"])
  with tf.control_dependencies([budget]):
    pixels = tf.io.decode_image(encoded, channels=0, expand_animations=False)
  # RGB images, nearly all of them, skip the conversion: its float arithmetic
  # cost more than the decode at the small sizes of the SuTI stages.
  rgb = tf.cond(tf.equal(tf.shape(pixels)[-1], 3), lambda: pixels,
                lambda: _to_rgb_tf(pixels))
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
  # Images already at `size` skip the resize (an identity there, as PIL's is):
  # the antialiased resize was the input's largest CPU cost at 16 px.
  resized = tf.cond(
      tf.equal(side, size), lambda: tf.cast(square, tf.float32),
      lambda: tf.image.resize(square, (size, size), method="bilinear", antialias=True))
  out = resized / 127.5 - 1.0
  out.set_shape(image.shape[:-3].concatenate([size, size, 3]))
  return out
