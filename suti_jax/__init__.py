"""suti_jax: subject-driven text-to-image diffusion (SuTI) in JAX/Flax."""

from suti_jax import xla_flags

xla_flags.add_cpu_flags()
