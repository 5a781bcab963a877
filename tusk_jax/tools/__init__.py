"""Command-line tools beside the library (nothing in tusk_jax imports them)."""
