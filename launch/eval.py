"""Evaluates a generation method on DreamBench (DINO, CLIP-I, CLIP-T) and writes reports.

  python -m launch.eval --method=directory --images_dir=samples/suti \
      --dreambench_dir=../shared/dreambench --dino_weights=weights/dino.msgpack \
      --clip_weights=weights/clip.msgpack --clip_vocab_dir=weights/clip-vit-base-patch32 \
      --output_dir=reports/dreambench
Weights may also come from $SUTI_DINO_WEIGHTS / $SUTI_CLIP_WEIGHTS. Without them the run is
refused, unless --random_weights_test_mode, which labels every number as meaningless.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from suti_jax.eval import dreambench
from suti_jax.eval import metrics
from suti_jax.eval import report

_METHOD = flags.DEFINE_enum("method", None, ["directory", "real", "noise", "suti", "dreambooth"],
                            "directory: images produced elsewhere (see --images_dir); real: the "
                            "subjects' own photos; noise: random pixels.")
_CHECKPOINT = flags.DEFINE_list(
    "checkpoint", None, "--method=suti: trained SuTI stage workdirs, base first; "
    "--method=dreambooth: the text-to-image base stage workdir.")
_NUM_EXEMPLARS = flags.DEFINE_integer(
    "num_exemplars", 3, "--method=suti: subject photos given as demonstrations.")
_TINY_EXPERTS = flags.DEFINE_bool(
    "tiny_experts", False, "--method=dreambooth: the CPU-scaled recipe, not the paper's.")
_IMAGES_DIR = flags.DEFINE_string("images_dir", None,
                                  "For --method=directory: <dir>/<subject>/<prompt_index>_<n>.png.")
_DREAMBENCH_DIR = flags.DEFINE_string("dreambench_dir", "../shared/dreambench",
                                      "Folder with manifest.json and prompts_and_classes.txt.")
_DINO_WEIGHTS = flags.DEFINE_string("dino_weights", None,
                                    f"Converted msgpack or HF folder; default ${metrics.DINO_ENV}.")
_CLIP_WEIGHTS = flags.DEFINE_string("clip_weights", None,
                                    f"Converted msgpack or HF folder; default ${metrics.CLIP_ENV}.")
_CLIP_VOCAB_DIR = flags.DEFINE_string("clip_vocab_dir", None,
                                      "Folder with CLIP's vocab.json and merges.txt.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "reports/dreambench", "Where reports go.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images per prompt (DreamBench: 4).")
_SUBJECTS = flags.DEFINE_list("subjects", None, "Subset of subjects (default: all).")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", None, "Use only the first prompts (quick runs).")
_UNIQUE_TOKEN = flags.DEFINE_string("unique_token", "",
                                    "Identifier put before the class noun in prompts given to the "
                                    "method (DreamBooth: 'sks'); CLIP-T always uses the class "
                                    "noun.")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per embedder call.")
_RANDOM_WEIGHTS = flags.DEFINE_boolean("random_weights_test_mode", False,
                                       "Tiny random DINO/CLIP models; every number is labelled "
                                       f"{report.TEST_MODE_LABEL}.")


def _embedders() -> metrics.Embedders:
  dino_path = metrics.resolve_weights(_DINO_WEIGHTS.value, metrics.DINO_ENV)
  clip_path = metrics.resolve_weights(_CLIP_WEIGHTS.value, metrics.CLIP_ENV)
  if _RANDOM_WEIGHTS.value:
    if dino_path or clip_path:
      raise SystemExit("error: --random_weights_test_mode ignores weights; unset --dino_weights, "
                           f"--clip_weights, ${metrics.DINO_ENV} and ${metrics.CLIP_ENV}")
    return metrics.Embedders.random(_SEED.value, _BATCH_SIZE.value)
  if not dino_path or not clip_path:
    raise SystemExit(
        "error: refusing to report DINO/CLIP scores without weights: pass --dino_weights and "
        f"--clip_weights (or set ${metrics.DINO_ENV} / ${metrics.CLIP_ENV}); convert them with "
        "launch/convert_weights.py. For a pipeline check use --random_weights_test_mode.")
  try:
    return metrics.Embedders.load(dino_path, clip_path, _CLIP_VOCAB_DIR.value, _BATCH_SIZE.value)
  except metrics.MissingWeightsError as e:
    raise SystemExit(f"error: {e}") from e


def _method(benchmark: dreambench.Benchmark) -> dreambench.GenerationMethod:
  if _METHOD.value == "suti":
    if not _CHECKPOINT.value:
      raise SystemExit("error: --method=suti needs --checkpoint (base[,sr...] workdirs)")
    from suti_jax.eval import methods  # pylint: disable=import-outside-toplevel
    from suti_jax import inference  # pylint: disable=import-outside-toplevel
    stages = [inference.load_stage(path) for path in _CHECKPOINT.value]
    return methods.SuTIMethod(inference.Pipeline(stages), _NUM_EXEMPLARS.value)
  if _METHOD.value == "dreambooth":
    if not _CHECKPOINT.value:
      raise SystemExit("error: --method=dreambooth needs --checkpoint (a text-to-image workdir)")
    from suti_jax.eval import methods  # pylint: disable=import-outside-toplevel
    from suti_jax.experts import dreambooth, renderer  # pylint: disable=import-outside-toplevel
    base = renderer.load_base_model(_CHECKPOINT.value[0])
    return methods.DreamBoothMethod(base, dreambooth.ExpertConfig.tiny()
                                    if _TINY_EXPERTS.value else dreambooth.ExpertConfig())
  if _METHOD.value == "directory":
    if not _IMAGES_DIR.value:
      raise SystemExit("error: --method=directory needs --images_dir")
    return dreambench.DirectoryMethod(_IMAGES_DIR.value, benchmark)
  return dreambench.RealImagesMethod() if _METHOD.value == "real" else dreambench.NoiseMethod()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  embedders = _embedders()
  benchmark = dreambench.load_benchmark(_DREAMBENCH_DIR.value, _SUBJECTS.value, _UNIQUE_TOKEN.value)
  method = _method(benchmark)
  grids = f"{_OUTPUT_DIR.value}/grids"

  def on_subject(subject, real, generated):
    path = report.write_grid(f"{grids}/{subject.name}.png", real, generated)
    logging.info("subject %s done, grid %s", subject.name, path)

  result = dreambench.evaluate(benchmark, method, embedders, _NUM_IMAGES.value,
                               _MAX_PROMPTS.value, _SEED.value, on_subject)
  settings = {"subjects": len(benchmark.subjects), "max_prompts": _MAX_PROMPTS.value,
              "num_images": _NUM_IMAGES.value, "seed": _SEED.value,
              "unique_token": _UNIQUE_TOKEN.value or "(none: class noun)",
              "dino_weights": metrics.resolve_weights(_DINO_WEIGHTS.value, metrics.DINO_ENV),
              "clip_weights": metrics.resolve_weights(_CLIP_WEIGHTS.value, metrics.CLIP_ENV)}
  md_path, json_path = report.write_report(_OUTPUT_DIR.value, result, _RANDOM_WEIGHTS.value,
                                           settings)
  print(md_path.read_text())
  print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
  flags.mark_flag_as_required("method")
  app.run(main)
