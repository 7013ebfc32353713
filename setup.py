"""suti_jax: subject-driven text-to-image diffusion (SuTI) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="suti_jax",
    version="0.1.0",
    description="SuTI-style subject-driven text-to-image diffusion in JAX/Flax, TPU-first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["suti_jax", "suti_jax.*", "configs", "launch", "data_pipeline"]),
    install_requires=[
        "jax>=0.10.2", "flax>=0.12.8", "optax>=0.2.8", "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0", "einops>=0.8.2", "tensorflow-cpu>=2.21.0",
        "tensorboard>=2.21.0", "apache-beam[tfrecord]>=2.77.0", "clu>=0.0.12",
        "gin-config>=0.5.0", "numpy>=2.4", "safetensors>=0.8.0", "pillow>=12.3.0",
        "sentencepiece>=0.2.2", "tqdm>=4.70.1",
    ],
    extras_require={"test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0"]},
)
