"""The Imagen UNet (base) and Efficient UNet (super-resolution), with SuTI's
exemplar path: the downsampling stack is one submodule used both to encode the
exemplars and to generate, so both paths share the same parameter arrays."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from suti_jax.config import UNetConfig
from suti_jax.models import attention, exemplar, layers
from suti_jax.models.exemplar import ExemplarFeatures, ExemplarInputs

Array = jax.Array
# Efficient UNet (Saharia et al. 2022, App. B.1) scales skip connections by 1/sqrt(2).
SKIP_SCALE = 1.0 / math.sqrt(2.0)
# UNetConfig.attention_layout values.
ATTENTION_LAYOUTS = ("every_block", "level_end")


def _dtypes(cfg: UNetConfig) -> dict[str, Any]:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def level_resolutions(cfg: UNetConfig) -> tuple[int, ...]:
  """Feature-map size (px) of each level: image_size / 2**level."""
  return tuple(cfg.image_size // 2**i for i in range(len(cfg.channel_mults)))


def level_channels(cfg: UNetConfig, resolution: int) -> int:
  """Channels of the level whose feature maps are `resolution` px."""
  return cfg.base_channels * cfg.channel_mults[level_resolutions(cfg).index(resolution)]


def text_resolutions(cfg: UNetConfig) -> tuple[int, ...]:
  """Resolutions with text attention (default: the self-attention ones)."""
  return cfg.cross_attention_resolutions or cfg.attention_resolutions


def validate_config(cfg: UNetConfig) -> None:
  """Raises ValueError on an inconsistent UNetConfig, naming the field."""
  if cfg.text_attention not in ("concat", "cross"):
    raise ValueError(f"text_attention must be 'concat' or 'cross', got {cfg.text_attention!r}")
  if cfg.attention_layout not in ATTENTION_LAYOUTS:
    raise ValueError(f"attention_layout must be one of {ATTENTION_LAYOUTS}, got "
                     f"{cfg.attention_layout!r}")
  if len(cfg.num_res_blocks) != len(cfg.channel_mults):
    raise ValueError(f"num_res_blocks {cfg.num_res_blocks} needs one entry per level "
                     f"of channel_mults {cfg.channel_mults}")
  if cfg.exemplar is not None:
    unknown = set(cfg.exemplar.attention_resolutions) - set(level_resolutions(cfg))
    if unknown:
      raise ValueError(f"exemplar.attention_resolutions {sorted(unknown)} are not UNet "
                       f"level resolutions {level_resolutions(cfg)}")


class Conditioning(nn.Module):
  """log-SNR (+ noise-aug log-SNR) + pooled text -> embedding; LayerNormed text."""

  config: UNetConfig

  @nn.compact
  def __call__(self, log_snr: Array, text_emb: Array, text_mask: Array,
               aug_log_snr: Array | None = None) -> tuple[Array, Array]:
    """Returns ([B, 4 * base_channels] embedding, [B, L, D] normalised text)."""
    cfg, kw = self.config, _dtypes(self.config)
    width = 4 * cfg.base_channels
    emb = layers.NoiseLevelEmbedding(width, cfg.base_channels, name="time_embed",
                                     **kw)(log_snr)
    if cfg.low_res_size:
      if aug_log_snr is None:
        raise ValueError("a super-resolution UNet needs aug_log_snr [B]")
      emb = emb + layers.NoiseLevelEmbedding(width, cfg.base_channels, name="aug_embed",
                                             **kw)(aug_log_snr)
    text = layers.layer_norm(name="text_norm", **kw)(text_emb.astype(kw["dtype"]))
    text = layers.constrain_tokens(text)
    pooled = attention.AttentionPool(width, cfg.num_heads, name="text_pool",
                                     **kw)(text, text_mask)
    return emb + pooled, text


def attends(cfg: UNetConfig, block: int, num_blocks: int) -> bool:
  """Whether block `block` of a level's `num_blocks` carries the level's attention."""
  return cfg.attention_layout == "every_block" or block == num_blocks - 1


class ResAttnBlock(nn.Module):
  """ResBlock, then (when `attend`) the self/text and exemplar attention of its level."""

  config: UNetConfig
  channels: int
  resolution: int
  attend: bool = True

  @nn.compact
  def __call__(self, h: Array, emb: Array, text: Array, text_mask: Array,
               exemplar_features: ExemplarFeatures | None, train: bool) -> Array:
    """[B, H, W, C_in] -> [B, H, W, channels]."""
    cfg, kw = self.config, _dtypes(self.config)
    h = layers.ResBlock(self.channels, cfg.dropout, name="res", **kw)(h, emb, train)
    if not self.attend:
      return h
    attend = functools.partial(attention.AttentionBlock, cfg.num_heads, **kw)
    self_res = self.resolution in cfg.attention_resolutions
    text_res = self.resolution in text_resolutions(cfg)
    if self_res and cfg.text_attention == "concat":
      context = text if text_res else None
      h = h + attend(null_kv=text_res, name="attn")(h, context, text_mask)
    else:
      if self_res:
        h = h + attend(name="attn")(h)
      if text_res:
        h = h + attend(self_attend=False, null_kv=True, name="text_attn")(h, text, text_mask)
    key = str(self.resolution)
    if exemplar_features is not None and key in exemplar_features.tokens:
      h = exemplar.ExemplarAttention(
          cfg.num_heads, cfg.exemplar.position_embedding, name="exemplar_attn", **kw)(
              h, exemplar_features.tokens[key], exemplar_features.mask[key])
    return h


class DownStack(nn.Module):
  """Input conv + the downsampling levels (shared by generation and exemplars)."""

  config: UNetConfig

  @nn.compact
  def __call__(self, x: Array, emb: Array, text: Array, text_mask: Array,
               exemplar_features: ExemplarFeatures | None,
               train: bool) -> tuple[Array, list[Array], dict[int, Array]]:
    """Runs the down path.

    Args:
      x: [B, H, W, C_in] model input (x_t, with the upsampled low-res image).
      emb: [B, E] conditioning embedding.
      text: [B, L, D] normalised text; text_mask: [B, L].
      exemplar_features: tokens to attend to, or None (exemplar encoding).
      train: dropout switch.

    Returns:
      (lowest-level features, skip connections, {resolution: level output}).
    """
    cfg, kw = self.config, _dtypes(self.config)
    h = layers.conv(cfg.base_channels, name="conv_in", **kw)(x.astype(kw["dtype"]))
    skips = [] if cfg.efficient else [h]
    features = {}
    levels = zip(cfg.channel_mults, cfg.num_res_blocks, level_resolutions(cfg))
    for level, (mult, num_blocks, res) in enumerate(levels):
      if cfg.efficient and level > 0:  # Efficient UNet: downsample before the convs.
        h = layers.Downsample(name=f"downsample_{level}", **kw)(h)
      for i in range(num_blocks):
        h = ResAttnBlock(cfg, cfg.base_channels * mult, res, attends(cfg, i, num_blocks),
                         name=f"level_{level}_block_{i}")(
                             h, emb, text, text_mask, exemplar_features, train)
        if not cfg.efficient:
          skips.append(h)
      features[res] = h
      if cfg.efficient:
        skips.append(h)
      elif level < len(cfg.channel_mults) - 1:
        h = layers.Downsample(name=f"downsample_{level}", **kw)(h)
        skips.append(h)
    return h, skips, features


class MiddleBlock(nn.Module):
  """ResAttnBlock + ResBlock at the lowest resolution."""

  config: UNetConfig

  @nn.compact
  def __call__(self, h: Array, emb: Array, text: Array, text_mask: Array,
               exemplar_features: ExemplarFeatures | None, train: bool) -> Array:
    """[B, h, w, C] -> [B, h, w, C]."""
    cfg, kw = self.config, _dtypes(self.config)
    channels = cfg.base_channels * cfg.channel_mults[-1]
    h = ResAttnBlock(cfg, channels, level_resolutions(cfg)[-1], name="block")(
        h, emb, text, text_mask, exemplar_features, train)
    return layers.ResBlock(channels, cfg.dropout, name="res_out", **kw)(h, emb, train)


class UpStack(nn.Module):
  """The upsampling levels, consuming the down path's skip connections."""

  config: UNetConfig

  @nn.compact
  def __call__(self, h: Array, skips: list[Array], emb: Array, text: Array,
               text_mask: Array, exemplar_features: ExemplarFeatures | None,
               train: bool) -> Array:
    """[B, h, w, C] + skips -> [B, H, W, C_0]."""
    cfg, kw = self.config, _dtypes(self.config)
    skips = list(skips)
    levels = list(enumerate(zip(cfg.channel_mults, cfg.num_res_blocks, level_resolutions(cfg))))
    for level, (mult, num_blocks, res) in reversed(levels):
      block = functools.partial(ResAttnBlock, cfg, cfg.base_channels * mult, res)
      if cfg.efficient:  # One scaled skip per level; upsample after the convs.
        h = jnp.concatenate([h, skips.pop() * SKIP_SCALE], axis=-1)
        for i in range(num_blocks):
          h = block(attend=attends(cfg, i, num_blocks), name=f"level_{level}_block_{i}")(
              h, emb, text, text_mask, exemplar_features, train)
      else:
        for i in range(num_blocks + 1):
          h = jnp.concatenate([h, skips.pop()], axis=-1)
          h = block(attend=attends(cfg, i, num_blocks + 1), name=f"level_{level}_block_{i}")(
              h, emb, text, text_mask, exemplar_features, train)
      if level > 0:
        h = layers.Upsample(name=f"upsample_{level}", **kw)(h)
    return h


