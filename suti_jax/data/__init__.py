"""Training data: the record schema (records), image helpers (images), tf.data input (input).

Submodules are imported explicitly so `suti_jax.data.synthetic` does not pull in TensorFlow.
"""
