"""Text -> (ids int32 [N, L], mask bool [N, L]) tokenizers for the T5 encoder.

`byte` needs no files (tests, demos); `sentencepiece` reads a T5 `spiece.model`.
Both follow T5's convention: pad id 0, an eos id appended, eos kept on truncation.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

from suti_jax.config import TextEncoderConfig

PAD_ID = 0
# max_length values already warned about: a cut text is said once per length,
# not once per batch.
_WARNED_CUT: set[int] = set()


class Tokenizer(Protocol):
  """What the text encoder needs from a tokenizer."""

  vocab_size: int

  def encode(self, texts: Sequence[str],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    ...

  def decode(self, ids: np.ndarray) -> list[str]:
    ...


def pack(token_lists: Sequence[Sequence[int]], max_length: int,
         eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Truncates, appends eos and pads token lists into fixed-length arrays.

  Args:
    token_lists: N lists of token ids without eos.
    max_length: L; texts longer than L - 1 tokens are cut so eos still fits.
    eos_id: id appended after the last kept token.

  Returns:
    ids int32 [N, L] (pad = 0) and mask bool [N, L] (True on tokens and eos).
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1 to hold eos, got {max_length}")
  lengths = [len(tokens) for tokens in token_lists]
  cut = sum(n > max_length - 1 for n in lengths)
  if cut and max_length not in _WARNED_CUT:
    # Silent cutting hides what the model never sees (a scene named after the
    # first tokens); said once per max_length.
    _WARNED_CUT.add(max_length)
    logging.warning("text.max_length=%d cuts %d of %d texts (the longest has %d tokens plus "
                    "eos); the encoder sees only their first %d tokens: raise "
                    "text.max_length to keep whole texts", max_length, cut, len(lengths),
                    max(lengths), max_length - 1)
  ids = np.full((len(token_lists), max_length), PAD_ID, np.int32)
  mask = np.zeros((len(token_lists), max_length), bool)
  for row, tokens in enumerate(token_lists):
    kept = list(tokens[:max_length - 1]) + [eos_id]
    ids[row, :len(kept)] = kept
    mask[row, :len(kept)] = True
  return ids, mask


def _strip(row: np.ndarray, eos_id: int) -> list[int]:
  """Token ids of one row before its first eos (or pad)."""
  out = []
  for token in row.tolist():
    if token in (eos_id, PAD_ID):
      break
    out.append(token)
  return out


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: pad=0, eos=1, unk=2, b -> b + 3."""

  eos_id = 1
  unk_id = 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, texts: Sequence[str],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes texts.

    Args:
      texts: N strings.
      max_length: L, tokens per text including eos.

    Returns:
      ids int32 [N, L] and mask bool [N, L].
    """
    return pack([[b + self.offset for b in t.encode("utf-8")] for t in texts],
                max_length, self.eos_id)

  def decode(self, ids: np.ndarray) -> list[str]:
    """ids [N, L] -> N strings (up to eos; truncated multi-byte chars dropped)."""
    return [
        bytes(t - self.offset for t in _strip(row, self.eos_id)
              if t >= self.offset).decode("utf-8", errors="ignore")
        for row in np.asarray(ids)
    ]


class SentencePieceTokenizer:
  """A SentencePiece model (T5's `spiece.model`: pad=0, eos=1, unk=2)."""

  def __init__(self, spm_path: str):
    """Loads the model.

    Args:
      spm_path: path of the `.model` file.
    """
    if not os.path.isfile(spm_path):
      raise FileNotFoundError(f"SentencePiece model not found: {spm_path!r}")
    self._sp = spm.SentencePieceProcessor(model_file=spm_path)
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(f"SentencePiece model {spm_path!r} has no eos piece; "
                       "T5 appends eos to every text")
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, texts: Sequence[str],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes texts.

    Args:
      texts: N strings.
      max_length: L, tokens per text including eos.

    Returns:
      ids int32 [N, L] and mask bool [N, L].
    """
    return pack(self._sp.encode(list(texts)), max_length, self.eos_id)

  def decode(self, ids: np.ndarray) -> list[str]:
    """ids [N, L] -> N strings (up to eos)."""
    return [self._sp.decode(_strip(row, self.eos_id)) for row in np.asarray(ids)]


_TOKENIZERS = ("byte", "sentencepiece")


def build_tokenizer(cfg: TextEncoderConfig) -> Tokenizer:
  """The tokenizer named by `cfg.tokenizer`.

  Args:
    cfg: uses `tokenizer` and, for 'sentencepiece', `spm_path`.

  Returns:
    A `ByteTokenizer` or `SentencePieceTokenizer`.
  """
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  if cfg.tokenizer == "sentencepiece":
    return SentencePieceTokenizer(cfg.spm_path)
  raise ValueError(f"unknown tokenizer {cfg.tokenizer!r}; known: {list(_TOKENIZERS)}")
