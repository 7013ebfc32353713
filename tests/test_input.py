"""Tests for suti_jax.data.input/sources: batches, sharding, determinism, resume, corruption."""

import json
import logging
import os
import struct

import numpy as np
import pytest

from suti_jax.config import DataConfig
from suti_jax.data import input as data_input
from suti_jax.data import records

import data_testlib

TEXT_LEN = 12
SIZE = 8


def _group(rng, index, num_exemplars):
  png = lambda: records.encode_png(rng.integers(0, 256, (16, 16, 3), np.uint8))
  return records.ICLGroup(
      group_id=f"g{index}", subject_id=f"s{index}", skill="recontext",
      exemplar_images=[png() for _ in range(num_exemplars)],
      exemplar_captions=[f"g{index} e{j}" for j in range(num_exemplars)],
      target_image=png(), target_prompt=f"g{index}", score_subject=1.0,
      score_text=1.0, source_urls=[], expert="e", pipeline="p")


def _write(tmp_path, num_groups=16, num_shards=4, bad=None, name="icl"):
  """Writes groups g0.. (1..3 exemplars); `bad` maps index -> serialized."""
  rng = np.random.default_rng(0)
  serialized = [records.serialize_icl_group(_group(rng, i, 1 + i % 3))
                for i in range(num_groups)]
  for index, record in (bad or {}).items():
    serialized.insert(index, record)
  prefix = str(tmp_path / name)
  return records.write_tfrecords(prefix, serialized, num_shards), prefix + "*"


def _input(pattern, *, batch_size=4, max_exemplars=3, seed=0, **kwargs):
  cfg_kwargs = {k: kwargs.pop(k) for k in ("corrupt_policy", "shuffle_buffer")
                if k in kwargs}
  cfg = DataConfig(kind="icl_tfrecord", pattern=pattern, **cfg_kwargs)
  return data_input.make_input(
      cfg, image_size=SIZE, text_len=TEXT_LEN, max_exemplars=max_exemplars,
      batch_size=batch_size, tokenizer=data_testlib.ByteTokenizer(), seed=seed, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _prompts(batches):
  return [data_testlib.decode(ids) for b in batches for ids in b["text_ids"]]


def _assert_matches_spec(batch, spec):
  assert set(batch) == set(spec)
  for key, value in batch.items():
    assert (value.shape, value.dtype) == (spec[key].shape, spec[key].dtype), key


def test_icl_batch_matches_spec_and_padding(tmp_path):
  _, pattern = _write(tmp_path)
  batches = _take(_input(pattern), 4)
  spec = data_input.batch_spec(SIZE, TEXT_LEN, 3, 4)
  for batch in batches:
    _assert_matches_spec(batch, spec)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    for row in range(4):
      group = int(data_testlib.decode(batch["text_ids"][row])[1:])
      slots = batch["exemplar_mask"][row]
      count = int(slots.sum())
      assert 1 <= count <= 1 + group % 3  # A subset of those present.
      assert slots[:count].all() and not slots[count:].any()
      captions = [data_testlib.decode(ids) for ids in batch["exemplar_text_ids"][row][:count]]
      assert len(set(captions)) == count
      assert all(c.startswith(f"g{group} e") for c in captions)
      assert not batch["exemplar_text_mask"][row][count:].any()
      assert not batch["exemplar_text_ids"][row][count:].any()
      assert not batch["exemplar_images"][row][count:].any()
      assert np.abs(batch["exemplar_images"][row][:count]).sum(axis=(1, 2, 3)).all()


def test_caption_and_synthetic_batches_match_spec(tmp_path):
  rng = np.random.default_rng(1)
  examples = [records.CaptionExample(records.encode_png(
      rng.integers(0, 256, (16, 12, 3), np.uint8)), f"c{i}") for i in range(8)]
  paths = records.write_tfrecords(
      str(tmp_path / "cap"), map(records.serialize_caption_example, examples), 2)
  cfg = DataConfig(kind="caption_tfrecord", pattern=paths[0][:-15] + "*")
  common = dict(image_size=SIZE, text_len=TEXT_LEN, batch_size=4,
                tokenizer=data_testlib.ByteTokenizer())
  caption_spec = data_input.batch_spec(SIZE, TEXT_LEN, None, 4)
  batches = _take(data_input.make_input(cfg, max_exemplars=None, **common), 2)
  for batch in batches:
    _assert_matches_spec(batch, caption_spec)
  assert sorted(_prompts(batches)) == sorted(f"c{i}" for i in range(8))

  pairs = [(rng.integers(0, 256, (10, 14, 3), np.uint8), f"p{i}")
           for i in range(8)]
  synthetic = data_input.make_input(DataConfig(), max_exemplars=None,
                                    source=lambda: pairs, **common)
  _assert_matches_spec(next(synthetic), caption_spec)
  groups = [dict(target_image=rng.integers(0, 256, (9, 9, 3), np.uint8),
                 target_prompt=f"t{i}",
                 exemplar_images=rng.integers(0, 256, (2, 12, 12, 3), np.uint8),
                 exemplar_captions=["a", "b"]) for i in range(8)]
  icl = data_input.make_input(DataConfig(), max_exemplars=3,
                              source=groups, **common)
  batch = next(icl)
  _assert_matches_spec(batch, data_input.batch_spec(SIZE, TEXT_LEN, 3, 4))
  assert not batch["exemplar_mask"][:, 2].any()


def test_determinism(tmp_path):
  _, pattern = _write(tmp_path)
  first, again = (_take(_input(pattern, seed=3), 4) for _ in range(2))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = _take(_input(pattern, seed=4), 4)
  assert _prompts(first) != _prompts(other)
  assert sorted(_prompts(first)) == sorted(_prompts(other))  # Same epoch.


@pytest.mark.parametrize("num_shards", [4, 1])  # File- and record-level.
def test_two_processes_cover_an_epoch_disjointly(tmp_path, num_shards):
  _, pattern = _write(tmp_path, num_shards=num_shards)
  seen = [_prompts(list(_input(pattern, process_index=p, process_count=2,
                               num_epochs=1))) for p in range(2)]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(f"g{i}" for i in range(16))


def test_resume_continues_exactly(tmp_path):
  _, pattern = _write(tmp_path)
  iterator = _input(pattern, seed=7)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)  # Crosses into epoch 1 (4 batches/epoch).
  assert iterator.epoch == 1
  resumed = _input(pattern, seed=7)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 3)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  with pytest.raises(ValueError, match="seed"):
    _input(pattern, seed=8).set_state(state)


