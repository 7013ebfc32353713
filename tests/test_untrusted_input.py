"""Untrusted input (issue 17): manifest paths stay in their folder, decompression
bombs are refused from the header before any decode, and bad images name their file.

Bombs are built cheaply: a PNG/JPEG header claiming huge dimensions followed by a
few bytes of data, or a zlib stream of zero rows; no test decodes a huge image.
"""

import io
import json
import re
import struct
import zlib

import apache_beam as beam
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from data_pipeline import read
from data_pipeline import write
from launch import sample
from suti_jax.config import DataConfig
from suti_jax.data import images
from suti_jax.data import input as data_input
from suti_jax.data import records
from suti_jax.eval import dreambench

import data_testlib

# Just over the default budget: a valid, cheap (17 KB) image today's decoders accept.
OVER = 4097


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data +
          struct.pack(">I", zlib.crc32(kind + data)))


def _png(width: int, height: int, rows: int | None = None) -> bytes:
  """A grayscale PNG of zeros; with `rows` < height only that many rows follow
  the header (a bomb: it claims width x height, holds almost nothing)."""
  compress = zlib.compressobj()
  row = bytes(width + 1)  # Filter byte 0, then the pixels.
  idat = b"".join(compress.compress(row) for _ in range(rows or height))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) +
          _chunk(b"IDAT", idat + compress.flush()) + _chunk(b"IEND", b""))


def _jpeg(width: int, height: int) -> bytes:
  """An 8x8 JPEG whose SOF0 header claims width x height."""
  buffer = io.BytesIO()
  PIL.Image.new("L", (8, 8)).save(buffer, format="JPEG")
  data = bytearray(buffer.getvalue())
  sof = data.index(b"\xff\xc0")  # Marker, u16 length, u8 precision, u16 h, w.
  data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  return bytes(data)


