"""End to end: synthetic web -> Beam pipeline -> ICL-group TFRecords that parse and count."""

import collections
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import build_icl_groups, merge_parts, read
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


def test_parts_merge_into_the_whole_runs_output(tmp_path):
  pairs = sy.generate_web_pairs(12, seed=0, size_px=16)
  pairs.append(pairs[0])  # A duplicate URL: every part drops it, the merge counts it once.
  jsonl = read.write_jsonl_input(pairs, str(tmp_path / "web"))
  with open(jsonl, "a") as f:
    f.write("{not json\n")  # A dead letter every part writes, the merge keeps once.
  flags = [f"--input={jsonl}", "--renderer=oracle", "--num_shards=3", "--render_batch_size=2",
           "--runner=DirectRunner"]
  whole = build_icl_groups.run(flags + [f"--output={tmp_path / 'whole'}"])
  whole_paths, _ = _groups(tmp_path / "whole")
  part_dirs = [str(tmp_path / f"part{part}") for part in range(2)]
  for part, folder in enumerate(part_dirs):
    build_icl_groups.run(flags + [f"--output={folder}", "--num_parts=2", f"--part={part}"])
    paths, groups = _groups(folder)
    assert all(os.path.basename(p).startswith(f"icl-part{part}-") for p in paths)
    assert groups  # Each part renders a share.
  assert whole["drops"]["duplicate_url"] == whole["drops"]["invalid_json"] == 1

  merged = merge_parts.run([f"--input={d}" for d in part_dirs[::-1]]  # Any order.
                           + [f"--output={tmp_path / 'merged'}", "--runner=DirectRunner"])
  merged_paths, _ = _groups(tmp_path / "merged")
  assert [os.path.basename(p) for p in merged_paths] == [os.path.basename(p)
                                                         for p in whole_paths]
  for a, b in zip(whole_paths, merged_paths):
    assert open(a, "rb").read() == open(b, "rb").read()
  for key in ("stages", "drops", "groups_written"):
    assert merged[key] == whole[key], key
  assert json.load(open(tmp_path / "merged" / "summary.json")) == merged
  assert (open(tmp_path / "merged" / "dead_letter.jsonl").read()
          == open(tmp_path / "whole" / "dead_letter.jsonl").read())

  with pytest.raises(ValueError, match=r"expected the summaries of parts 0..1, got parts \[1\]"):
    merge_parts.merge_parts(part_dirs[1:], str(tmp_path / "m1"))
  with pytest.raises(ValueError, match="one of the parts' folders"):
    merge_parts.merge_parts(part_dirs, part_dirs[0])
  with pytest.raises(FileNotFoundError, match="summary.json is missing"):
    merge_parts.merge_parts(part_dirs + [str(tmp_path / "none")], str(tmp_path / "m2"))
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in part_dirs]
  summaries[1]["stages"]["cluster"]["clusters"] += 1
  with pytest.raises(ValueError, match=r"part 1's counts before rendering differ.*cluster/clusters"):
    merge_parts.combine_summaries(summaries, "out")
  summaries[1]["options"]["seed"] = 7
  with pytest.raises(ValueError, match=r"part 1 ran with other options than part 0: \['seed'\]"):
    merge_parts.combine_summaries(summaries, "out")


def test_part_outside_num_parts_is_refused(tmp_path):
  with pytest.raises(ValueError, match="--part=2 must be in"):
    build_icl_groups.run([f"--input={tmp_path}/none.jsonl", f"--output={tmp_path / 'out'}",
                          "--num_parts=2", "--part=2", "--runner=DirectRunner"])
