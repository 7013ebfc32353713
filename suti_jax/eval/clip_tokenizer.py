"""CLIP's byte-level BPE tokenizer in pure Python, reading `vocab.json` + `merges.txt`.

Matches HF `CLIPTokenizer` (transformers 5): NFC, whitespace collapse and lowercasing (no ftfy,
no HTML unescaping), CLIP's pre-tokenizer pattern, `</w>` word ends, BOS/EOS, pad/truncate.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import unicodedata

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_WHITESPACE = re.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map from bytes to printable unicode characters.

  Returns:
    A dict from each byte value (0-255) to a one-character string.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def _is_letter(ch: str) -> bool:
  return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
  return unicodedata.category(ch).startswith("N")


def pre_tokenize(text: str) -> list[str]:
  """Splits normalized text as CLIP's regex does.

  The pattern `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
  [^\\s\\p{L}\\p{N}]+` needs Unicode classes that `re` lacks, so it is scanned by hand with
  the same alternation order; unmatched characters (whitespace) are dropped.

  Args:
    text: normalized (lowercased) text.

  Returns:
    The pieces, in order.
  """
  pieces, i, n = [], 0, len(text)
  while i < n:
    ch = text[i]
    fixed = next((t for t in (BOS, EOS) + _CONTRACTIONS if text.startswith(t, i)), None)
    if fixed:
      j = i + len(fixed)
    elif _is_letter(ch):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(ch):
      j = i + 1
    elif ch.isspace():
      i += 1
      continue
    else:
      j = i + 1
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


class CLIPTokenizer:
  """Byte-level BPE with CLIP's `</w>` end-of-word marker; returns fixed-length id arrays."""

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
               max_length: int = 77, pad_token: str = EOS):
    """Builds the tokenizer.

    Args:
      vocab: token string -> id; must hold `<|startoftext|>`, `<|endoftext|>` and `pad_token`.
      merges: BPE merges, highest priority first.
      max_length: output length (BOS + tokens + EOS, padded).
      pad_token: the padding token (HF's CLIP checkpoints pad with EOS).
    """
    for token in (BOS, EOS, pad_token):
      if token not in vocab:
        raise ValueError(f"vocab lacks the special token {token!r}")
    self.vocab = vocab
    self.ranks = {pair: rank for rank, pair in enumerate(merges)}
    self.max_length = max_length
    self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
    self._byte_chars = bytes_to_unicode()
    self._cache: dict[str, list[str]] = {}

  @classmethod
  def from_dir(cls, path: str | pathlib.Path, max_length: int = 77) -> CLIPTokenizer:
    """Reads `vocab.json` and `merges.txt` (as in an HF CLIP checkpoint folder).

    Args:
      path: folder holding both files.
      max_length: output length.

    Returns:
      The tokenizer.
    """
    path = pathlib.Path(path)
    for name in ("vocab.json", "merges.txt"):
      if not (path / name).is_file():
        raise FileNotFoundError(f"CLIP tokenizer file {path / name} not found")
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines():
      if line.startswith("#version") or not line.strip():
        continue
      left, right = line.split()
      merges.append((left, right))
    return cls(vocab, merges, max_length)

  @classmethod
  def bytes_only(cls, max_length: int = 77) -> CLIPTokenizer:
    """A merge-free tokenizer over the 512 byte symbols plus BOS/EOS (random-weight runs).

    Args:
      max_length: output length.

    Returns:
      The tokenizer; its vocabulary has 514 entries.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return cls({t: i for i, t in enumerate(tokens)}, [], max_length)

  def _bpe(self, piece: str) -> list[str]:
    if piece in self._cache:
      return self._cache[piece]
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(word) > 1:
      rank, i = min((self.ranks.get(pair, float("inf")), i)
                    for i, pair in enumerate(zip(word, word[1:])))
      if rank == float("inf"):
        break
      first, second = word[i], word[i + 1]
      merged, i = [], 0
      while i < len(word):  # Merge every non-overlapping occurrence, left to right.
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without BOS/EOS, padding or truncation.

    Args:
      text: raw text.

    Returns:
      The ids; symbols missing from the vocabulary map to EOS (HF's unk token).
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()
    ids = []
    for piece in pre_tokenize(text):
      if piece in (BOS, EOS):
        ids.append(self.vocab[piece])
        continue
      symbols = "".join(self._byte_chars[b] for b in piece.encode("utf-8"))
      ids.extend(self.vocab.get(tok, self.eos_id) for tok in self._bpe(symbols))
    return ids

  def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch: BOS + ids + EOS, truncated to keep EOS last, then padded.

    Args:
      texts: N strings.

    Returns:
      (ids int32 [N, max_length], mask bool [N, max_length]); mask is False on padding.
    """
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    for row, text in enumerate(texts):
      tokens = [self.bos_id] + self.encode(text)[:self.max_length - 2] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = True
    return ids, mask
