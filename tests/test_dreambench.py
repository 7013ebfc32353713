"""DreamBench reader, protocol bookkeeping, reports and the eval CLI (tiny random embedders)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from suti_jax.eval import dreambench
from suti_jax.eval import metrics
from suti_jax.eval import report

# The data is looked for in shared/ beside the clone (CI's layout);
# SUTI_DREAMBENCH_DIR points elsewhere.
DATA = pathlib.Path(os.environ.get(
    "SUTI_DREAMBENCH_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "dreambench"))
REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (DATA / "manifest.json").is_file(),
                                reason=f"DreamBench data not found at {DATA}")


@pytest.fixture(scope="module")
def embedders():
  return metrics.Embedders.random(seed=0)


def test_full_benchmark_and_prompts():
  bench = dreambench.load_benchmark(DATA)
  assert len(bench.subjects) == 25
  dog = next(s for s in bench.subjects if s.name == "dog")
  backpack = next(s for s in bench.subjects if s.name == "backpack")
  assert dog.live and not backpack.live and dog.class_noun == "dog"
  assert len(bench.prompts(dog)) == len(bench.prompts(backpack)) == 25
  assert bench.prompts(dog)[0] == "a dog in the jungle"
  assert "a dog wearing a red hat" in bench.prompts(dog)
  assert "a dog wearing a red hat" not in bench.prompts(backpack)
  assert bench.prompts(dog, unique_token="sks")[20] == "a red sks dog"


def _copy_two_subjects(tmp_path):
  """A DreamBench folder in tmp_path with the manifest entries and photos of two subjects."""
  manifest = json.loads((DATA / "manifest.json").read_text())
  manifest["subjects"] = {k: manifest["subjects"][k] for k in ("can", "dog")}
  for entry in manifest["subjects"].values():
    for rel in entry["images"]:
      (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(DATA / rel, tmp_path / rel)
  shutil.copy(DATA / "prompts_and_classes.txt", tmp_path)
  return manifest


def test_manifest_errors_name_subject_and_path(tmp_path):
  manifest = _copy_two_subjects(tmp_path)
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  assert [s.name for s in dreambench.load_benchmark(tmp_path).subjects] == ["can", "dog"]
  missing = tmp_path / manifest["subjects"]["dog"]["images"][2]
  missing.unlink()
  with pytest.raises(dreambench.BenchmarkError, match=f"'dog'.*{missing}.*missing"):
    dreambench.load_benchmark(tmp_path)
  with pytest.raises(dreambench.BenchmarkError, match="unknown subjects.*'cat'"):
    dreambench.load_benchmark(tmp_path, subjects=["can", "cat"])
  manifest["subjects"]["can"]["class"] = "spaceship"
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(dreambench.BenchmarkError, match="'can'.*'spaceship'.*class table"):
    dreambench.load_benchmark(tmp_path, subjects=["can"])


def test_real_images_score_the_bound_and_noise_scores_lower(embedders):
  bench = dreambench.load_benchmark(DATA, subjects=["can", "dog"])
  real = dreambench.evaluate(bench, dreambench.RealImagesMethod(), embedders, num_images=2,
                             max_prompts=2)
  noise = dreambench.evaluate(bench, dreambench.NoiseMethod(), embedders, num_images=2,
                              max_prompts=2)
  for got, bound in zip(real.scores, real.real_bound):
    assert got.subject == bound.subject
    np.testing.assert_allclose([got.dino, got.clip_i], [bound.dino, bound.clip_i], rtol=0,
                               atol=1e-9)
  assert [s.num_images for s in noise.scores] == [4, 4]
  # The bound leaves self-pairs out: it is the mean off-diagonal cosine of the photos.
  photos = dreambench.load_images(bench.subjects[0])
  sim = metrics.cosine(embedders.embed_images(photos).dino, embedders.embed_images(photos).dino)
  off_diagonal = sim[~np.eye(len(photos), dtype=bool)].mean()
  np.testing.assert_allclose(real.real_bound[0].dino, off_diagonal, rtol=0, atol=1e-6)
  assert off_diagonal < 0.99
  bound, got = metrics.overall(noise.real_bound), metrics.overall(noise.scores)
  assert got["dino"] < bound["dino"] - 0.1
  assert got["clip_i"] < bound["clip_i"] - 0.05
  assert bound["dino"] == metrics.overall(real.real_bound)["dino"]


def test_directory_method_reads_layout(tmp_path):
  bench = dreambench.load_benchmark(DATA, subjects=["can"])
  subject = bench.subjects[0]
  photos = dreambench.load_images(subject)
  for n in range(2):
    (tmp_path / "can").mkdir(exist_ok=True)
    Image.fromarray(photos[n]).save(tmp_path / "can" / f"1_{n}.png")
  method = dreambench.DirectoryMethod(tmp_path, bench)
  np.testing.assert_array_equal(method.generate(subject, bench.prompts(subject)[1], 2, 0),
                                photos[:2])
  with pytest.raises(FileNotFoundError, match="can/0_0.png"):
    method.generate(subject, bench.prompts(subject)[0], 2, 0)
  with pytest.raises(dreambench.BenchmarkError, match="not one of"):
    method.generate(subject, "a can on the moon", 2, 0)


def _result():
  scores = (metrics.Scores("can", 0.5, 0.7, 0.25, 8), metrics.Scores("dog", 0.3, 0.6, 0.2, 8))
  bound = (metrics.Scores("can", 0.8, 0.9, None, 6), metrics.Scores("dog", 0.6, 0.8, None, 5))
  return dreambench.EvalResult("my method", scores, bound)


@pytest.mark.parametrize("random_weights", [False, True])
def test_report_rows(tmp_path, random_weights):
  md_path, json_path = report.write_report(tmp_path, _result(), random_weights, {"seed": 0})
  data = json.loads(json_path.read_text())
  rows = {r["method"] + "|" + r["source"]: r for r in data["rows"]}
  label = f" [{report.TEST_MODE_LABEL}]" if random_weights else ""
  assert rows["my method|this run"]["dino" + label] == pytest.approx(0.4)
  assert rows["real images (upper bound)|this run"]["dino" + label] == pytest.approx(0.7)
  assert rows["real images (upper bound)|this run"]["clip_t" + label] is None
  assert rows[f"SuTI|{report.PUBLISHED_SOURCE}"]["dino"] == 0.741
  assert len(data["rows"]) == 2 + len(report.PUBLISHED)
  md = md_path.read_text()
  assert "| method | source | DINO | CLIP-I | CLIP-T |" in md
  assert f"| SuTI | {report.PUBLISHED_SOURCE} | 0.741 | 0.819 | 0.304 |" in md
  mine = next(line for line in md.splitlines() if line.startswith("| my method |"))
  assert ("RANDOM-WEIGHTS TEST MODE" in mine) == random_weights
  assert mine.count("0.") == 3
  assert ("dino" in rows["my method|this run"]) != random_weights


def test_grid_layout(tmp_path):
  real = np.zeros((5, 20, 20, 3), np.uint8)
  generated = [np.full((2, 30, 30, 3), 255, np.uint8)] * 3
  grid = np.asarray(Image.open(report.write_grid(tmp_path / "g.png", real, generated, 8)))
  assert grid.shape == (4 * 8, 5 * 8, 3)
  assert grid[:8].max() == 0 and grid[8:, :16].min() == 255


def _run_cli(tmp_path, *flags):
  env = {k: v for k, v in os.environ.items() if k not in (metrics.DINO_ENV, metrics.CLIP_ENV)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
      [sys.executable, "-m", "launch.eval", f"--dreambench_dir={DATA}", "--subjects=can,dog",
       "--max_prompts=2", "--num_images=2", f"--output_dir={tmp_path}", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_cli_test_mode_writes_reports(tmp_path):
  proc = _run_cli(tmp_path, "--method=noise", "--random_weights_test_mode")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "dreambench.md").read_text()
  assert "RANDOM-WEIGHTS TEST MODE" in md and "| noise | this run |" in md
  assert len(json.loads((tmp_path / "dreambench.json").read_text())["subjects"]) == 2
  assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["can.png", "dog.png"]


def test_cli_refuses_without_weights(tmp_path):
  proc = _run_cli(tmp_path, "--method=real")
  assert proc.returncode != 0
  assert "refusing to report DINO/CLIP scores without weights" in proc.stderr
  assert not (tmp_path / "dreambench.md").exists()
