"""Tests for suti_jax.models.text.tokenizers (byte and SentencePiece)."""

import dataclasses
import logging

import numpy as np
import pytest
import sentencepiece as spm

from suti_jax.config import TextEncoderConfig
from suti_jax.models.text import tokenizers

_SENTENCES = [
    "a photo of a dog on the beach", "the cat sat on the mat",
    "a red car parked near a tree", "two dogs playing in the snow",
    "a bowl of fruit on a wooden table",
]


def test_byte_ids_eos_and_padding():
  ids, mask = tokenizers.ByteTokenizer().encode(["ab", ""], max_length=5)
  np.testing.assert_array_equal(ids, [[97 + 3, 98 + 3, 1, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  assert ids.dtype == np.int32 and mask.dtype == bool


def test_byte_truncation_keeps_eos():
  ids, mask = tokenizers.ByteTokenizer().encode(["hello"], max_length=4)
  np.testing.assert_array_equal(ids, [[ord("h") + 3, ord("e") + 3, ord("l") + 3, 1]])
  assert mask.all()


def test_cutting_a_text_is_said_once_per_max_length(caplog, monkeypatch):
  monkeypatch.setattr(tokenizers, "_WARNED_CUT", set())
  tok = tokenizers.ByteTokenizer()
  with caplog.at_level(logging.WARNING):
    tok.encode(["fits", "abcdefg"], max_length=8)  # 4 and 7 bytes + eos: nothing cut
    assert not caplog.records
    tok.encode(["a photo of the red toy on a beach", "short"], max_length=8)
    tok.encode(["another text that is far too long"], max_length=8)
  cut = [r.getMessage() for r in caplog.records]
  assert len(cut) == 1, cut
  assert "text.max_length=8 cuts 1 of 2 texts" in cut[0] and "33 tokens" in cut[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tok.encode(["a photo of the red toy on a beach"], max_length=16)
  assert "text.max_length=16" in caplog.text


def test_byte_round_trip_and_vocab():
  tok = tokenizers.ByteTokenizer()
  texts = ["café ☃ snow", "x"]
  ids, _ = tok.encode(texts, max_length=32)
  assert tok.decode(ids) == texts
  assert tok.vocab_size == 259 and ids.max() < tok.vocab_size
  with pytest.raises(ValueError, match="max_length"):
    tok.encode(["a"], max_length=0)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  """A tiny unigram model with T5's special ids, saved as `spiece.model`."""
  folder = tmp_path_factory.mktemp("spm")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_SENTENCES * 4), model_prefix=str(folder / "spiece"),
      vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  return folder


def test_sentencepiece_matches_hf_t5_tokenizer(spm_dir):
  transformers = pytest.importorskip("transformers")
  hf = transformers.T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
  tok = tokenizers.SentencePieceTokenizer(str(spm_dir / "spiece.model"))
  texts = ["a dog on the mat", "zebra xylophone near the tree!", "the cat"]
  for max_length in (6, 24):
    ids, mask = tok.encode(texts, max_length)
    ref = hf(texts, padding="max_length", truncation=True, max_length=max_length)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
  assert (ids[:, 0] != 0).all() and ids.max() < tok.vocab_size


def test_sentencepiece_round_trip_and_truncation(spm_dir):
  tok = tokenizers.SentencePieceTokenizer(str(spm_dir / "spiece.model"))
  ids, mask = tok.encode(_SENTENCES[:2], max_length=32)
  assert tok.decode(ids) == _SENTENCES[:2]
  lengths = mask.sum(1)
  assert (ids[np.arange(2), lengths - 1] == 1).all()  # eos ends each text.
  short, short_mask = tok.encode(_SENTENCES[:1], max_length=3)
  assert short_mask.all() and short[0, -1] == 1
  np.testing.assert_array_equal(short[0, :2], ids[0, :2])


def test_build_tokenizer(spm_dir):
  cfg = TextEncoderConfig()
  assert isinstance(tokenizers.build_tokenizer(cfg), tokenizers.ByteTokenizer)
  spm_cfg = dataclasses.replace(cfg, tokenizer="sentencepiece",
                                spm_path=str(spm_dir / "spiece.model"))
  assert tokenizers.build_tokenizer(spm_cfg).vocab_size == 40
  missing = str(spm_dir / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizers.build_tokenizer(dataclasses.replace(spm_cfg, spm_path=missing))
  with pytest.raises(ValueError, match="'byte', 'sentencepiece'"):
    tokenizers.build_tokenizer(dataclasses.replace(cfg, tokenizer="wordpiece"))
