"""Caption text utilities shared by the Beam pipeline and the evaluation: content
words and the content-word similarity of two texts.
"""

from __future__ import annotations

import re

# Function words and photo boilerplate: never part of a description.
STOPWORDS = frozenset(
    "a an the and or of on in at to with without for from by as is are this that "
    "photo picture image render shot close up its it".split())
_WORD_RE = re.compile(r"[a-z][a-z'-]*")


def content_words(text: str) -> list[str]:
  """Lowercased words of `text` without stopwords, in order."""
  return [w for w in _WORD_RE.findall(text.lower()) if w not in STOPWORDS]


def caption_similarity(prompt: str, caption: str, description: str = "") -> float:
  """Jaccard similarity of the content words of two texts, in [0, 1].

  The description's words are left out: prompt and caption share them by
  construction, and what must differ is what the prompt asks for.
  """
  subject = set(content_words(description))
  a = set(content_words(prompt)) - subject
  b = set(content_words(caption)) - subject
  return len(a & b) / len(a | b) if a | b else 1.0
