"""Logical axis names and the one table that maps them to mesh axes.

Parameters and activations name their dimensions with these constants; only
`DEFAULT_RULES` (or a config's override of it) says which mesh axis shards them.
"""

# Mesh axes. `data` is pure data parallelism (params replicated), `fsdp` shards
# the batch *and* the parameters/optimizer state (ZeRO-3 style), `tensor` shards
# heads and MLP/conv channels (Megatron style).
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Parameter axes.
EMBED = "embed"  # Model width of a dense/conv input (the dimension FSDP shards).
MLP = "mlp"  # Hidden width of an MLP or the output channels of a conv.
HEADS = "heads"  # Attention heads.
KV = "kv"  # Per-head feature size.
CONV_IN = "conv_in"  # Input channels of a conv kernel.
CONV_OUT = "conv_out"  # Output channels of a conv kernel.
CONV_HEIGHT = "conv_height"  # Kernel height (never sharded).
CONV_WIDTH = "conv_width"  # Kernel width (never sharded).
NORM = "norm"  # Scale/bias of a normalisation layer (replicated).
VOCAB = "vocab"  # Token embedding table rows.
REL_POS = "rel_pos"  # Relative-position buckets of T5 (replicated).

# Activation axes.
ACT_BATCH = "act_batch"  # Examples in a batch.
ACT_EXEMPLAR = "act_exemplar"  # Exemplar slots K of one ICL group.
ACT_HEIGHT = "act_height"
ACT_WIDTH = "act_width"
ACT_CHANNELS = "act_channels"
ACT_TOKENS = "act_tokens"  # Text tokens or flattened spatial tokens.

# (logical axis, mesh axis or axes or None). The first matching rule wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (ACT_BATCH, (DATA, FSDP)),
    (ACT_EXEMPLAR, None),
    (ACT_HEIGHT, None),
    (ACT_WIDTH, None),
    # Activation channels stay whole: split on `tensor` (with batch on data x fsdp
    # and conv_in on fsdp), XLA's SPMD partitioner swaps batch blocks of a 3x3
    # conv's input gradient (jax 0.10.2; docs/act_channels_xla_report.md). A strict
    # xfail in tests/test_sharding.py says when a fix lets this rule come back.
    (ACT_CHANNELS, None),
    (ACT_TOKENS, None),
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (KV, None),
    (CONV_IN, FSDP),
    (CONV_OUT, TENSOR),
    (CONV_HEIGHT, None),
    (CONV_WIDTH, None),
    (NORM, None),
    (VOCAB, TENSOR),
    (REL_POS, None),
)
