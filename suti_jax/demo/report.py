"""The demo's outputs: REPORT.md (tables, timings and a paragraph read off the
numbers), metrics.json, and PNG grids (exemplars | methods | ground truth per prompt).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from suti_jax.data import synthetic
from suti_jax.demo import evaluate

# Methods shown in the grids, after the exemplar columns.
GRID_METHODS = ("suti_v2", "suti_v1", "dreambooth", "text_only", "ground_truth")
# Their column titles in the PNGs.
GRID_TITLES = {"suti_v2": "SuTI v2", "suti_v1": "SuTI v1", "dreambooth": "DreamBooth",
               "text_only": "text-only", "ground_truth": "truth"}
_GRID_SCALE = 4
_GAP_PX = 2
_TITLE_PX = 24
_FONT_PX = 12
_TEXT_RGB = (40, 40, 40)
# Differences smaller than this are called ties in the paragraph.
_TIE = 0.01
CAVEAT = ("Read these numbers at their scale: UNets of about a hundred thousand parameters, "
          "16 px images, minutes of CPU training, a few dozen held-out prompts. Differences of a "
          "few hundredths are within the noise of one seed, and the judges' own held-out "
          "accuracy (below) limits what the fidelity columns can tell apart. The paper's "
          "ranking is a claim about Imagen-scale models; this report only says what happened "
          "here.")


def _fmt(value: float | None, digits: int = 3) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def _arrow(metric: str) -> str:
  better = evaluate.METRICS[metric][1]
  return "" if better is None else (" ↑" if better else " ↓")


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str:
  if value is None or not interval:
    return _fmt(value)
  return f"{_fmt(value)} [{_fmt(interval[0])}, {_fmt(interval[1])}]"


def methods_table(methods: dict[str, dict[str, float]],
                  intervals: dict[str, dict[str, Sequence[float]]] | None = None) -> list[str]:
  """Markdown rows: one per method present, one column per metric (mean [95% interval])."""
  metrics = list(evaluate.METRICS)
  intervals = intervals or {}
  lines = ["| method | " + " | ".join(evaluate.METRICS[m][0] + _arrow(m) for m in metrics) + " |",
           "|---" * (len(metrics) + 1) + "|"]
  for method in evaluate.METHODS:
    if method in methods:
      values = [_with_interval(methods[method].get(m), intervals.get(method, {}).get(m))
                for m in metrics]
      lines.append(f"| {evaluate.METHOD_LABELS[method]} | " + " | ".join(values) + " |")
  return lines


def per_skill_table(per_skill: dict[str, dict[str, dict[str, float]]], metric: str) -> list[str]:
  """Markdown rows of one metric: methods x skills."""
  skills = sorted({s for by_skill in per_skill.values() for s in by_skill},
                  key=synthetic.SKILLS.index)
  lines = [f"| {evaluate.METRICS[metric][0]} | " + " | ".join(skills) + " |",
           "|---" * (len(skills) + 1) + "|"]
  for method in evaluate.METHODS:
    if method in per_skill:
      values = [_fmt(per_skill[method].get(s, {}).get(metric)) for s in skills]
      lines.append(f"| {evaluate.METHOD_LABELS[method]} | " + " | ".join(values) + " |")
  return lines


def _compare(methods: dict[str, dict[str, float]], a: str, b: str, metric: str) -> str:
  """'beats' / 'trails' / 'ties' of method a against b on a directional metric."""
  higher_better = evaluate.METRICS[metric][1]
  va, vb = methods[a][metric], methods[b][metric]
  gain = (va - vb) if higher_better else (vb - va)
  verdict = "ties" if abs(gain) < _TIE else ("beats" if gain > 0 else "does not beat")
  return (f"{evaluate.METHOD_LABELS[a]} {verdict} {evaluate.METHOD_LABELS[b]} on "
          f"{evaluate.METRICS[metric][0]} ({_fmt(va)} vs {_fmt(vb)})")


def findings(metrics: dict[str, Any]) -> list[str]:
  """Sentences read off the numbers (no claim the numbers do not support)."""
  methods = metrics["methods"]
  out = []
  if "suti_v2" in methods:
    for other in ("text_only", "copy_exemplar", "dreambooth", "suti_v1"):
      if other in methods:
        out.append("; ".join(_compare(methods, "suti_v2", other, m)
                             for m in ("subject_fidelity", "text_fidelity", "pixel_mse")) + ".")
  if {"suti_v1", "suti_v2"} <= set(methods):
    v1 = methods["suti_v1"]["nearest_exemplar_mse"]
    v2 = methods["suti_v2"]["nearest_exemplar_mse"]
    copies = "closer to" if v1 < v2 else "not closer to"
    out.append(f"Copying (the v1 finding): SuTI v1's images are {copies} an exemplar than "
               f"v2's (pixel MSE to the nearest exemplar {_fmt(v1)} vs {_fmt(v2)}; "
               f"copy-the-nearest-exemplar: "
               f"{_fmt(methods.get('copy_exemplar', {}).get('nearest_exemplar_mse'))}).")
  timing = metrics.get("personalization_s", {})
  if timing.get("suti_v2") and timing.get("dreambooth"):
    ratio = timing["dreambooth"] / timing["suti_v2"]
    out.append(f"Personalisation per subject: SuTI {timing['suti_v2']:.1f} s vs DreamBooth "
               f"{timing['dreambooth']:.1f} s (fine-tune + render), {ratio:.1f}x.")
  truth = methods.get("ground_truth")
  if truth:
    out.append(f"The judges' ceiling (ground truth): subject fidelity "
               f"{_fmt(truth['subject_fidelity'])}, same-subject rate "
               f"{_fmt(truth['subject_match'])}, text fidelity {_fmt(truth['text_fidelity'])}.")
  return out


def target_checks(metrics: dict[str, Any]) -> list[tuple[str, str, bool]]:
  """The demo's bars for "SuTI personalises": (criterion, measured, met) each.

  A missing number counts as not met.
  """
  m, judges = metrics["methods"], metrics.get("judges", {})
  timing = metrics.get("personalization_s", {})
  eval_set = metrics.get("eval_set", {})

  def get(method: str, metric: str) -> float:
    return m.get(method, {}).get(metric, float("nan"))

  v2_subject, v2_text = get("suti_v2", "subject_fidelity"), get("suti_v2", "text_fidelity")
  speedup = (timing.get("dreambooth", float("nan")) / timing["suti_v2"]
             if timing.get("suti_v2") else float("nan"))
  prompts = eval_set.get("num_prompts", 0) // max(eval_set.get("num_subjects", 1), 1)
  rows = [
      ("SuTI v2 subject fidelity >= text-only + 0.20",
       f"{v2_subject:.3f} vs {get('text_only', 'subject_fidelity') + 0.2:.3f}",
       v2_subject >= get("text_only", "subject_fidelity") + 0.2),
      ("SuTI v2 subject fidelity >= 0.9 x DreamBooth's",
       f"{v2_subject:.3f} vs {0.9 * get('dreambooth', 'subject_fidelity'):.3f}",
       v2_subject >= 0.9 * get("dreambooth", "subject_fidelity")),
      ("SuTI v2 same-subject rate >= 0.6", f"{get('suti_v2', 'subject_match'):.3f}",
       get("suti_v2", "subject_match") >= 0.6),
      ("SuTI v2 text fidelity >= SuTI v1's and text-only's",
       f"{v2_text:.3f} vs {get('suti_v1', 'text_fidelity'):.3f} / "
       f"{get('text_only', 'text_fidelity'):.3f}",
       v2_text >= max(get("suti_v1", "text_fidelity"), get("text_only", "text_fidelity"))),
      ("SuTI v1 copies more than v2 (lower MSE to the nearest exemplar)",
       f"{get('suti_v1', 'nearest_exemplar_mse'):.4f} vs "
       f"{get('suti_v2', 'nearest_exemplar_mse'):.4f}",
       get("suti_v1", "nearest_exemplar_mse") < get("suti_v2", "nearest_exemplar_mse")),
      ("personalisation >= 20x faster than a DreamBooth expert", f"{speedup:.1f}x",
       speedup >= 20),
      ("judges: held-out subject-pair accuracy >= 0.9",
       f"{judges.get('subject_pair_accuracy', float('nan')):.3f}",
       judges.get("subject_pair_accuracy", 0.0) >= 0.9),
      ("judges: held-out attribute accuracy >= 0.8",
       f"{judges.get('text_attribute_accuracy', float('nan')):.3f}",
       judges.get("text_attribute_accuracy", 0.0) >= 0.8),
      (">= 12 held-out subjects x >= 10 prompts",
       f"{eval_set.get('num_subjects', 0)} x {prompts}",
       eval_set.get("num_subjects", 0) >= 12 and prompts >= 10),
  ]
  return [(name, value, bool(met)) for name, value, met in rows]


def _targets_lines(metrics: dict[str, Any]) -> list[str]:
  lines = ["| target | measured | met |", "|---|---|---|"]
  lines += [f"| {name} | {value} | {'yes' if met else 'no'} |"
            for name, value, met in target_checks(metrics)]
  return lines


def _curve_lines(curve: dict[str, list[dict[str, float]]]) -> list[str]:
  """Held-out subject / text fidelity of each SuTI model at its saved steps."""
  lines = ["| model | step | subject fidelity | same-subject rate | text fidelity |",
           "|---|---|---|---|---|"]
  for version, points in sorted(curve.items(), reverse=True):
    lines += [f"| SuTI {version} | {p['step']} | {_fmt(p['subject_fidelity'])} | "
              f"{_fmt(p['subject_match'])} | {_fmt(p['text_fidelity'])} |" for p in points]
  return lines


def _judges_lines(judges: dict[str, float]) -> list[str]:
  keys = ("subject_pair_accuracy", "subject_threshold", "text_attribute_accuracy",
          "text_score_matched", "text_score_mismatched")
  lines = ["| judge metric (held-out subjects) | value |", "|---|---|"]
  lines += [f"| {k} | {_fmt(judges[k])} |" for k in keys if k in judges]
  return lines


def render_markdown(metrics: dict[str, Any], grids: Sequence[dict[str, Any]] = ()) -> str:
  """The whole REPORT.md.

  Args:
    metrics: as written to metrics.json: 'methods', 'per_skill', 'judges',
      'personalization_s' (method -> steady-state seconds per subject),
      'personalization_timed_subjects', 'stages' (name -> {'wall_s', 'cpu_s',
      'compile_s'}), 'data' (ICL group counts), 'eval_set' (counts), 'training'
      (stage -> final scalars), 'scale' (a one-line description of the run).
    grids: [{'path': relative PNG path, 'subject': id, 'prompts': [str]}].

  Returns:
    Markdown text.
  """
  eval_set = metrics.get("eval_set", {})
  lines = ["# suti_jax demo report", "",
           f"Scale: {metrics.get('scale', 'n/a')}", "",
           f"Held-out evaluation: {eval_set.get('num_subjects', '?')} subjects never seen in "
           f"any training, {eval_set.get('num_prompts', '?')} prompts over the five skills, "
           "each with its exact ground-truth image. Images are compared at the base "
           "resolution.", "", "## Headline: method x metric", ""]
  lines += methods_table(metrics["methods"], metrics.get("intervals"))
  lines += ["", "↑ higher is better, ↓ lower is better; the last column is neither: it shows "
            "how close a method's images are to one of its exemplars (copying). Brackets: "
            "95% intervals from a bootstrap over held-out subjects."]
  lines += ["", "## What the numbers show", ""]
  lines += [f"- {s}" for s in findings(metrics)]
  lines += ["", CAVEAT, "", "## Targets", "",
            "What the demo is meant to show, checked against this run's numbers.", ""]
  lines += _targets_lines(metrics)
  if metrics.get("learning_curve"):
    lines += ["", "## Learning curve", "", "Held-out fidelity of each SuTI model at its "
              "saved training steps (same prompts, seeds and sampler as the headline).", ""]
    lines += _curve_lines(metrics["learning_curve"])
  lines += ["", "## Per skill", ""]
  for metric in ("subject_fidelity", "text_fidelity", "pixel_mse"):
    lines += per_skill_table(metrics["per_skill"], metric) + [""]
  lines += ["## Judges", "", "Subject fidelity and text fidelity come from small CNN judges "
            "trained on other synthetic subjects; their accuracy on held-out subjects bounds "
            "what those columns can resolve.", ""]
  lines += _judges_lines(metrics.get("judges", {}))
  lines += ["", "## Training data (ICL groups)", "", "| set | groups written | drops |",
            "|---|---|---|"]
  for name, data in metrics.get("data", {}).items():
    drops = ", ".join(f"{k}: {v}" for k, v in sorted(data.get("drops", {}).items())) or "none"
    lines.append(f"| {name} | {data.get('groups_written', 'n/a')} | {drops} |")
  training = metrics.get("training", {})
  if training:
    lines += ["", "## Training", "", "| stage | steps | final loss |", "|---|---|---|"]
    lines += [f"| {name} | {t.get('step', 0):.0f} | {_fmt(t.get('train/loss'))} |"
              for name, t in training.items()]
  prompts_per_subject = eval_set.get("num_prompts", 0) // max(eval_set.get("num_subjects", 1), 1)
  lines += ["", "## Timings", "",
            f"Personalisation = everything needed to render one new subject's "
            f"{prompts_per_subject} prompts: SuTI samples with the exemplars in context; "
            "DreamBooth makes class-prior images, fine-tunes an expert and samples. Each is "
            f"the mean over {metrics.get('personalization_timed_subjects', '?')} held-out "
            "subjects, one call each, after a warm-up subject that compiles; the timing "
            "stage runs with no other stage beside it.",
            "", "| personalisation per subject | seconds |", "|---|---|"]
  timing = metrics.get("personalization_s", {})
  lines += [f"| {evaluate.METHOD_LABELS[m]} | {timing[m]:.1f} |"
            for m in evaluate.METHODS if m in timing]
  stages = metrics.get("stages", {})
  lines += ["", "Stages run two at a time where their dependencies allow, so a stage's wall "
            "time includes sharing the cores, and CPU seconds count the whole process "
            "while the stage ran. Compile s counts the XLA compiles of the stage itself "
            "(near 0 where the workdir's compilation cache already held its programs).", "",
            "| stage | wall s | CPU s | compile s |", "|---|---|---|---|"]
  lines += [f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | {_fmt(t.get('compile_s'), 1)} |"
            for name, t in stages.items()]
  spans = [(t["start_time"], t["end_time"]) for t in stages.values() if "start_time" in t]
  if spans:
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    compile_s = sum(t.get("compile_s", 0.0) for t in stages.values())
    lines.append(f"| all stages, first start to last end | {last - first:.1f} | | "
                 f"{compile_s:.1f} |")
  if grids:
    lines += ["", "## Grids", "",
              "Each row is one prompt. Columns: the exemplars, then "
              + " | ".join(evaluate.METHOD_LABELS[m] for m in GRID_METHODS) + ".", ""]
    for grid in grids:
      lines += [f"### {grid['subject']}", "", f"![{grid['subject']}]({grid['path']})", ""]
      lines += [f"{i + 1}. {p}" for i, p in enumerate(grid["prompts"])] + [""]
  return "\n".join(lines) + "\n"


def grid_image(exemplars: np.ndarray, rows: Sequence[Sequence[np.ndarray]],
               prompts: Sequence[str]) -> np.ndarray:
  """One subject's grid, titled: per prompt its exemplars, one image per method
  (`GRID_METHODS` order) and the prompt's text.

  Args:
    exemplars: uint8 [K, S, S, 3], the subject's exemplars.
    rows: per prompt, the methods' uint8 [S, S, 3] images.
    prompts: one text per row.

  Returns:
    uint8 [H, W, 3]: a title band over the columns, then one band per prompt;
    images upscaled x4 (nearest).

  Raises:
    ValueError: `prompts` and `rows` differ in length, or a row does not hold
      one image per `GRID_METHODS` entry.
  """
  if len(prompts) != len(rows):
    raise ValueError(f"grid: {len(rows)} rows but {len(prompts)} prompts")
  if any(len(images) != len(GRID_METHODS) for images in rows):
    raise ValueError(f"grid: every row needs {len(GRID_METHODS)} images ({GRID_METHODS})")
  tile = exemplars.shape[1] * _GRID_SCALE
  cell = tile + _GAP_PX * _GRID_SCALE
  font = ImageFont.load_default(size=_FONT_PX)
  # Exemplar columns, a half-cell spacer, the method columns, then the prompt.
  method_x = [len(exemplars) * cell + cell // 2 + i * cell for i in range(len(GRID_METHODS))]
  text_x = method_x[-1] + cell
  width = text_x + max((int(font.getlength(p)) for p in prompts), default=0) + cell // 2
  canvas = Image.new("RGB", (width, _TITLE_PX + len(rows) * cell), "white")
  draw = ImageDraw.Draw(canvas)

  def title(text: str, left: int, span: int) -> None:
    draw.text((left + (span - font.getlength(text)) / 2, _TITLE_PX // 2), text,
              fill=_TEXT_RGB, font=font, anchor="lm")

  title("exemplars", 0, len(exemplars) * cell - cell + tile)
  for x, method in zip(method_x, GRID_METHODS):
    title(GRID_TITLES[method], x, tile)
  column_x = [i * cell for i in range(len(exemplars))] + method_x
  for r, (images, prompt) in enumerate(zip(rows, prompts)):
    top = _TITLE_PX + r * cell
    for x, image in zip(column_x, [*exemplars, *images]):
      canvas.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST),
                   (x, top))
    draw.text((text_x, top + tile // 2), prompt, fill=_TEXT_RGB, font=font, anchor="lm")
  return np.asarray(canvas)


def write(report_dir: str, metrics: dict[str, Any],
          grids: Sequence[tuple[str, np.ndarray, Sequence[str]]] = ()) -> dict[str, str]:
  """Writes REPORT.md, metrics.json and the grid PNGs.

  Args:
    report_dir: output folder (created).
    metrics: see `render_markdown`.
    grids: (subject id, uint8 grid image, prompts of its rows) each.

  Returns:
    name -> path of everything written.
  """
  os.makedirs(report_dir, exist_ok=True)
  paths, grid_entries = {}, []
  for subject, image, prompts in grids:
    name = f"grid_{subject}.png"
    Image.fromarray(image).save(os.path.join(report_dir, name))
    paths[name] = os.path.join(report_dir, name)
    grid_entries.append({"path": name, "subject": subject, "prompts": list(prompts)})
  paths["metrics.json"] = os.path.join(report_dir, "metrics.json")
  with open(paths["metrics.json"], "w") as f:
    json.dump(dict(metrics, grids=grid_entries), f, indent=1, sort_keys=True)
  paths["REPORT.md"] = os.path.join(report_dir, "REPORT.md")
  with open(paths["REPORT.md"], "w") as f:
    f.write(render_markdown(metrics, grid_entries))
  return paths