class OutputHead(nn.Module):
  """GroupNorm -> SiLU -> 3x3 conv to the output channels."""

  config: UNetConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, out_channels] float32."""
    cfg, kw = self.config, _dtypes(self.config)
    h = nn.silu(layers.group_norm(h.shape[-1], name="norm", **kw)(h))
    return layers.conv(cfg.out_channels, name="conv", **kw)(h).astype(jnp.float32)


class UNet(nn.Module):
  """Imagen / Efficient UNet, optionally with SuTI exemplar attention.

  Call contract: docs/architecture.md ("Model call"). Exemplar-specific
  submodules are named `exemplar_*` (see models/surgery.py).
  """

  config: UNetConfig

  def setup(self):
    cfg = self.config
    validate_config(cfg)
    self.cond = Conditioning(cfg)
    self.down = DownStack(cfg)
    self.mid = MiddleBlock(cfg)
    self.up = UpStack(cfg)
    self.head = OutputHead(cfg)
    if cfg.exemplar is not None and cfg.exemplar.include_caption_tokens:
      # Caption tokens join the exemplar tokens at each resolution's width.
      self.exemplar_caption_proj = {
          str(r): layers.dense(level_channels(cfg, r), **_dtypes(cfg))
          for r in cfg.exemplar.attention_resolutions}

  def _model_input(self, x: Array, low_res: Array | None) -> Array:
    """x [B, H, W, C], plus for SR stages low_res resized to H x W on channels."""
    if not self.config.low_res_size:
      return x
    if low_res is None:
      raise ValueError("a super-resolution UNet needs low_res [B, h, w, C]")
    b, height, width, _ = x.shape
    up = jax.image.resize(low_res.astype(x.dtype), (b, height, width, low_res.shape[-1]),
                          method="bicubic")
    return layers.constrain_image(jnp.concatenate([x, up], axis=-1))

  def encode_exemplars(self, images: Array, text_emb: Array, text_mask: Array,
                       mask: Array, low_res: Array | None = None) -> ExemplarFeatures:
    """Encodes K exemplars per example with the UNet's own downstack.

    The exemplars run as a batch of B*K at log-SNR `exemplar.encoder_log_snr`
    (noised deterministically, x_t = alpha * x_0, see
    `exemplar.noised_exemplar_images`), each conditioned on its own caption;
    SR stages get an exemplar low-res input by downsampling the exemplar (noise
    aug at the same log-SNR). No dropout, so cached features equal on-the-fly ones.

    Args:
      images: [B, K, H, W, C] exemplar images in [-1, 1].
      text_emb: [B, K, L, D] caption embeddings.
      text_mask: [B, K, L] bool.
      mask: [B, K] bool; False = padded slot.
      low_res: [B, K, h, w, C] exemplar low-res inputs (SR only; default derived).

    Returns:
      ExemplarFeatures with [B, K*N_r, C_r] tokens per resolution r (image
      tokens with grid positions when `exemplar.position_embedding`).
    """
    cfg = self.config
    if cfg.exemplar is None:
      raise ValueError("encode_exemplars needs UNetConfig.exemplar")
    b, k = mask.shape
    flat = lambda a: rearrange(a, "b k ... -> (b k) ...")
    log_snr = jnp.full((b * k,), cfg.exemplar.encoder_log_snr, jnp.float32)
    x = exemplar.noised_exemplar_images(flat(images), cfg.exemplar.encoder_log_snr)
    if cfg.low_res_size and low_res is None:
      size = (b * k, cfg.low_res_size, cfg.low_res_size, images.shape[-1])
      low_res_flat = jax.image.resize(flat(images), size, method="bilinear")
    else:
      low_res_flat = None if low_res is None else flat(low_res)
    caption_mask = flat(text_mask)
    emb, captions = self.cond(log_snr, flat(text_emb), caption_mask,
                              log_snr if cfg.low_res_size else None)
    x = self._model_input(x.astype(jnp.dtype(cfg.dtype)), low_res_flat)
    _, _, features = self.down(x, emb, captions, caption_mask, None, False)
    if not cfg.exemplar.encoder_gradients:
      # Constants of the step for the shared layers; exemplar-only layers below
      # (the caption projection) still learn.
      features, captions = jax.lax.stop_gradient((features, captions))
    tokens, token_mask = {}, {}
    for res in cfg.exemplar.attention_resolutions:
      key = str(res)
      image = features[res]
      if cfg.exemplar.position_embedding:
        image = exemplar.with_positions(image)
      tokens[key], token_mask[key] = exemplar.image_tokens(image, mask)
      if cfg.exemplar.include_caption_tokens:
        caption_tok, caption_tok_mask = exemplar.caption_tokens(
            self.exemplar_caption_proj[key](captions), text_mask, mask)
        tokens[key] = jnp.concatenate([tokens[key], caption_tok], axis=1)
        token_mask[key] = jnp.concatenate([token_mask[key], caption_tok_mask], axis=1)
      tokens[key] = layers.constrain_tokens(tokens[key])
    return ExemplarFeatures(tokens=tokens, mask=token_mask)

  def __call__(self, x_t: Array, log_snr: Array, text_emb: Array, text_mask: Array, *,
               low_res: Array | None = None, aug_log_snr: Array | None = None,
               exemplars: ExemplarInputs | None = None,
               exemplar_features: ExemplarFeatures | None = None,
               train: bool = False) -> Array:
    """Predicts eps (or v) for x_t.

    Args:
      x_t: [B, H, W, in_channels] noisy images.
      log_snr: [B] noise levels.
      text_emb: [B, L, D] text embeddings; text_mask: [B, L] bool (all False =
        no text).
      low_res: SR only, [B, h, w, C] noise-augmented low-res image.
      aug_log_snr: SR only, [B] noise-augmentation level of `low_res`.
      exemplars: SuTI demonstrations, encoded on the fly.
      exemplar_features: or the cached `encode_exemplars` output. With neither
        (or an all-False exemplar mask) exemplar attention adds exactly 0.
      train: enables dropout (needs a 'dropout' rng when dropout > 0).

    Returns:
      [B, H, W, out_channels] float32 prediction.
    """
    cfg = self.config
    if exemplars is not None:
      if exemplar_features is not None:
        raise ValueError("pass exemplars or exemplar_features, not both")
      exemplar_features = self.encode_exemplars(
          exemplars.images, exemplars.text_emb, exemplars.text_mask, exemplars.mask)
    if exemplar_features is not None and cfg.exemplar is None:
      raise ValueError("exemplars given to a UNet without UNetConfig.exemplar")
    emb, text = self.cond(log_snr, text_emb, text_mask, aug_log_snr)
    x = self._model_input(layers.constrain_image(x_t.astype(jnp.dtype(cfg.dtype))), low_res)
    h, skips, _ = self.down(x, emb, text, text_mask, exemplar_features, train)
    h = self.mid(h, emb, text, text_mask, exemplar_features, train)
    h = self.up(h, skips, emb, text, text_mask, exemplar_features, train)
    return self.head(h)


def dummy_inputs(cfg: UNetConfig, batch_size: int, text_len: int) -> dict[str, Any]:
  """Zero inputs for `UNet(cfg).init` (with K_max exemplars when configured).

  Args:
    cfg: the UNet config.
    batch_size: B.
    text_len: L, tokens per text.

  Returns:
    Keyword arguments for `UNet.__call__`.
  """
  b, size, d = batch_size, cfg.image_size, cfg.text_embed_dim
  inputs = dict(
      x_t=jnp.zeros((b, size, size, cfg.in_channels), jnp.float32),
      log_snr=jnp.zeros((b,), jnp.float32),
      text_emb=jnp.zeros((b, text_len, d), jnp.float32),
      text_mask=jnp.zeros((b, text_len), bool))
  if cfg.low_res_size:
    inputs["low_res"] = jnp.zeros((b, cfg.low_res_size, cfg.low_res_size, cfg.in_channels),
                                  jnp.float32)
    inputs["aug_log_snr"] = jnp.zeros((b,), jnp.float32)
  if cfg.exemplar is not None:
    k = cfg.exemplar.max_exemplars
    inputs["exemplars"] = ExemplarInputs(
        images=jnp.zeros((b, k, size, size, cfg.in_channels), jnp.float32),
        text_emb=jnp.zeros((b, k, text_len, d), jnp.float32),
        text_mask=jnp.zeros((b, k, text_len), bool),
        mask=jnp.zeros((b, k), bool))
  return inputs


def init_params(cfg: UNetConfig, key: Array, text_len: int) -> dict[str, Any]:
  """Boxed variables ({'params': ...}) of `UNet(cfg)`; works under jax.eval_shape.

  Bind the static arguments first (a config is not a pytree):
  `jax.eval_shape(functools.partial(init_params, cfg, text_len=L), key)`.

  Args:
    cfg: the UNet config.
    key: PRNG key.
    text_len: L used for the dummy text (parameters do not depend on it).

  Returns:
    Variables whose leaves are `nn.LogicallyPartitioned` boxes.
  """
  return UNet(cfg).init({"params": key}, **dummy_inputs(cfg, 1, text_len))
