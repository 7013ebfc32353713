"""DreamBench reports: Markdown + JSON in the paper's table layout (method | DINO | CLIP-I |
CLIP-T) beside the published rows, and one PNG grid per subject (photos row + generated rows).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np
from PIL import Image

from suti_jax.eval import dreambench
from suti_jax.eval import metrics

TEST_MODE_LABEL = "RANDOM-WEIGHTS TEST MODE"
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
# DreamBench automatic metrics (DINO ViT-S/16, CLIP ViT-B/32) on all 30 subjects as
# published (the SuTI paper and each method's own paper); for context only, not rerun here.
PUBLISHED = (
    ("real images (upper bound)", 0.774, 0.885, None),
    ("SuTI", 0.741, 0.819, 0.304),
    ("DreamBooth (Imagen)", 0.696, 0.812, 0.306),
    ("DreamBooth (SD)", 0.668, 0.803, 0.305),
    ("Re-Imagen", 0.600, 0.740, 0.270),
    ("Textual Inversion", 0.569, 0.780, 0.255),
    ("BLIP-Diffusion (zero-shot)", 0.594, 0.779, 0.300),
    ("IP-Adapter (SD 1.5)", 0.667, 0.813, 0.289),
    ("Kosmos-G", 0.694, 0.847, 0.287),
    ("Emu2-Gen", 0.766, 0.850, 0.287),
)
PUBLISHED_SOURCE = "published (SuTI paper, 30 subjects)"


def _key(name: str, random_weights: bool) -> str:
  # Random-weight numbers never sit under a plain "dino" key a reader could mistake for a score.
  return f"{name} [{TEST_MODE_LABEL}]" if random_weights else name


def _cell(value: float | None, random_weights: bool) -> str:
  if value is None:
    return "-"
  return f"{value:.3f} [{TEST_MODE_LABEL}]" if random_weights else f"{value:.3f}"


def _computed(values: dict[str, float | None], random_weights: bool) -> dict[str, float | None]:
  return {_key(k, random_weights): values[k] for k, _ in METRICS}


def to_json(result: dreambench.EvalResult, random_weights: bool,
            settings: dict[str, Any]) -> dict[str, Any]:
  """The report as a JSON-able dict.

  Args:
    result: per-subject scores from `dreambench.evaluate`.
    random_weights: the embedders had random weights (every number is labelled).
    settings: run settings to record (subjects, prompts, images per prompt, seed, ...).

  Returns:
    {"mode", "settings", "rows" (computed then published), "subjects"}.
  """
  bound = metrics.overall(result.real_bound)
  bound["clip_t"] = None
  rows = [{"method": result.method, "source": "this run",
           **_computed(metrics.overall(result.scores), random_weights)},
          {"method": "real images (upper bound)", "source": "this run",
           **_computed(bound, random_weights)}]
  rows += [{"method": name, "source": PUBLISHED_SOURCE, "dino": d, "clip_i": ci, "clip_t": ct}
           for name, d, ci, ct in PUBLISHED]
  subjects = []
  for score, real in zip(result.scores, result.real_bound):
    subjects.append({"subject": score.subject, "num_images": score.num_images,
                     **_computed(vars(score), random_weights),
                     "real_bound": _computed({**vars(real), "clip_t": None}, random_weights)})
  return {"mode": TEST_MODE_LABEL if random_weights else "converted DINO/CLIP weights",
          "settings": settings, "rows": rows, "subjects": subjects}


def to_markdown(report: dict[str, Any], random_weights: bool) -> str:
  """Renders `to_json`'s dict as Markdown tables.

  Args:
    report: from `to_json`.
    random_weights: label every computed number.

  Returns:
    The Markdown text.
  """
  keys = [_key(k, random_weights) for k, _ in METRICS]
  header = " | ".join(title for _, title in METRICS)
  lines = [f"# DreamBench: {report['rows'][0]['method']}", ""]
  if random_weights:
    lines += [f"**{TEST_MODE_LABEL}: DINO/CLIP weights are random; these numbers only check the "
              "pipeline and mean nothing.**", ""]
  lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()), "",
            f"| method | source | {header} |", "|---|---|---|---|---|"]
  for row in report["rows"]:
    computed = row["source"] == "this run"  # Published numbers are real, never labelled.
    cells = [_cell(row[_key(k, random_weights and computed)], random_weights and computed)
             for k, _ in METRICS]
    lines.append(f"| {row['method']} | {row['source']} | " + " | ".join(cells) + " |")
  lines += ["", "Published rows are copied from the SuTI paper (30 subjects, real weights) for "
            "context; they were not computed here.", "", "## Per subject", "",
            f"| subject | images | {header} | real DINO | real CLIP-I |",
            "|---|---|---|---|---|---|---|"]
  for s in report["subjects"]:
    cells = [_cell(s[k], random_weights) for k in keys]
    cells += [_cell(s["real_bound"][k], random_weights) for k in keys[:2]]
    lines.append(f"| {s['subject']} | {s['num_images']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(output_dir: str | pathlib.Path, result: dreambench.EvalResult,
                 random_weights: bool,
                 settings: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `dreambench.md` and `dreambench.json` under `output_dir`.

  Args:
    output_dir: created if missing.
    result: from `dreambench.evaluate`.
    random_weights: label every computed number as test-mode output.
    settings: run settings to record.

  Returns:
    (markdown path, json path).
  """
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  report = to_json(result, random_weights, settings)
  md_path, json_path = output_dir / "dreambench.md", output_dir / "dreambench.json"
  md_path.write_text(to_markdown(report, random_weights))
  json_path.write_text(json.dumps(report, indent=2) + "\n")
  return md_path, json_path


def write_grid(path: str | pathlib.Path, real: np.ndarray, generated: Sequence[np.ndarray],
               thumb_px: int = 96) -> pathlib.Path:
  """Writes a PNG grid: the subject's photos in row 0, then one row per prompt.

  Args:
    path: output PNG file.
    real: uint8 [M, H, W, 3] photos.
    generated: per prompt, uint8 [N, H, W, 3].
    thumb_px: side of each cell.

  Returns:
    The path written.
  """
  rows = [real] + list(generated)
  columns = max(len(r) for r in rows)
  grid = Image.new("RGB", (columns * thumb_px, len(rows) * thumb_px), "white")
  for y, row in enumerate(rows):
    for x, image in enumerate(row):
      thumb = Image.fromarray(np.asarray(image, np.uint8)).resize((thumb_px, thumb_px),
                                                                  Image.Resampling.BICUBIC)
      grid.paste(thumb, (x * thumb_px, y * thumb_px))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  grid.save(path)
  return path
