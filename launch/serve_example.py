"""Serves SuTI requests from a directory with the exported SavedModel (TF only, no JAX).

  python -m launch.serve_example --export_dir=/tmp/export --requests_dir=requests/ \
      --output_dir=served/
Each request is a sub-directory of `--requests_dir` holding 1..K_max exemplar images
(PNG/JPEG), `captions.txt` (one caption per image, images sorted by name) and
`prompts.txt` (one prompt per line); a directory without images is served by
`text_to_image`. Outputs go to `<output_dir>/<request>/<prompt>_<sample>.png`.

Deploying with TF Serving: the SavedModel directory is servable as version 1 of a model:
  mkdir -p /models/suti && cp -r /tmp/export/saved_model /models/suti/1
  docker run -p 8501:8501 -v /models/suti:/models/suti -e MODEL_NAME=suti tensorflow/serving
  curl -d '{"signature_name": "personalize", "inputs": {"exemplar_images": [...uint8 K x S x S
      x 3...], "exemplar_mask": [true, false, ...], "exemplar_captions": ["a toy", "", ...],
      "prompt": ["a toy on the beach"], "seed": 0, "guidance_scale": [1.35],
      "text_guidance_scale": [1.35], "exemplar_guidance_scale": [1.35]}}' \
      localhost:8501/v1/models/suti:predict
Signatures: text_to_image(prompt, seed, guidance_scale) and personalize(...) take strings
(byte tokenizer, tokenized in-graph); text_to_image_ids / personalize_ids take T5 token
ids and masks (the only ones for SentencePiece cascades: tokenize client-side). In TF
Serving every input is required: the configured scales are in model_card.json ("export").
The model was lowered for the platforms listed there (`launch/export.py --platforms`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "launch/export.py --output directory.")
_REQUESTS_DIR = flags.DEFINE_string("requests_dir", None, "One sub-directory per request.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "served", "Where images are written.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first request (then +1 per request).")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def square_uint8(path: str, size: int) -> np.ndarray:
  """Centre-crops an image file to a square, resized to `size` (antialiased bilinear)."""
  image = PIL.Image.open(path).convert("RGB")
  side = min(image.size)
  left, top = (image.width - side) // 2, (image.height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  return np.asarray(image.resize((size, size), PIL.Image.BILINEAR), np.uint8)


def _lines(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def serve_request(model, card: dict, request_dir: str, num_samples: int,
                  seed: int) -> np.ndarray:
  """Runs one request directory; returns uint8 [P * num_samples, S, S, 3]."""
  export = card["export"]
  size, k_max = export["image_size"], export["max_exemplars"]
  prompts = [p for p in _lines(os.path.join(request_dir, "prompts.txt"))
             for _ in range(num_samples)]
  paths = sorted(p for p in os.listdir(request_dir) if p.lower().endswith(IMAGE_SUFFIXES))
  if not paths:
    return model.signatures["text_to_image"](prompt=tf.constant(prompts), seed=tf.constant(seed),
                               guidance_scale=tf.constant(export["default_guidance_scale"]))[
                                   "images"].numpy()
  captions = _lines(os.path.join(request_dir, "captions.txt"))
  if len(captions) != len(paths) or not 1 <= len(paths) <= (k_max or 0):
    raise ValueError(f"{request_dir}: {len(paths)} images, {len(captions)} captions; "
                     f"the model takes 1 to {k_max} captioned exemplars")
  images = np.zeros((k_max, size, size, 3), np.uint8)
  images[:len(paths)] = [square_uint8(os.path.join(request_dir, p), size) for p in paths]
  mask = np.arange(k_max) < len(paths)
  return model.signatures["personalize"](
      exemplar_images=tf.constant(images), exemplar_mask=tf.constant(mask),
      exemplar_captions=tf.constant(captions + [""] * (k_max - len(paths))),
      prompt=tf.constant(prompts), seed=tf.constant(seed),
      guidance_scale=tf.constant(export["default_guidance_scale"]),
      text_guidance_scale=tf.constant(export["default_text_guidance_scale"]),
      exemplar_guidance_scale=tf.constant(export["default_exemplar_guidance_scale"]))[
          "images"].numpy()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _EXPORT_DIR.value or not _REQUESTS_DIR.value:
    raise app.UsageError("--export_dir and --requests_dir are required")
  with open(os.path.join(_EXPORT_DIR.value, "model_card.json")) as f:
    card = json.load(f)
  # Keep the loaded object alive while its functions run (they hold its variables).
  model = tf.saved_model.load(os.path.join(_EXPORT_DIR.value, "saved_model"))
  requests = sorted(d for d in os.listdir(_REQUESTS_DIR.value)
                    if os.path.isdir(os.path.join(_REQUESTS_DIR.value, d)))
  for i, name in enumerate(requests):
    images = serve_request(model, card, os.path.join(_REQUESTS_DIR.value, name),
                           _NUM_SAMPLES.value, _SEED.value + i)
    out_dir = os.path.join(_OUTPUT_DIR.value, name)
    os.makedirs(out_dir, exist_ok=True)
    for j, image in enumerate(images):
      prompt_index, sample_index = divmod(j, _NUM_SAMPLES.value)
      PIL.Image.fromarray(image).save(os.path.join(out_dir, f"{prompt_index}_{sample_index}.png"))
    logging.info("request %s: %d images", name, len(images))


if __name__ == "__main__":
  app.run(main)
