"""Tests for suti_jax.data.records and suti_jax.data.images."""

import io

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from suti_jax.data import images
from suti_jax.data import records


def _png(rng, size=16):
  return records.encode_png(rng.integers(0, 256, (size, size, 3), np.uint8))


def _group(rng, num_exemplars=2, **overrides):
  fields = dict(
      group_id="g0", subject_id="s0", skill="stylization",
      exemplar_images=[_png(rng) for _ in range(num_exemplars)],
      exemplar_captions=[f"caption {i}" for i in range(num_exemplars)],
      target_image=_png(rng), target_prompt="a dog in snow ✓",
      score_subject=0.75, score_text=0.5, source_urls=["http://a", "http://b"],
      expert="dreambooth-v1", pipeline="run-7")
  fields.update(overrides)
  return records.ICLGroup(**fields)


def _example(**features):
  """A tf.train.Example from {key: list of bytes | float | int}."""
  def feature(values):
    if isinstance(values[0], bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if isinstance(values[0], float):
      return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
  return tf.train.Example(features=tf.train.Features(
      feature={k: feature(v) for k, v in features.items()}))


def _edit(serialized, drop=(), **replace):
  """Re-serialises an Example without `drop` keys and with `replace` values."""
  example = tf.train.Example.FromString(serialized)
  for key in drop:
    del example.features.feature[key]
  for key, values in replace.items():
    example.features.feature[key.replace("__", "/")].CopyFrom(
        _example(x=values).features.feature["x"])
  return example.SerializeToString()


def test_icl_round_trip_with_embeddings():
  rng = np.random.default_rng(0)
  group = _group(rng, num_exemplars=3,
                 prompt_embedding=rng.normal(size=(4, 8)).astype(np.float32),
                 caption_embeddings=rng.normal(size=(3, 4, 8)).astype(np.float32))
  parsed = records.parse_icl_group(records.serialize_icl_group(group))
  for field in ("group_id", "subject_id", "skill", "exemplar_images",
                "exemplar_captions", "target_image", "target_prompt",
                "source_urls", "expert", "pipeline"):
    assert getattr(parsed, field) == getattr(group, field), field
  assert parsed.score_subject == pytest.approx(0.75)
  np.testing.assert_array_equal(parsed.prompt_embedding, group.prompt_embedding)
  np.testing.assert_array_equal(parsed.caption_embeddings,
                                group.caption_embeddings)


def test_icl_round_trip_without_embeddings():
  parsed = records.parse_icl_group(
      records.serialize_icl_group(_group(np.random.default_rng(1))))
  assert parsed.prompt_embedding is None and parsed.caption_embeddings is None


def test_caption_round_trip():
  example = records.CaptionExample(image=_png(np.random.default_rng(2)),
                                   caption="a cat", url="http://x", example_id="7")
  assert records.parse_caption_example(
      records.serialize_caption_example(example)) == example


@pytest.mark.parametrize("edit, field, problem", [
    (dict(drop=["target/prompt"]), "target/prompt", "missing field"),
    (dict(drop=["provenance/expert"]), "provenance/expert", "missing field"),
    (dict(schema_version=[2]), "schema_version", "version 2"),
    (dict(target__image=[b"\x89PNG\r\n\x1a\nnot really"]), "target/image",
     "undecodable"),
    (dict(exemplar__caption=[b"only one"]), "exemplar/caption", "1 captions"),
    (dict(exemplar__image=[b"", b""], exemplar__caption=[b"a", b"b"]),
     "exemplar/image[0]", "undecodable"),
    (dict(score__text=[1, 2]), "score/text", "expected float_list"),
])
def test_icl_validation_names_source_and_field(edit, field, problem):
  serialized = _edit(records.serialize_icl_group(
      _group(np.random.default_rng(3))), **edit)
  source = records.record_source("/data/groups-00001-of-00004", 17)
  with pytest.raises(records.RecordError) as info:
    records.parse_icl_group(serialized, source=source)
  message = str(info.value)
  assert message.startswith("/data/groups-00001-of-00004:17: ")
  assert f"field '{field}'" in message and problem in message
  assert info.value.field == field


def test_zero_exemplars_rejected_on_write_and_read():
  rng = np.random.default_rng(4)
  with pytest.raises(records.RecordError, match="no exemplars"):
    records.serialize_icl_group(_group(rng, num_exemplars=0))
  serialized = _edit(records.serialize_icl_group(_group(rng)),
                     drop=["exemplar/image", "exemplar/caption"])
  with pytest.raises(records.RecordError, match="exemplar/image.*missing"):
    records.parse_icl_group(serialized, source="f:0")


def test_not_an_example():
  with pytest.raises(records.RecordError, match="f:3: field '<example>'"):
    records.parse_caption_example(b"\xff garbage", source="f:3")


def test_write_tfrecords_shards_round_robin(tmp_path):
  paths = records.write_tfrecords(str(tmp_path / "x"),
                                  (bytes([i]) for i in range(10)), num_shards=4)
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      f"x-0000{i}-of-00004" for i in range(4)]
  read = [r for _, r in records.read_tfrecords(paths)]
  assert sorted(read) == [bytes([i]) for i in range(10)]
  assert [s for s, _ in records.read_tfrecords(paths[1:2])] == [
      f"{paths[1]}:0", f"{paths[1]}:1", f"{paths[1]}:2"]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "RGB"])
