"""Per-stage tests of the Beam apprenticeship pipeline (TestPipeline + assert_that)."""

import dataclasses
import json
import os

import apache_beam as beam
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cluster, cluster_filter, consolidate, expert_render
from data_pipeline import prompt_writer, read, recaption, score_filter, write
from suti_jax.data import captions
from suti_jax.data import pipeline_interfaces
from suti_jax.data import records
from suti_jax.data.pipeline_interfaces import Cluster, PromptSpec, RenderTask, WebRecord
from suti_jax.data import synthetic as sy


def _run(build):
  p = test_pipeline.TestPipeline()
  build(p)
  result = p.run()
  result.wait_until_finish()
  return write.counters(result)


def _record(i, subject_seed, scene=sy.Scene(), url=None, caption="a toy"):
  subject = sy.make_subject(subject_seed)
  return WebRecord(f"id{i}", url or f"https://shop.example.com/products/p/img{i}.jpg",
                   caption, records.encode_png(sy.render(subject, scene, 16)),
                   subject.subject_id)


def _cluster(subject_seeds, key="shop.example.com/products/p", description="toy"):
  scenes = [sy.Scene(), sy.Scene(background="beach"), sy.Scene(position="left"),
            sy.Scene(accessory="hat"), sy.Scene(scale="small")]
  members = tuple(_record(i, s, scenes[i % len(scenes)], caption=f"a red toy {i}")
                  for i, s in enumerate(subject_seeds))
  return Cluster(key, members, description)


