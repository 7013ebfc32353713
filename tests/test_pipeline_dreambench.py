"""DreamBench folders as pipeline input: each subject becomes one URL cluster
(real-photo ICL groups in SuTI v1 style)."""

import json
import os
import pathlib
import shutil

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from data_pipeline import cluster, read

DATA = pathlib.Path(os.environ.get(
    "SUTI_DREAMBENCH_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "dreambench"))
pytestmark = pytest.mark.skipif(not (DATA / "manifest.json").exists(),
                                reason=f"DreamBench not found at {DATA}")
SUBJECTS = ("backpack", "dog")


@pytest.fixture
def two_subjects(tmp_path):
  """A DreamBench folder with two subjects, read from the shared copy."""
  manifest = json.loads((DATA / "manifest.json").read_text())
  manifest["subjects"] = {k: manifest["subjects"][k] for k in SUBJECTS}
  for name in SUBJECTS:
    shutil.copytree(DATA / "images" / name, tmp_path / "images" / name)
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  shutil.copy(DATA / "prompts_and_classes.txt", tmp_path)
  return tmp_path, manifest


def test_dreambench_subjects_become_one_cluster_each(two_subjects):
  root, manifest = two_subjects
  assert read.infer_format(str(root)) == "dreambench"
  expected = [(f"dreambench.local/{name}", len(manifest["subjects"][name]["images"]),
               f"a photo of a {manifest['subjects'][name]['class']}")
              for name in SUBJECTS]
  with test_pipeline.TestPipeline() as p:
    out = p | read.ReadWebPairs(str(root))
    clusters = out.records | cluster.ClusterByUrl(cluster.UrlRules())
    assert_that(clusters | beam.Map(
        lambda c: (c.key, len(c.members), c.members[0].caption)), equal_to(expected))
    assert_that(out.dead_letter, equal_to([]), label="no dead letters")


def test_dreambench_missing_photo_is_a_named_error(two_subjects):
  root, _ = two_subjects
  missing = root / "images" / "dog" / "00.jpg"
  missing.unlink()
  with pytest.raises(Exception, match="00.jpg"):
    read.dreambench_rows(str(root))
