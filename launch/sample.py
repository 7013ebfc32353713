"""Samples a cascade: text-to-image, or SuTI personalisation from exemplars.

  python -m launch.sample --checkpoint=/tmp/b64,/tmp/sr256 --prompts="a cat;a dog" \
      --num_samples=4 --output=grid.png
  python -m launch.sample --config=configs/suti_base64.py:tiny --random_init \
      --config.sampling.num_steps=8 \
      --exemplars="subject/*.png" --exemplar_captions="a toy;a toy on a bed" \
      --prompts="a toy on the beach" --output=grid.png --output_dir=samples/
Exemplar captions may also come from a captions.txt (one per image, sorted by
file name) beside the images.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import PIL.Image
from absl import app
from absl import flags
from absl import logging
from einops import rearrange

from launch import cascade_flags
from suti_jax import inference
from suti_jax.data import images as images_lib

_CHECKPOINT = flags.DEFINE_multi_string(
    "checkpoint", [], "Stage checkpoint dirs or workdirs, base then SR (repeat or comma list).")
_CONFIGS = cascade_flags.define_stage_config_flags("With --random_init")
_RANDOM_INIT = flags.DEFINE_boolean(
    "random_init", False, "Sample from randomly initialised weights (demos, tests).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_PROMPTS = flags.DEFINE_string("prompts", None, "';'-separated prompts.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "One prompt per line.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps for every stage (default config).")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", None, "CFG scale for every stage.")
_GUIDANCE = flags.DEFINE_enum("guidance", None, ["interleaved", "cfg", "compositional"],
                              "SuTI guidance mode (default config).")
_TEXT_SCALE = flags.DEFINE_float("text_guidance_scale", None, "SuTI text guidance scale.")
_EXEMPLAR_SCALE = flags.DEFINE_float("exemplar_guidance_scale", None,
                                     "SuTI exemplar guidance scale.")
_EXEMPLARS = flags.DEFINE_string("exemplars", None,
                                 "SuTI: a directory of images or a glob (sorted by name).")
_EXEMPLAR_CAPTIONS = flags.DEFINE_string(
    "exemplar_captions", None, "';'-separated captions, one per exemplar (default captions.txt).")
_OUTPUT = flags.DEFINE_string("output", "samples.png", "PNG grid of all samples.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Also write each sample as a PNG here.")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _split(values: list[str]) -> list[str]:
  return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _stages() -> list[inference.StageModel]:
  if _RANDOM_INIT.value == bool(_CHECKPOINT.value):
    raise app.UsageError("give --checkpoint, or --config with --random_init (exactly one)")
  if _CHECKPOINT.value:
    return [inference.load_stage(path, step=_STEP.value) for path in _split(_CHECKPOINT.value)]
  sections = cascade_flags.stage_sections(_CONFIGS)
  if not sections:
    raise app.UsageError("--random_init needs --config")
  key = jax.random.PRNGKey(_SEED.value)
  return [inference.random_stage(sec, jax.random.fold_in(key, i))
          for i, sec in enumerate(sections)]


def _prompts() -> list[str]:
  if bool(_PROMPTS.value) == bool(_PROMPTS_FILE.value):
    raise app.UsageError("give --prompts or --prompts_file (exactly one)")
  if _PROMPTS.value:
    return [p.strip() for p in _PROMPTS.value.split(";") if p.strip()]
  with open(_PROMPTS_FILE.value) as f:
    return [line.strip() for line in f if line.strip()]


def read_exemplars(pattern: str, captions: str | None) -> tuple[list[np.ndarray], list[str]]:
  """Exemplar images (sorted by name) and their captions.

  Args:
    pattern: a directory or a glob of PNG/JPEG files.
    captions: ';'-separated captions, or None to read `captions.txt` beside
      the images (one line per image).

  Returns:
    (uint8 [H, W, 3] images, captions).

  Raises:
    images_lib.ImageError: naming an exemplar that is undecodable or over the pixel budget.
  """
  paths = sorted(glob.glob(os.path.join(pattern, "*") if os.path.isdir(pattern) else pattern))
  paths = [p for p in paths if p.lower().endswith(IMAGE_SUFFIXES)]
  if not paths:
    raise app.UsageError(f"no PNG/JPEG exemplars match {pattern!r}")
  if captions is None:
    caption_file = os.path.join(os.path.dirname(paths[0]), "captions.txt")
    if not os.path.isfile(caption_file):
      raise app.UsageError(f"give --exemplar_captions or write {caption_file}")
    with open(caption_file) as f:
      texts = [line.strip() for line in f if line.strip()]
  else:
    texts = [c.strip() for c in captions.split(";")]
  if len(texts) != len(paths):
    raise app.UsageError(f"{len(paths)} exemplar images but {len(texts)} captions")
  return [images_lib.read_image(p) for p in paths], texts


def grid(samples: np.ndarray, columns: int) -> np.ndarray:
  """uint8 [R*C, H, W, 3] -> [R*H, C*W, 3], one row per prompt."""
  return rearrange(samples, "(r c) h w ch -> (r h) (c w) ch", c=columns)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  pipeline = inference.Pipeline(_stages())
  prompts = _prompts()
  key = jax.random.PRNGKey(_SEED.value)
  if _EXEMPLARS.value:
    images, captions = read_exemplars(_EXEMPLARS.value, _EXEMPLAR_CAPTIONS.value)
    # Every prompt of the subject in one batched call (exemplars encoded once).
    samples = pipeline.personalize(images, captions, prompts, _NUM_SAMPLES.value, key,
                                   guidance=_GUIDANCE.value,
                                   guidance_scale=_GUIDANCE_SCALE.value,
                                   text_guidance_scale=_TEXT_SCALE.value,
                                   exemplar_guidance_scale=_EXEMPLAR_SCALE.value,
                                   num_steps=_STEPS.value)
  else:
    samples = pipeline.text_to_image(prompts, _NUM_SAMPLES.value, key, num_steps=_STEPS.value,
                                     guidance_scale=_GUIDANCE_SCALE.value)
  PIL.Image.fromarray(grid(samples, _NUM_SAMPLES.value)).save(_OUTPUT.value)
  if _OUTPUT_DIR.value:
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    for i, image in enumerate(samples):
      prompt_index, sample_index = divmod(i, _NUM_SAMPLES.value)
      PIL.Image.fromarray(image).save(
          os.path.join(_OUTPUT_DIR.value, f"{prompt_index}_{sample_index}.png"))
  logging.info("wrote %d samples to %s", len(samples), _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