def test_read_jsonl_and_dead_letters(tmp_path):
  pairs = sy.generate_web_pairs(3, seed=0, size_px=16)
  path = read.write_jsonl_input(pairs, str(tmp_path))
  (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
  with open(path, "a") as f:
    f.write("{not json\n")
    f.write(json.dumps({"url": "https://x.com/a/b/1.jpg", "caption": "c",
                        "image_path": "images/missing.png"}) + "\n")
    f.write(json.dumps({"url": "https://x.com/a/b/2.jpg", "caption": "c",
                        "image_path": "images/bad.png", "id": "bad"}) + "\n")
    f.write(json.dumps({"url": "ftp:/nohost", "caption": "c",
                        "image_path": "images/000000.png", "id": "badurl"}) + "\n")

  def build(p):
    out = p | read.ReadWebPairs(path)
    assert_that(out.records | beam.Map(lambda r: (r.url, r.true_subject_id)),
                equal_to([(q.url, q.true_subject_id) for q in pairs]), label="records")
    assert_that(out.dead_letter | beam.Map(lambda d: d["reason"]),
                equal_to(["invalid_json", "missing_image", "undecodable_image", "invalid_url"]),
                label="dead")

  counts = _run(build)
  assert counts["read/records"] == len(pairs)
  assert counts["drop/undecodable_image"] == counts["drop/invalid_url"] == 1


def test_read_tfrecord_with_a_corrupt_record(tmp_path):
  pairs = sy.generate_web_pairs(2, seed=1, size_px=16)
  paths = read.write_tfrecord_input(pairs, str(tmp_path / "web"), num_shards=1)
  with tf.io.TFRecordWriter(str(tmp_path / "junk-00000-of-00001")) as w:
    w.write(b"garbage")

  def build(p):
    out = p | read.ReadWebPairs(str(tmp_path / "*-of-*"), "tfrecord")
    assert_that(out.records | beam.Map(lambda r: r.example_id),
                equal_to([f"web-{i:06d}" for i in range(len(pairs))]), label="records")
    assert_that(out.dead_letter | beam.Map(lambda d: d["reason"]),
                equal_to(["invalid_record"]), label="dead")

  assert len(paths) == 1
  _run(build)


def test_url_normalisation_and_clustering():
  rules = cluster.UrlRules()
  key = "shop-1.example.com/products/toy-12"
  for url in ("https://shop-1.example.com/products/toy-12/img0.jpg",
              "https://WWW.Shop-1.Example.com/products/toy-12/img3.jpg?v=2#zoom"):
    assert cluster.cluster_key(url, rules) == key
  assert cluster.cluster_key("https://a.com/p/q/r/i.jpg", cluster.UrlRules(path_depth=1)) == "a.com/p"
  assert cluster.cluster_key("https://www.a.com/p/q/i.jpg",
                             cluster.UrlRules(keep_www=True)) == "www.a.com/p/q"
  records_in = [_record(0, 1, url="https://shop-1.example.com/products/toy-12/img0.jpg"),
                _record(1, 1, url="https://www.shop-1.example.com/products/toy-12/img0.jpg?v=2"),
                _record(2, 1, url="https://shop-1.example.com/products/toy-12/img1.jpg"),
                _record(3, 2, url="https://shop-1.example.com/products/ball-3/img0.jpg")]

  def build(p):
    clusters = p | beam.Create(records_in) | cluster.ClusterByUrl()
    assert_that(clusters | beam.Map(lambda c: (c.key, [m.example_id for m in c.members])),
                equal_to([(key, ["id0", "id2"]),
                          ("shop-1.example.com/products/ball-3", ["id3"])]))

  assert _run(build)["drop/duplicate_url"] == 1


def test_cluster_filter_keeps_one_subject_drops_mixes_and_outliers():
  cfg = cluster_filter.ClusterFilterConfig()
  embedder = cluster_filter.ColourEmbedder()
  single = _cluster([5] * 5)
  with_outlier = _cluster([5] * 5 + [77])
  mixed = _cluster([1, 2, 3, 4, 6], key="mixed")
  small = _cluster([5, 5], key="small")
  emb = embedder.embed(cluster_filter.decode_members(with_outlier))
  assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  kept, removed, reason = cluster_filter.filter_cluster(with_outlier, emb, cfg)
  assert reason == "" and removed == 1
  assert [m.true_subject_id for m in kept.members] == [single.members[0].true_subject_id] * 5

  def build(p):
    out = p | beam.Create([single, mixed, small]) | cluster_filter.FilterClusters(embedder, cfg)
    assert_that(out | beam.Map(lambda c: c.key), equal_to([single.key]))

  counts = _run(build)
  assert counts["drop/cluster_low_similarity"] == counts["drop/cluster_too_small"] == 1


class _UpperCaptioner(pipeline_interfaces.Captioner):

  def caption(self, image, source_caption):
    assert image.shape == (16, 16, 3)
    return source_caption.upper()


def test_recaption_and_consolidate():
  c = _cluster([5] * 3)

  def build(p):
    out = p | beam.Create([c]) | recaption.Recaption(_UpperCaptioner())
    assert_that(out | beam.FlatMap(lambda c: [m.caption for m in c.members]),
                equal_to([m.caption.upper() for m in c.members]))

  assert _run(build)["recaption/changed"] == 3
  describer = consolidate.FrequentWordsDescriber()
  captions = ["a red and blue toy on a beach", "a small red and blue toy",
              "click to enlarge", "the red and blue toy upside down"]
  assert describer.describe(captions) == "red and blue toy"
  assert describer.describe(["free shipping", "best seller"]) == ""
  boilerplate = ["free shipping", "best seller", "click to enlarge"]
  noise = Cluster("k", tuple(dataclasses.replace(m, caption=t)
                             for m, t in zip(c.members, boilerplate)))

  def build_consolidate(p):
    out = p | beam.Create([noise]) | consolidate.Consolidate()
    assert_that(out, equal_to([]))

  assert _run(build_consolidate)["drop/no_description"] == 1


class _CopyWriter(pipeline_interfaces.PromptWriter):
  """Returns an exemplar caption every other call: those must be rejected."""

  def __init__(self):
    self.calls = 0

  def write(self, description, skill, rng):
    self.calls += 1
    return "a red toy 0" if self.calls % 2 else f"a {description} on a beach {self.calls}"


def test_prompt_writer_rejects_prompts_like_the_captions():
  c = _cluster([5] * 3, description="red and blue toy")
  prompts, rejected = prompt_writer.write_prompts(
      c, prompt_writer.GrammarPromptWriter(), prompt_writer.PromptConfig(prompts_per_cluster=10))
  assert len(prompts) >= 8
  assert {p.skill for p in prompts} == set(sy.SKILLS)
  for p in prompts:
    assert "red and blue toy" in p.prompt
    assert sy.parse_prompt(p.prompt).skills == (p.skill,)
  assert captions.caption_similarity("a toy on a beach", "the toy on the beach", "toy") == 1.0
  assert captions.caption_similarity("a toy rotated", "a toy on a beach", "toy") == 0.0

  def build(p):
    out = p | beam.Create([c]) | prompt_writer.WritePrompts(
        _CopyWriter(), prompt_writer.PromptConfig(prompts_per_cluster=3))
    assert_that(out | beam.FlatMap(lambda t: [s.prompt for s in t.prompts]),
                equal_to([f"a red and blue toy on a beach {i}" for i in (2, 4, 6)]))

  assert _run(build)["drop/prompt_too_similar"] == 3


def test_renderers():
  c = _cluster([9] * 4)
  subject = sy.make_subject(9)
  oracle = expert_render.make_target_renderer("oracle")
  prompt = "a toy upside down on a beach"
  (target,) = oracle.render_targets(c, [PromptSpec("novel_view", prompt)], seed=0)
  np.testing.assert_array_equal(target.image, sy.render(subject, sy.parse_prompt(prompt), 16))
  same = expert_render.make_target_renderer("same_cluster", max_targets=3).render_targets(c, [], 0)
  assert [t.excluded_member for t in same] == [0, 1, 2]
  assert [t.prompt for t in same] == [m.caption for m in c.members[:3]]
  with pytest.raises(ValueError, match="workdir= and base="):
    expert_render.make_target_renderer("expert")  # The expert needs a base model.
  with pytest.raises(ValueError):
    expert_render.make_target_renderer("dalle")
  missing_part = next(r for r in ("head", "base", "wing", "tail", "core")
                      if r not in [p.role for p in subject.parts])
  task = RenderTask(c, (PromptSpec("novel_view", prompt),
                        PromptSpec("attribute_modification", f"a toy with a red {missing_part}")))

  def build(p):
    out = p | beam.Create([task]) | expert_render.RenderTargets("oracle")
    assert_that(out.candidates | beam.Map(lambda k: (k.index, k.renderer)),
                equal_to([(0, "oracle")]), label="candidates")
    assert_that(out.dead_letter | beam.Map(lambda d: (d["reason"], d["id"])),
                equal_to([("render_failed", f"{c.key}#1")]), label="dead")

  assert _run(build)["drop/render_failed"] == 1


class _SeedRenderer(pipeline_interfaces.TargetRenderer):
  """Writes each target's render seed into its prompt, so a test sees the batches."""

  name = "seed"

  def render_targets(self, cluster, prompts, seed):
    return [pipeline_interfaces.Target(p.skill, str(seed), np.zeros((2, 2, 3), np.uint8))
            for p in prompts]


def test_render_parts_share_out_the_whole_runs_batches_and_seeds(monkeypatch, tmp_path):
  monkeypatch.setattr(expert_render, "make_target_renderer", lambda name, **_: _SeedRenderer())
  tasks = [RenderTask(_cluster([1, 1], key=f"shop.example.com/p/{i:02d}"),
                      (PromptSpec("novel_view", "a toy"),)) for i in range(40)]
  out_path = str(tmp_path / "seeds.jsonl")

  def seeds(batch_size, part=0, num_parts=1):
    """(cluster key, render seed) of each target the part renders."""

    def build(p):
      out = p | beam.Create(tasks) | expert_render.RenderTargets(
          "oracle", seed=3, batch_size=batch_size, part=part, num_parts=num_parts)
      _ = (out.candidates | beam.Map(lambda k: {"key": k.cluster.key, "seed": k.target.prompt})
           | write.WriteSortedJsonl(out_path))

    _run(build)
    return [(row["key"], row["seed"]) for row in map(json.loads, open(out_path))]

  for batch_size in (1, 4):
    whole = seeds(batch_size)
    assert len(whole) == len(tasks)
    parts = [seeds(batch_size, part, 3) for part in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole)  # Disjoint, and the same seeds.
    # Balanced: each part renders about a third of the clusters.
    assert all(8 <= len(part) <= 16 for part in parts), [len(part) for part in parts]
  with pytest.raises(ValueError, match="--part=3 must be in"):
    expert_render.RenderTargets("oracle", part=3, num_parts=3)


class _PromptJudge:
  """A text judge stub: 1.0 only for prompts mentioning a beach."""

  def setup(self):
    pass

  def score(self, image, prompt):
    return 1.0 if "beach" in prompt else 0.0


def test_score_filter_drops_low_fidelity_targets():
  c = _cluster([9] * 4)
  good = sy.render(sy.make_subject(9), sy.Scene(background="beach"), 16)
  other = sy.render(sy.make_subject(1234), sy.Scene(background="night", style="inverted"), 16)
  scorer = score_filter.EmbeddingSubjectScorer()
  exemplars = cluster_filter.decode_members(c)
  assert scorer.score(good, exemplars) > scorer.score(other, exemplars)
  candidates = [
      pipeline_interfaces.Candidate(c, pipeline_interfaces.Target("recontextualization", "toy on a beach", good), 0, "x"),
      pipeline_interfaces.Candidate(c, pipeline_interfaces.Target("recontextualization", "toy at night", good), 1, "x"),
      pipeline_interfaces.Candidate(c, pipeline_interfaces.Target("stylization", "toy on a beach", other), 2, "x"),
      pipeline_interfaces.Candidate(c, pipeline_interfaces.Target("same_cluster", "toy on a beach", good, 0), 3, "x")]
  cfg = score_filter.ScoreConfig(min_subject_score=0.6, max_exemplars=2)

  def build(p):
    out = p | beam.Create(candidates) | score_filter.ScoreAndFilter(text_scorer=_PromptJudge(),
                                                                    cfg=cfg)
    assert_that(out | beam.Map(lambda g: (g.group_id[-3:], g.exemplar_captions, len(g.source_urls))),
                equal_to([("000", [m.caption for m in c.members[:2]], 2),
                          ("003", [m.caption for m in c.members[1:3]], 3)]))

  counts = _run(build)
  assert counts["drop/low_text_fidelity"] == counts["drop/low_subject_fidelity"] == 1
  with pytest.raises(ValueError):
    score_filter.make_scorer("text", "clip")


def test_score_filter_keeps_each_subjects_best_shown_prompts():
  """max_groups_per_subject keeps, per subject, the targets that best show their
  prompts (ties go to the higher subject score); the others are counted."""
  a, b = _cluster([9] * 4, key="shop.example.com/p/a"), _cluster([7] * 4, key="shop.example.com/p/b")
  on_subject = {key: sy.render(sy.make_subject(seed), sy.Scene(), 16)
                for key, seed in ((a.key, 9), (b.key, 7))}
  off_subject = sy.render(sy.make_subject(9), sy.Scene(style="inverted"), 16)
  targets = [(a, "toy at night", on_subject[a.key]), (a, "toy on a beach", off_subject),
             (a, "toy in a park", off_subject), (a, "toy on a beach", on_subject[a.key]),
             (b, "toy at night", on_subject[b.key])]
  candidates = [pipeline_interfaces.Candidate(c, pipeline_interfaces.Target(
      "recontextualization", prompt, image), i, "x") for i, (c, prompt, image) in enumerate(targets)]

  def build(quota):
    def fn(p):
      cfg = score_filter.ScoreConfig(min_subject_score=-1.0, min_text_score=0.0,
                                     max_groups_per_subject=quota)
      out = p | beam.Create(candidates) | score_filter.ScoreAndFilter(
          text_scorer=_PromptJudge(), cfg=cfg)
      kept = {0: ["000", "001", "002", "003", "004"], 2: ["001", "003", "004"],
              1: ["003", "004"]}[quota]
      assert_that(out | beam.Map(lambda g: g.group_id[-3:]), equal_to(kept))
    return fn

  assert "drop/over_subject_quota" not in _run(build(0))
  assert _run(build(2))["drop/over_subject_quota"] == 2
  # Both beach targets show their prompt; the one that shows the subject wins.
  assert _run(build(1))["drop/over_subject_quota"] == 3


class _BeachOnlyJudge(_PromptJudge):
  """Sees a beach in every image and nothing else."""

  def recaption(self, image, prompt):
    return sy.drop_modifiers(prompt, {"background"} if "beach" not in prompt else set())


def test_score_filter_recaptions_targets_to_what_they_show():
  c = _cluster([9] * 4)
  image = sy.render(sy.make_subject(9), sy.Scene(background="beach"), 16)
  candidates = [pipeline_interfaces.Candidate(
      c, pipeline_interfaces.Target("recontextualization", prompt, image), i, "x")
      for i, prompt in enumerate(["a toy on a beach", "a toy at night", "a small toy in a park"])]

  def build(recaption_targets, min_subject_score=-1.0):
    def fn(p):
      cfg = score_filter.ScoreConfig(min_subject_score=min_subject_score, min_text_score=0.0,
                                     recaption_targets=recaption_targets)
      out = p | beam.Create(candidates) | score_filter.ScoreAndFilter(
          text_scorer=_BeachOnlyJudge(), cfg=cfg)
      prompts = (["a toy on a beach", "a toy", "a small toy"] if recaption_targets else
                 ["a toy on a beach", "a toy at night", "a small toy in a park"])
      assert_that(out | beam.Map(lambda g: g.target_prompt),
                  equal_to(prompts if min_subject_score < 1.0 else []))
    return fn

  assert _run(build(True))["score_filter/recaptioned"] == 2
  assert "score_filter/recaptioned" not in _run(build(False))
  # Targets the subject filter drops are never recaptioned (a cosine is at most 1).
  counts = _run(build(True, min_subject_score=1.5))
  assert counts["drop/low_subject_fidelity"] == 3
  assert "score_filter/recaptioned" not in counts


def test_write_is_deterministic_and_creates_every_shard(tmp_path):
  group = records.ICLGroup("g", "s", "stylization", [records.encode_png(np.zeros((8, 8, 3), np.uint8))],
                           ["cap"], records.encode_png(np.ones((8, 8, 3), np.uint8)), "prompt",
                           0.9, 1.0, ["u"], "oracle", "p")
  groups = [group.__class__(**{**group.__dict__, "group_id": f"g{i}"}) for i in range(7)]
  outputs = []
  for run in range(2):
    prefix = str(tmp_path / f"run{run}" / "icl")
    os.makedirs(os.path.dirname(prefix))

    def build(p, prefix=prefix, order=groups[::1 if run == 0 else -1]):
      _ = p | beam.Create(order) | write.WriteIclGroups(prefix, num_shards=3)
      _ = p | "Rows" >> beam.Create([{"b": 1}, {"a": 2}]) | write.WriteSortedJsonl(prefix + ".jsonl")

    assert _run(build)["write/groups"] == 7
    paths = write.shard_paths(prefix, 3)
    outputs.append([open(path, "rb").read() for path in paths])
    parsed = [records.parse_icl_group(r).group_id for _, r in records.read_tfrecords(paths)]
    assert sorted(parsed) == sorted(g.group_id for g in groups)
    assert open(prefix + ".jsonl").read() == '{"a": 2}\n{"b": 1}\n'
  assert outputs[0] == outputs[1]
