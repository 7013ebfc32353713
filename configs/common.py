"""Shared pieces of the `get_config()` files: argument parsing and the skeleton.

Every config accepts `tiny` (CPU, seconds). The skeleton lists every section so
`--config.a.b=v` overrides are checked against it (configs are locked).
"""

import difflib
from typing import Collection

import ml_collections

from suti_jax.parallel import axes


def parse_arg(arg: str | None, known: Collection[str]) -> set[str]:
  """Splits a `get_config` argument into options, refusing unknown ones.

  A typo such as `:tinny` would otherwise build the full-size model.

  Args:
    arg: 'tiny,foo'; None or '' -> no options.
    known: the options this config accepts, e.g. ('tiny',).

  Returns:
    The set of options.

  Raises:
    ValueError: naming the first unknown option and the known ones.
  """
  opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
  for opt in sorted(opts - set(known)):
    close = difflib.get_close_matches(opt, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown config option {opt!r}{hint}; known options: {sorted(known)}")
  return opts


def text_encoder(tiny: bool) -> ml_collections.ConfigDict:
  """T5-XXL (Imagen) or a tiny byte-level T5 for CPU runs."""
  if tiny:
    return ml_collections.ConfigDict(dict(
        # 259 byte ids padded to 264 so the table divides any tensor axis <= 8.
        tokenizer="byte", spm_path="", weights_path="", vocab_size=264,
        d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        max_length=16, dtype="float32"))
  return ml_collections.ConfigDict(dict(
      tokenizer="sentencepiece", spm_path="", weights_path="", vocab_size=32128,
      d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      max_length=128, dtype="bfloat16"))


def exemplar(attention_resolutions: tuple[int, ...]) -> ml_collections.ConfigDict:
  """SuTI exemplar attention at `attention_resolutions` (px), K_max = 5 (the paper's)."""
  return ml_collections.ConfigDict(dict(
      max_exemplars=5, attention_resolutions=attention_resolutions,
      include_caption_tokens=True, encoder_log_snr=20.0, position_embedding=True,
      encoder_gradients=True))


def skeleton(stage: str) -> ml_collections.ConfigDict:
  """All sections with their defaults; stage configs change a few fields."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.model = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict()
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="cosine", prediction="eps", loss_weighting="none",
      min_snr_gamma=5.0, log_snr_min=-20.0, log_snr_max=20.0,
      text_drop_prob=0.1, exemplar_drop_prob=0.0, both_drop_prob=0.0,
      noise_aug_max=0.5))
  c.sampling = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=50, eta=0.0, guidance="cfg",
      guidance_scale=1.35, text_guidance_scale=1.35,
      exemplar_guidance_scale=1.35, threshold="dynamic",
      threshold_percentile=0.995, noise_aug_level=0.0))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adafactor", learning_rate=1e-4, warmup_steps=10_000,
      schedule="constant", decay_steps=0, end_learning_rate=0.0,
      weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0, ema_decay=0.9999,
      ema_warmup_steps=0, grad_accum_steps=1, trainable="all"))
  c.mesh = ml_collections.ConfigDict(dict(
      ici_data=-1, ici_fsdp=1, ici_tensor=1, dcn_data=1, dcn_fsdp=1,
      dcn_tensor=1))
  # (logical axis, mesh axes) pairs; see suti_jax/parallel/axes.py.
  c.axis_rules = [list(r) for r in axes.DEFAULT_RULES]
  c.data = ml_collections.ConfigDict(dict(
      kind="synthetic", pattern="", shuffle_buffer=1000, corrupt_policy="fail", cache=False,
      precomputed_embeddings=False, num_subjects=64, seed=0))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=2048, total_steps=2_500_000, seed=0, log_every_steps=100,
      checkpoint_every_steps=5000, keep_checkpoints=3, sample_every_steps=0,
      peak_flops_per_device=0.0, restore_step=0))
  return c


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config in place to run on 2 CPU cores in seconds."""
  c.text = text_encoder(tiny=True)
  c.model.text_embed_dim = c.text.d_model
  c.model.num_heads = 2
  # v-prediction keeps x0 estimates bounded at the lowest log-SNRs; with eps a
  # tiny, briefly trained model's first sampling steps blow up (see
  # tests/test_overfit.py: sample MSE 0.19 with eps vs 0.009 with v).
  c.diffusion.prediction = "v"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.optimizer.ema_decay = 0.99
  c.sampling.num_steps = 16
  c.train.batch_size = 8
  c.train.total_steps = 200
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 100
  c.train.peak_flops_per_device = 1e11  # A rough 2-core CPU figure for MFU.
  c.data.num_subjects = 16
