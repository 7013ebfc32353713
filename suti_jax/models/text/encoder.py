"""`TextEncoder`: tokenizer + frozen T5 params + a jitted encode, and its loader.

Also precomputes embeddings in fixed-size batches so datasets can carry them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from suti_jax.config import MeshConfig, TextEncoderConfig
from suti_jax.models.text import t5
from suti_jax.models.text import tokenizers
from suti_jax.models.text import weights
from suti_jax.parallel import axes
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding as sharding_lib


@functools.partial(jax.jit, static_argnums=0)
def _encode(cfg: TextEncoderConfig, params: dict, ids: jax.Array,
            mask: jax.Array) -> jax.Array:
  """float32 [N, L, D] embeddings; compiled once per config and shape."""
  emb = t5.T5Encoder(cfg).apply({"params": params}, ids, mask)
  # Zero padded positions so stored embeddings do not depend on padding.
  return jnp.where(mask[..., None], emb.astype(jnp.float32), 0.0)


class TextEncoder:
  """A frozen T5 encoder bound to its tokenizer and params."""

  def __init__(self, cfg: TextEncoderConfig, tokenizer: tokenizers.Tokenizer,
               params: dict):
    """Bundles the parts.

    Args:
      cfg: the architecture and `max_length`.
      tokenizer: turns texts into ids; its vocab must fit `cfg.vocab_size`.
      params: `T5Encoder(cfg)` params, boxed or not.
    """
    if tokenizer.vocab_size > cfg.vocab_size:
      # Out-of-range ids would be silently clamped by the embedding gather.
      raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the "
                       f"encoder embeds only {cfg.vocab_size}")
    self.config = cfg
    self.tokenizer = tokenizer
    self.params = params

  def encode_ids(self, ids: np.ndarray | jax.Array,
                 mask: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      ids: int32 [N, L].
      mask: bool [N, L], False on padding.

    Returns:
      (emb float32 [N, L, D] with zeros at padding, mask bool [N, L]).
    """
    mask = jnp.asarray(mask, bool)
    ids = jnp.asarray(ids, jnp.int32)
    return _encode(self.config, self.params, ids, mask), mask

  def encode(self, texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Tokenizes to `config.max_length` and encodes.

    Args:
      texts: N strings.

    Returns:
      (emb float32 [N, L, D], mask bool [N, L]).
    """
    ids, mask = self.tokenizer.encode(texts, self.config.max_length)
    return self.encode_ids(ids, mask)


def load_text_encoder(cfg: TextEncoderConfig, key: jax.Array | None = None, *,
                      mesh: Mesh | None = None,
                      rules: sharding_lib.Rules = axes.DEFAULT_RULES) -> TextEncoder:
  """Builds the encoder from `cfg.weights_path`, or randomly from `key`.

  Args:
    cfg: tokenizer, architecture and `weights_path` (a `weights.save_params`
      checkpoint; '' means random init, the tiny/demo path).
    key: PRNG key for the random init; the same key gives the same params.
    mesh: where the params go, sharded by their logical axes; default the
      first device.
    rules: logical axis rules.

  Returns:
    A `TextEncoder` with unboxed params in `cfg.dtype`.
  """
  tokenizer = tokenizers.build_tokenizer(cfg)
  mesh = mesh or mesh_lib.make_mesh(MeshConfig(ici_data=1), jax.devices()[:1])
  abstract = weights.abstract_params(cfg, mesh, rules)
  if cfg.weights_path:
    params = weights.restore_params(cfg.weights_path, abstract)
  elif key is None:
    raise ValueError("cfg.weights_path is empty: pass a PRNG key to initialise "
                     "the text encoder randomly")
  else:
    params = weights.init_params(cfg, key, abstract, rules)
  return TextEncoder(cfg, tokenizer, params)


def precompute_embeddings(encoder: TextEncoder, texts: Sequence[str],
                          batch_size: int) -> np.ndarray:
  """Encodes many texts on the host side of a data pipeline.

  The last batch is padded with empty texts so every call has one shape and
  the encoder compiles once.

  Args:
    encoder: the text encoder.
    texts: N strings.
    batch_size: texts per device call.

  Returns:
    float32 [N, L, D], zero at padded tokens (`encoder.encode`'s output).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  chunks = []
  for start in range(0, len(texts), batch_size):
    batch = list(texts[start:start + batch_size])
    emb, _ = encoder.encode(batch + [""] * (batch_size - len(batch)))
    chunks.append(np.asarray(jax.device_get(emb))[:len(batch)])
  if not chunks:
    cfg = encoder.config
    return np.zeros((0, cfg.max_length, cfg.d_model), np.float32)
  return np.concatenate(chunks)
