"""End to end: synthetic web -> Beam pipeline -> ICL-group TFRecords that parse and count."""

import collections
import glob
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from data_pipeline import build_icl_groups, read
from suti_jax.data import images, records
from suti_jax.data import synthetic as sy


def _run(input_path, output, renderer):
  return build_icl_groups.run([f"--input={input_path}", f"--output={output}",
                               f"--renderer={renderer}", "--num_shards=3",
                               "--runner=DirectRunner"])


def _groups(output):
  paths = sorted(glob.glob(os.path.join(output, "icl-*-of-*")))
  assert len(paths) == 3
  return paths, [records.parse_icl_group(r, source=s) for s, r in records.read_tfrecords(paths)]


def test_oracle_and_same_cluster_runs(tmp_path):
  pairs = sy.generate_web_pairs(12, seed=0, size_px=16)
  jsonl = read.write_jsonl_input(pairs, str(tmp_path / "web"))
  read.write_tfrecord_input(pairs, str(tmp_path / "web" / "web.tfrecord"))
  truth = {p.url: p.true_subject_id for p in pairs}

  summary = _run(jsonl, tmp_path / "oracle", "oracle")
  paths, groups = _groups(tmp_path / "oracle")
  stages, drops = summary["stages"], summary["drops"]
  assert stages["read"]["records"] == len(pairs)
  assert stages["cluster"]["clusters"] == 12
  assert summary["groups_written"] == len(groups) == stages["score_filter"]["groups"] > 0
  # Every rendered target is either written or dropped for a counted reason.
  assert stages["expert_render"]["targets"] == len(groups) + drops.get(
      "low_subject_fidelity", 0) + drops.get("low_text_fidelity", 0)
  assert drops["cluster_too_small"] >= 1  # The singleton clusters.
  assert drops.get("cluster_low_similarity", 0) + drops.get("image_outlier", 0) > 0
  assert json.load(open(tmp_path / "oracle" / "summary.json"))["drops"] == drops
  assert open(tmp_path / "oracle" / "dead_letter.jsonl").read() == ""

  by_kind = collections.Counter()
  pure = 0
  for g in groups:
    assert 1 <= len(g.exemplar_images) <= 5 and g.skill in sy.SKILLS and g.expert == "oracle"
    owners = {truth[u] for u in g.source_urls}
    assert "" not in owners  # Banners are outliers of every cluster.
    if len(owners) == 1:  # The heuristic filter may keep a stray image; most are pure.
      pure += 1
      subject = sy.make_subject(owners.pop())
      target = images.decode_array(g.target_image)
      np.testing.assert_array_equal(target,
                                    sy.render(subject, sy.parse_prompt(g.target_prompt), 16))
    assert all(g.target_prompt != c for c in g.exemplar_captions)
    by_kind[next(p.cluster_kind for p in pairs if p.url == g.source_urls[0])] += 1
  assert pure >= 0.8 * len(groups)
  assert "mixed_subjects" not in by_kind and by_kind["single_subject"] > 0
  # The in-graph parse spec of the tf.data reader accepts every record.
  for raw in tf.data.TFRecordDataset(paths):
    parsed = tf.io.parse_single_example(raw, records.ICL_FEATURES)
    assert int(parsed["schema_version"]) == records.SCHEMA_VERSION

  # The re-run is a fresh process through the CLI: protobuf map order and
  # string hashing differ between processes, the output bytes must not.
  subprocess.run([sys.executable, "-m", "data_pipeline.build_icl_groups", f"--input={jsonl}",
                  f"--output={tmp_path / 'again'}", "--renderer=oracle", "--num_shards=3"],
                 check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  for a, b in zip(paths, _groups(tmp_path / "again")[0]):
    assert open(a, "rb").read() == open(b, "rb").read()

  same = _run(str(tmp_path / "web" / "web.tfrecord-*"), tmp_path / "same", "same_cluster")
  _, same_groups = _groups(tmp_path / "same")
  assert same["groups_written"] == len(same_groups) > 0
  for g in same_groups:
    assert g.skill == "same_cluster" and g.expert == "same_cluster"
    target_url = g.source_urls[-1]
    assert target_url not in g.source_urls[:-1]  # The target is not an exemplar.
    assert g.target_image == records.encode_png(next(p.image for p in pairs if p.url == target_url))
