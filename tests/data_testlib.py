"""Shared by the input tests: a reversible byte tokenizer and its decoder."""

import numpy as np


class ByteTokenizer:
  """id = byte + 1, 0 = padding; `decode` inverts it."""

  def encode(self, texts, max_length):
    ids = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
      data = list(text.encode("utf-8"))[:max_length]
      ids[i, :len(data)] = np.array(data, np.int32) + 1
    return ids, ids > 0


def decode(ids: np.ndarray) -> str:
  """The text of one row of `ByteTokenizer` ids."""
  return bytes((ids[ids > 0] - 1).astype(np.uint8)).decode("utf-8")