def test_decode_modes_to_rgb_match_in_graph(mode):
  rng = np.random.default_rng(5)
  base = "L" if mode == "P" else mode
  channels = len(PIL.Image.new(base, (1, 1)).getbands())
  pixels = rng.integers(0, 256, (6, 9, channels), np.uint8)
  image = PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
  if mode == "P":
    image = image.convert("P")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  host = images.decode_array(buffer.getvalue())
  graph = images.decode_tf(tf.constant(buffer.getvalue())).numpy()
  assert host.shape == (6, 9, 3) and host.dtype == np.uint8
  np.testing.assert_array_equal(host, graph)
  if mode == "RGBA":  # Alpha composited over white.
    alpha = pixels[..., 3:] / 255.0
    expected = np.round(pixels[..., :3] * alpha + 255 * (1 - alpha))
    np.testing.assert_array_equal(host, expected.astype(np.uint8))


def test_jpeg_and_resize_normalise():
  rng = np.random.default_rng(6)
  buffer = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(
      buffer, format="JPEG")
  host = images.preprocess_array(images.decode_array(buffer.getvalue()), 8)
  graph = images.preprocess_tf(
      images.decode_tf(tf.constant(buffer.getvalue())), 8).numpy()
  assert host.shape == graph.shape == (8, 8, 3)
  assert host.dtype == graph.dtype == np.float32
  assert -1.0 <= graph.min() and graph.max() <= 1.0
  np.testing.assert_allclose(host, graph, atol=0.05)
  white = images.preprocess_array(np.full((4, 4, 3), 255, np.uint8), 2)
  np.testing.assert_array_equal(white, np.ones((2, 2, 3), np.float32))


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 12, 3), (10, 8, 3)])
def test_preprocess_at_target_size_only_crops(shape):
  """An image whose short side is already `size` is centre-cropped and scaled,
  never resampled: in-graph and PIL agree to the bit (a traced batch to float
  rounding: grappler turns the division into a product), static shapes kept."""
  pixels = np.random.default_rng(7).integers(0, 256, shape, np.uint8)
  h, w = shape[:2]
  top, left = (h - 8) // 2, (w - 8) // 2
  expected = pixels[top:top + 8, left:left + 8].astype(np.float32) / 127.5 - 1.0
  host = images.preprocess_array(pixels, 8)
  graph = images.preprocess_tf(tf.constant(pixels), 8)
  batched = tf.function(lambda x: images.preprocess_tf(x, 8))(
      tf.constant(np.stack([pixels, 255 - pixels])))
  assert graph.shape == (8, 8, 3) and batched.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(host, expected)
  np.testing.assert_array_equal(graph.numpy(), expected)
  np.testing.assert_allclose(batched.numpy()[0], expected, rtol=0, atol=1e-6)


def test_image_errors_name_field():
  with pytest.raises(images.ImageError, match="field 'exemplar/image'.*JPEG"):
    images.decode_array(b"GIF89a....", field="exemplar/image")
  with pytest.raises(images.ImageError, match="field 'x'.*uint8"):
    images.check_array(np.zeros((4, 4), np.uint8), field="x")
  with pytest.raises(tf.errors.InvalidArgumentError, match="field 'target/image'"):
    images.decode_tf(tf.constant(b"GIF89a...."), "target/image")
