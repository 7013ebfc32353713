"""Training data: record schema (records), image helpers (images), tf.data (sources, input).

Submodules are imported explicitly so `suti_jax.data.synthetic` does not pull in TensorFlow.
"""