def test_streams_of_many_epochs_give_the_batches_of_one_epoch_per_stream(tmp_path,
                                                                         monkeypatch):
  """Epochs run in one tf.data stream (EPOCHS_PER_STREAM) give the same batches as
  epochs built one by one; a stream stops at num_epochs and its last epoch."""
  _, pattern = _write(tmp_path, num_groups=18)  # 4 full batches + 2 dropped per epoch.
  runs = {}
  for per_stream in (1, 3):
    monkeypatch.setattr(data_input, "EPOCHS_PER_STREAM", per_stream)
    iterator = _input(pattern, seed=5, num_epochs=5)
    runs[per_stream] = list(iterator)
    assert iterator.epoch == 5
  assert len(runs[1]) == len(runs[3]) == 20
  for a, b in zip(runs[1], runs[3]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  epochs = [sorted(_prompts(runs[3][i:i + 4])) for i in range(0, 20, 4)]
  assert all(len(set(e)) == 16 for e in epochs)  # No batch straddles two epochs.
  assert _prompts(runs[3][:4]) != _prompts(runs[3][4:8])  # Each epoch its own order.


def test_truncated_file_fails_or_is_skipped(tmp_path):
  paths, pattern = _write(tmp_path, num_shards=2)
  with open(paths[1], "rb") as f:
    data = f.read()
  with open(paths[1], "wb") as f:
    f.write(data[:-40])  # Cuts into the last of its 8 records.
  with pytest.raises(records.RecordError) as info:
    _take(_input(pattern, shuffle_buffer=1, batch_size=8), 2)
  assert info.value.source == f"{paths[1]}:7"
  assert info.value.field == "<tfrecord>"
  skipping = _input(pattern, corrupt_policy="skip", shuffle_buffer=1,
                    batch_size=5, num_epochs=1)
  batches = list(skipping)
  assert len(batches) == 3 and skipping.num_skipped == 1
  assert "g15" not in _prompts(batches)


@pytest.mark.parametrize("field, record", [
    ("schema_version", "version"), ("target/image", "image"),
    ("exemplar/caption", "count")])
def test_corrupt_record_fails_or_is_skipped(tmp_path, field, record):
  rng = np.random.default_rng(2)
  good = records.serialize_icl_group(_group(rng, 99, 2))
  import tensorflow as tf  # Only to edit the Example.
  example = tf.train.Example.FromString(good)
  feature = example.features.feature[field]
  if record == "version":
    feature.int64_list.value[:] = [records.SCHEMA_VERSION + 1]
  elif record == "image":
    feature.bytes_list.value[:] = [b"\x89PNG\r\n\x1a\ntruncated"]
  else:
    feature.bytes_list.value.append(b"extra")
  paths, pattern = _write(tmp_path, num_shards=1,
                          bad={0: example.SerializeToString()})
  with pytest.raises(records.RecordError) as info:
    next(_input(pattern, shuffle_buffer=1))
  assert info.value.source == f"{paths[0]}:0"
  assert info.value.field == field
  skipping = _input(pattern, corrupt_policy="skip", shuffle_buffer=1,
                    num_epochs=1)
  batches = list(skipping)
  assert len(batches) == 4 and skipping.num_skipped == 1
  assert skipping.get_state()["num_skipped"] == 1
  assert sorted(_prompts(batches)) == sorted(f"g{i}" for i in range(16))


def _record_offsets(path):
  """Byte offsets of a TFRecord file's records (u64 length, u32 CRC, data, u32 CRC)."""
  with open(path, "rb") as f:
    data = f.read()
  offsets, offset = [], 0
  while offset < len(data):
    offsets.append(offset)
    offset += struct.unpack("<Q", data[offset:offset + 8])[0] + 16
  return offsets


def test_bad_record_mid_file_counts_every_record_the_reader_loses(tmp_path, caplog):
  """The reader stops at a bad CRC: the bad record and the 5 intact ones after it
  are lost, all 6 counted (by the file's framing), and the file is named."""
  paths, pattern = _write(tmp_path, num_shards=2)
  offsets = _record_offsets(paths[1])
  assert len(offsets) == 8
  with open(paths[1], "r+b") as f:
    f.seek(offsets[2] + 12 + 5)  # A data byte of record 2: its CRC fails.
    byte = f.read(1)
    f.seek(offsets[2] + 12 + 5)
    f.write(bytes([byte[0] ^ 0xFF]))
  skipping = _input(pattern, corrupt_policy="skip", shuffle_buffer=1, batch_size=2,
                    num_epochs=1)
  with caplog.at_level(logging.WARNING):
    batches = list(skipping)
  assert skipping.num_skipped == 6 and len(batches) == 5
  assert skipping.stats() == {"data/skipped_records": 6.0, "data/damaged_files": 1.0}
  assert (f"{paths[1]}: unreadable from record 2 (byte {offsets[2]} of "
          f"{os.path.getsize(paths[1])}): 2 records read, 6 lost (the rest of the file is "
          "intact") in caplog.text
  assert "records in epoch 0 (6 in all)" in caplog.text
  # Shard 1 holds g1, g3, ... (round robin): g1 and g3 were read before the damage.
  assert sorted(_prompts(batches)) == sorted([f"g{i}" for i in range(0, 16, 2)] + ["g1", "g3"])


def test_halved_file_is_logged_as_cut_short_and_counted(tmp_path, caplog):
  """A file cut in half: records in the missing bytes cannot be counted, so the
  cut record counts as lost, the file as damaged, and the log says so."""
  paths, pattern = _write(tmp_path, num_shards=2)
  offsets = _record_offsets(paths[1])
  size = os.path.getsize(paths[1])
  os.truncate(paths[1], size // 2)
  read = sum(1 for o in offsets[1:] if o <= size // 2)  # Whole records left.
  skipping = _input(pattern, corrupt_policy="skip", shuffle_buffer=1, batch_size=1,
                    num_epochs=1)
  with caplog.at_level(logging.WARNING):
    batches = list(skipping)
  assert skipping.stats() == {"data/skipped_records": 1.0, "data/damaged_files": 1.0}
  assert len(_prompts(batches)) == 8 + read
  assert f"{paths[1]}: unreadable from record {read} " in caplog.text
  assert f"{read} records read, 1 lost at least: the file is cut short" in caplog.text
  assert skipping.get_state()["num_skipped"] == 1