def _truncated_jpeg() -> bytes:
  buffer = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  PIL.Image.fromarray(noise).save(buffer, format="JPEG")
  return buffer.getvalue()[:len(buffer.getvalue()) // 2]


def _small_png(seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  return records.encode_png(rng.integers(0, 256, (8, 8, 3), np.uint8))


BOMBS = {
    "png_just_over": lambda: _png(OVER, OVER),
    "png_under_pil_limit": lambda: _png(13000, 13000, rows=1),
    "png_40000": lambda: _png(40000, 40000, rows=1),
    "jpeg_60000": lambda: _jpeg(60000, 60000),
}


# ---- Pixel budget: host and in-graph decoding --------------------------------


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_host_decode_checks_pixel_budget_from_header(name):
  # Header-only bombs would fail as truncated if decoding were attempted, so
  # PixelBudgetError shows the check ran first.
  with pytest.raises(images.PixelBudgetError,
                     match=r"field 'target/image': \d+x\d+ px exceeds the pixel budget"):
    images.decode_array(BOMBS[name](), field="target/image")


def test_pixel_budget_can_be_overridden():
  data = _png(64, 48)
  assert images.decode_array(data, max_pixels=64 * 48).shape == (48, 64, 3)
  with pytest.raises(images.PixelBudgetError, match="64x48 px"):
    images.decode_array(data, max_pixels=64 * 48 - 1)
  assert images.decode_tf(tf.constant(data), max_pixels=64 * 48).shape == (48, 64, 3)
  with pytest.raises(tf.errors.InvalidArgumentError, match="pixel budget"):
    images.decode_tf(tf.constant(data), max_pixels=64 * 48 - 1)


@pytest.mark.parametrize("data", [_png(5000, 5000, rows=1), _jpeg(5000, 5000)],
                         ids=["png", "jpeg"])
def test_in_graph_decode_checks_pixel_budget_from_header(data):
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="(?s)field 'exemplar/image'.*5000.*pixel budget"):
    images.decode_tf(tf.constant(data), "exemplar/image")


# ---- Training records --------------------------------------------------------


def _caption_record(i: int, image: bytes) -> bytes:
  return records.serialize_caption_example(records.CaptionExample(image, f"c{i}"))


def _icl_record(i: int, image: bytes) -> bytes:
  return records.serialize_icl_group(records.ICLGroup(
      group_id=f"g{i}", subject_id="s", skill="recontext",
      exemplar_images=[_small_png(i), image], exemplar_captions=["a", "b"],
      target_image=_small_png(i + 100), target_prompt=f"c{i}", score_subject=1.0,
      score_text=1.0, source_urls=[], expert="e", pipeline="p"))


@pytest.mark.parametrize("kind, field", [("caption_tfrecord", "image"),
                                         ("icl_tfrecord", "exemplar/image")])
def test_bomb_in_a_training_record_fails_or_is_skipped(tmp_path, kind, field):
  icl = kind == "icl_tfrecord"
  make = _icl_record if icl else _caption_record
  serialized = [make(i, _small_png(i)) for i in range(4)]
  serialized.insert(1, make(99, _png(OVER, OVER)))
  (path,) = records.write_tfrecords(str(tmp_path / "data"), serialized, 1)

  def make_input(policy):
    cfg = DataConfig(kind=kind, pattern=path, shuffle_buffer=1, corrupt_policy=policy)
    return data_input.make_input(
        cfg, image_size=8, text_len=8, max_exemplars=2 if icl else None,
        batch_size=2, tokenizer=data_testlib.ByteTokenizer(), num_epochs=1)

  with pytest.raises(records.RecordError) as info:
    list(make_input("fail"))
  assert info.value.source == f"{path}:1"
  assert info.value.field.startswith(field)
  assert "pixel budget" in info.value.problem
  skipping = make_input("skip")
  assert len(list(skipping)) == 2 and skipping.num_skipped == 1


def test_host_record_parse_names_the_record():
  with pytest.raises(records.RecordError, match=r"f:3: field 'image': 40000x40000 px"):
    records.parse_caption_example(_caption_record(3, _png(40000, 40000, rows=1)),
                                  source="f:3")


# ---- Beam pipeline -----------------------------------------------------------


def _read_pipeline(pattern):
  p = test_pipeline.TestPipeline()
  out = p | read.ReadWebPairs(pattern)
  assert_that(out.records | beam.Map(lambda r: r.caption), equal_to(["ok0", "ok1"]),
              label="records")
  assert_that(out.dead_letter | beam.Map(lambda d: (d["reason"], "40000x40000" in d["detail"])),
              equal_to([("image_too_large", True)]), label="dead")
  result = p.run()
  result.wait_until_finish()
  return write.counters(result)


def test_pipeline_counts_a_bomb_as_a_drop_jsonl(tmp_path):
  (tmp_path / "bomb.png").write_bytes(_png(40000, 40000, rows=1))
  lines = [{"id": f"ok{i}", "url": f"https://x.com/a/{i}.png", "caption": f"ok{i}",
            "image_path": f"ok{i}.png"} for i in range(2)]
  for i in range(2):
    (tmp_path / f"ok{i}.png").write_bytes(_small_png(i))
  lines.append({"id": "bomb", "url": "https://x.com/a/b.png", "caption": "bomb",
                "image_path": "bomb.png"})
  (tmp_path / "web.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  counts = _read_pipeline(str(tmp_path / "web.jsonl"))
  assert counts["read/records"] == 2 and counts["drop/image_too_large"] == 1


def test_pipeline_counts_a_bomb_as_a_drop_tfrecord(tmp_path):
  examples = [records.CaptionExample(_small_png(i), f"ok{i}", f"https://x.com/a/{i}.png",
                                     f"ok{i}") for i in range(2)]
  examples.append(records.CaptionExample(_png(40000, 40000, rows=1), "bomb",
                                         "https://x.com/a/b.png", "bomb"))
  records.write_tfrecords(str(tmp_path / "web"),
                          map(records.serialize_caption_example, examples), 1)
  counts = _read_pipeline(str(tmp_path / "web-*"))
  assert counts["drop/image_too_large"] == 1


# ---- Files: launch.sample exemplars and DreamBench ---------------------------


def test_sample_exemplar_errors_name_the_file(tmp_path):
  (tmp_path / "a.png").write_bytes(_small_png())
  (tmp_path / "b.jpg").write_bytes(_truncated_jpeg())
  where = re.escape(str(tmp_path / "b.jpg"))
  with pytest.raises(images.ImageError, match=f"^{where}: undecodable.*truncated"):
    sample.read_exemplars(str(tmp_path), "a;b")
  (tmp_path / "b.jpg").write_bytes(_jpeg(60000, 60000))
  with pytest.raises(images.PixelBudgetError, match=f"^{where}: 60000x60000"):
    sample.read_exemplars(str(tmp_path), "a;b")


_PROMPTS = """subject_name,class
dog,dog

Object Prompts
'a {0} {1} in the jungle'.format(unique_token, class_token),

Live Subject Prompts
'a {0} {1} in the snow'.format(unique_token, class_token),
"""


def _benchmark_folder(tmp_path, image_entries):
  """A one-subject DreamBench folder `tmp_path/bench` listing `image_entries`;
  `tmp_path/outside/x.png` is a valid image outside it."""
  root = tmp_path / "bench"
  (root / "images" / "dog").mkdir(parents=True)
  (tmp_path / "outside").mkdir()
  (tmp_path / "outside" / "x.png").write_bytes(_small_png())
  (root / "images" / "dog" / "00.png").write_bytes(_small_png(1))
  (root / "prompts_and_classes.txt").write_text(_PROMPTS)
  manifest = {"subjects": {"dog": {"class": "dog", "live": True, "images": image_entries}}}
  (root / "manifest.json").write_text(json.dumps(manifest))
  return root


@pytest.mark.parametrize("entry", ["../outside/x.png", "ABSOLUTE", "images/dog/link.png",
                                   "images/../../outside/x.png"])
def test_manifest_paths_outside_the_folder_are_rejected(tmp_path, entry):
  if entry == "ABSOLUTE":
    entry = str(tmp_path / "outside" / "x.png")
  root = _benchmark_folder(tmp_path, ["images/dog/00.png", entry])
  (root / "images" / "dog" / "link.png").symlink_to(tmp_path / "outside" / "x.png")
  expected = f"{root / 'manifest.json'}: subject 'dog': image '{entry}' is outside {root}"
  with pytest.raises(dreambench.BenchmarkError, match=f"^{re.escape(expected)}"):
    dreambench.load_benchmark(root)
  with pytest.raises(dreambench.BenchmarkError, match=f"^{re.escape(expected)}"):
    read.dreambench_rows(str(root))


def test_manifest_symlink_inside_the_folder_is_kept(tmp_path):
  root = _benchmark_folder(tmp_path, ["images/dog/00.png", "images/dog/link.png"])
  (root / "images" / "dog" / "link.png").symlink_to(root / "images" / "dog" / "00.png")
  (subject,) = dreambench.load_benchmark(root).subjects
  assert dreambench.load_images(subject).shape == (2, 8, 8, 3)


def test_dreambench_photo_errors_name_the_file(tmp_path):
  root = _benchmark_folder(tmp_path, ["images/dog/00.png", "images/dog/01.jpg"])
  (root / "images" / "dog" / "01.jpg").write_bytes(_truncated_jpeg())
  (subject,) = dreambench.load_benchmark(root).subjects
  where = re.escape(str(root / "images" / "dog" / "01.jpg"))
  with pytest.raises(images.ImageError, match=f"^{where}: undecodable"):
    dreambench.load_images(subject)
  (root / "images" / "dog" / "01.jpg").write_bytes(_png(40000, 40000, rows=1))
  with pytest.raises(images.PixelBudgetError, match=f"^{where}: 40000x"):
    dreambench.load_images(subject)
