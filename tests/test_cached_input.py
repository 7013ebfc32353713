"""Tests for suti_jax.data.cached (data.cache=True): the in-memory input path."""

import numpy as np
import pytest

from suti_jax.config import DataConfig
from suti_jax.data import input as data_input
from suti_jax.data import records

import data_testlib

TEXT_LEN = 12
SIZE = 8


def _write_groups(tmp_path, num_groups=10):
  """ICL groups g0.. with 1..3 exemplars; exemplar j of group i is filled with 10 * j + 1."""
  serialized = []
  for i in range(num_groups):
    k = 1 + i % 3
    exemplars = [records.encode_png(np.full((16, 16, 3), 10 * j + 1, np.uint8)) for j in range(k)]
    serialized.append(records.serialize_icl_group(records.ICLGroup(
        group_id=f"g{i}", subject_id=f"s{i}", skill="recontext", exemplar_images=exemplars,
        exemplar_captions=[f"g{i} e{j}" for j in range(k)],
        target_image=records.encode_png(np.full((16, 16, 3), i, np.uint8)),
        target_prompt=f"g{i}", score_subject=1.0, score_text=1.0, source_urls=[], expert="e",
        pipeline="p")))
  return records.write_tfrecords(str(tmp_path / "icl"), serialized, 2), str(tmp_path / "icl*")


def _icl_input(pattern, batch_size=4, corrupt_policy="fail", **kwargs):
  cfg = DataConfig(kind="icl_tfrecord", pattern=pattern, cache=True,
                   corrupt_policy=corrupt_policy)
  return data_input.make_input(cfg, image_size=SIZE, text_len=TEXT_LEN, max_exemplars=3,
                               batch_size=batch_size, tokenizer=data_testlib.ByteTokenizer(), seed=3, **kwargs)


def _caption_input(num_examples=12, batch_size=4):
  source = [(np.full((SIZE, SIZE, 3), i, np.uint8), f"c{i}") for i in range(num_examples)]
  return data_input.make_input(DataConfig(cache=True), image_size=SIZE, text_len=TEXT_LEN,
                               max_exemplars=None, batch_size=batch_size, tokenizer=data_testlib.ByteTokenizer(),
                               seed=1, source=source)


def test_batches_match_the_spec(tmp_path):
  _, pattern = _write_groups(tmp_path)
  spec = data_input.batch_spec(SIZE, TEXT_LEN, 3, 4)
  batch = next(_icl_input(pattern))
  assert set(batch) == set(spec)
  for key, value in batch.items():
    assert (value.shape, value.dtype) == (spec[key].shape, spec[key].dtype), key


def test_each_epoch_visits_every_example_once_in_a_new_order():
  data = _caption_input(num_examples=12, batch_size=4)
  epochs = [[data_testlib.decode(ids) for _ in range(3) for ids in next(data)["text_ids"]] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f"c{i}" for i in range(12))
  assert epochs[0] != epochs[1]
  assert data.epoch == 1


def test_partial_last_batch_is_dropped():
  data = _caption_input(num_examples=10, batch_size=4)
  for _ in range(2):
    next(data)
  assert data.epoch == 0
  next(data)
  assert data.epoch == 1 and data.get_state()["position"] == 4


def test_resume_from_state_continues_exactly(tmp_path):
  _, pattern = _write_groups(tmp_path)
  first = _icl_input(pattern)
  for _ in range(4):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(3)]
  resumed = _icl_input(pattern)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(3)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_state_of_another_input_is_rejected(tmp_path):
  _, pattern = _write_groups(tmp_path)
  state = _icl_input(pattern).get_state()
  with pytest.raises(ValueError, match="batch_size"):
    _icl_input(pattern, batch_size=2).set_state(state)


def test_exemplar_subsets_are_real_and_padding_is_empty(tmp_path):
  _, pattern = _write_groups(tmp_path)
  data = _icl_input(pattern)
  for _ in range(6):
    batch = next(data)
    for b in range(4):
      group = int(data_testlib.decode(batch["text_ids"][b])[1:])
      present = 1 + group % 3
      slots = batch["exemplar_mask"][b]
      count = int(slots.sum())
      assert 1 <= count <= present and slots[:count].all() and not slots[count:].any()
      captions = [data_testlib.decode(batch["exemplar_text_ids"][b, j]) for j in range(count)]
      assert len(set(captions)) == count
      assert all(c.startswith(f"g{group} e") for c in captions)
      assert not batch["exemplar_text_mask"][b, count:].any()
      assert not batch["exemplar_images"][b, count:].any()
      # The image in a slot is the exemplar its caption names.
      for j, caption in enumerate(captions):
        level = (10 * int(caption.split("e")[-1]) + 1) / 127.5 - 1.0
        np.testing.assert_allclose(batch["exemplar_images"][b, j], level, atol=1e-5)


def test_too_few_examples_for_one_batch_is_an_error():
  with pytest.raises(ValueError, match="fewer than one batch"):
    _caption_input(num_examples=3, batch_size=4)


def test_corrupt_record_is_named(tmp_path):
  files, pattern = _write_groups(tmp_path)
  with open(files[0], "r+b") as f:
    f.seek(40)
    f.write(b"\xff" * 8)
  with pytest.raises(records.RecordError, match="icl"):
    _icl_input(pattern)


def test_skip_policy_counts_every_record_a_damaged_file_loses(tmp_path):
  files, pattern = _write_groups(tmp_path, num_groups=10)
  with open(files[0], "r+b") as f:  # A bad CRC in the first record: the reader stops there.
    f.seek(40)
    f.write(b"\xff" * 8)
  data = _icl_input(pattern, corrupt_policy="skip")
  lost = 10 - len({data_testlib.decode(ids) for _ in range(8) for ids in next(data)["text_ids"]})
  assert lost >= 1
  assert data.stats() == {"data/skipped_records": float(lost), "data/damaged_files": 1.0}
