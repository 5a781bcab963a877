"""tusk_jax: TUSK (Task-agnostic UnSupervised Keypoints, NeurIPS 2022) in JAX/Flax."""

__version__ = "0.1.0"
