"""Offline T5 embeddings: the Beam stage writes them into ICL and caption records
(other fields untouched), and both input readers hand them back row-aligned,
naming the file and field of a record without them or of a wrong shape."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import common
from data_pipeline import embed_text
import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax import inference
from suti_jax.config import DataConfig, TextEncoderConfig, section
from suti_jax.data import input as data_input
from suti_jax.data import records
from suti_jax.models import text
from suti_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = dataclasses.replace(section(TextEncoderConfig, common.text_encoder(tiny=True)),
                           max_length=12, num_layers=1)
SIZE = 8
# Batch sizes 4 vs 3 block XLA's float32 matmuls differently (a few ulp); a
# mixed-up row would be O(1) off.
TOL = dict(atol=1e-5, rtol=1e-5)


def _png(rng):
  return records.encode_png(rng.integers(0, 256, (16, 16, 3), np.uint8))


def _groups(n=6):
  rng = np.random.default_rng(0)
  return [records.ICLGroup(
      group_id=f"g{i}", subject_id=f"s{i}", skill="recontext",
      exemplar_images=[_png(rng) for _ in range(1 + i % 3)],
      exemplar_captions=[f"toy {i} view {j}" for j in range(1 + i % 3)],
      target_image=_png(rng), target_prompt=f"toy {i} on a beach", score_subject=1.0,
      score_text=0.5, source_urls=["u"], expert="e", pipeline="p") for i in range(n)]


def _captions(n=16):
  rng = np.random.default_rng(1)
  return [records.CaptionExample(image=_png(rng), caption=f"a red toy number {i}",
                                 url=f"http://x/{i}", example_id=f"c{i}") for i in range(n)]


def _without_embeddings(serialized):
  example = tf.train.Example.FromString(serialized)
  for key in list(example.features.feature):
    if key.startswith("embedding/"):
      del example.features.feature[key]
  return example.SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  """Random tiny T5 saved as Orbax; ICL and caption shards before and after the stage."""
  root = tmp_path_factory.mktemp("embed")
  encoder = text.load_text_encoder(TEXT, jax.random.key(0))
  text.save_params(str(root / "t5"), encoder.params)
  cfg = dataclasses.replace(TEXT, weights_path=str(root / "t5"))
  os.makedirs(root / "raw")
  icl = records.write_tfrecords(str(root / "raw" / "icl"),
                                [records.serialize_icl_group(g) for g in _groups()], 2)
  caps = records.write_tfrecords(str(root / "raw" / "cap"),
                                 [records.serialize_caption_example(c) for c in _captions()], 2)
  summary = embed_text.run_pipeline(str(root / "raw" / "*"), str(root / "out"), cfg, batch_size=4)
  assert summary == {"files": 4, "embed/records": 6 + 16, "embed/texts": 6 + 12 + 16}
  return dict(root=root, cfg=cfg, encoder=encoder, raw={"icl": icl, "cap": caps})


def _read(path):
  return [r for _, r in records.read_tfrecords([path])]


def test_stage_writes_encoder_output_and_keeps_other_fields(embedded):
  encoder, out = embedded["encoder"], embedded["root"] / "out"
  for kind, paths in embedded["raw"].items():
    for path in paths:
      before, after = _read(path), _read(str(out / os.path.basename(path)))
      assert len(after) == len(before) > 0
      for old, new in zip(before, after):
        # Same order, every other field byte-identical.
        assert _without_embeddings(new) == old
        if kind == "icl":
          group = records.parse_icl_group(new)
          prompt, caps = encoder.encode([group.target_prompt])[0], encoder.encode(
              group.exemplar_captions)[0]
          np.testing.assert_allclose(group.prompt_embedding, prompt[0], **TOL)
          np.testing.assert_allclose(group.caption_embeddings, caps, **TOL)
          records.check_embeddings(group, "x", TEXT.max_length, TEXT.d_model)
        else:
          example = records.parse_caption_example(new)
          np.testing.assert_allclose(example.caption_embedding,
                                     encoder.encode([example.caption])[0][0], **TOL)


def _input(pattern, kind, *, cache, text_dim=TEXT.d_model, max_exemplars=3):
  cfg = DataConfig(kind=kind, pattern=pattern, cache=cache, precomputed_embeddings=True,
                   shuffle_buffer=4)
  return data_input.make_input(
      cfg, image_size=SIZE, text_len=TEXT.max_length,
      max_exemplars=max_exemplars if kind == "icl_tfrecord" else None, batch_size=3,
      tokenizer=text.build_tokenizer(TEXT), text_dim=text_dim)


@pytest.mark.parametrize("cache", [False, True])
def test_inputs_read_embeddings_row_aligned(embedded, cache):
  encoder, out = embedded["encoder"], embedded["root"] / "out"
  icl = next(_input(str(out / "icl-*"), "icl_tfrecord", cache=cache))
  spec = data_input.batch_spec(SIZE, TEXT.max_length, 3, 3, text_dim=TEXT.d_model)
  assert {k: (v.shape, v.dtype) for k, v in icl.items()} == {
      k: (s.shape, s.dtype) for k, s in spec.items()}
  np.testing.assert_allclose(icl["text_emb"], encoder.encode_ids(icl["text_ids"],
                                                                 icl["text_mask"])[0], **TOL)
  ids, mask = icl["exemplar_text_ids"], icl["exemplar_text_mask"]
  want = encoder.encode_ids(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))[0]
  # Padded exemplar slots carry zeros, as their all-False masks say.
  np.testing.assert_allclose(icl["exemplar_text_emb"], np.reshape(want, ids.shape + (-1,)), **TOL)
  assert not icl["exemplar_mask"].all() and not icl["exemplar_text_emb"][~icl["exemplar_mask"]].any()
  cap = next(_input(str(out / "cap-*"), "caption_tfrecord", cache=cache))
  np.testing.assert_allclose(cap["text_emb"], encoder.encode_ids(cap["text_ids"],
                                                                 cap["text_mask"])[0], **TOL)


@pytest.mark.parametrize("cache", [False, True])
def test_missing_or_misshaped_embeddings_name_file_and_field(embedded, cache, tmp_path):
  out, raw = embedded["root"] / "out", embedded["raw"]["icl"]
  # A mix: the stage's output for shard 0, shard 1 as it was before.
  mixed = tmp_path / "mixed"
  os.makedirs(mixed)
  tf.io.gfile.copy(str(out / os.path.basename(raw[0])), str(mixed / "a"))
  tf.io.gfile.copy(raw[1], str(mixed / "b"))
  with pytest.raises(records.RecordError, match=r"/b:\d+: field 'embedding/prompt': missing"):
    reader = _input(str(mixed / "*"), "icl_tfrecord", cache=cache)
    for _ in range(4):
      next(reader)
  with pytest.raises(records.RecordError,
                     match=r"icl-0000\d-of-00002:\d+: field 'embedding/prompt': shape \(12, 32\), "
                           r"expected \(12, 16\)"):
    next(_input(str(out / "icl-*"), "icl_tfrecord", cache=cache, text_dim=16))


def test_embed_text_cli(embedded, tmp_path):
  raw = embedded["raw"]["cap"][0]
  result = subprocess.run(
      [sys.executable, "-m", "launch.embed_text", "--config=configs/imagen_base64.py:tiny",
       "--config.text.num_layers=1", "--config.text.max_length=12",
       f"--t5={embedded['cfg'].weights_path}", f"--input={raw}", f"--output={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"embed/records": 8' in result.stdout
  stage_output = _read(str(embedded["root"] / "out" / os.path.basename(raw)))
  cli_output = _read(str(tmp_path / os.path.basename(raw)))
  for a, b in zip(stage_output, cli_output, strict=True):
    np.testing.assert_allclose(records.parse_caption_example(a).caption_embedding,
                               records.parse_caption_example(b).caption_embedding, **TOL)


def test_training_on_embedded_records_holds_no_t5(embedded, tmp_path):
  """A run on precomputed embeddings saves no T5 beside its checkpoints; sampling
  then restores the encoder the records were embedded with (text.weights_path)."""
  c = tl.micro_config(total_steps=2)
  c.text.max_length = TEXT.max_length
  c.text.weights_path = embedded["cfg"].weights_path
  c.data.update(kind="caption_tfrecord", pattern=str(embedded["root"] / "out" / "cap-*"),
                precomputed_embeddings=True)
  result = loop.run(c, str(tmp_path))
  assert result["step"] == 2 and np.isfinite(result["train/loss"])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f if "train/loss" in line] == [1, 2]
  stage = inference.load_stage(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(stage.text_params),
               jax.device_get(embedded["encoder"].params))
  images = inference.Pipeline([stage]).text_to_image(["a red toy"], 1, jax.random.PRNGKey(0),
                                                     num_steps=2)
  assert images.shape == (1, stage.image_size, stage.image_size, 3)
