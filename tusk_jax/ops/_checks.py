"""Argument checks shared by the ops.

Shapes and static sizes are known when a function is traced, so these checks
run once per compilation and cost nothing at run time. Each raises a
`ValueError` that names the offending argument.
"""

from typing import Any

import jax.numpy as jnp


def check_rank(name: str, array: Any, rank: int, last_dim: int | None = None) -> None:
    """Raises if `array` does not have `rank` axes (and trailing size `last_dim`)."""
    shape = jnp.shape(array)
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(shape)}.")
    if last_dim is not None and shape[-1] != last_dim:
        raise ValueError(
            f"{name} must have trailing dimension {last_dim}, got shape {tuple(shape)}."
        )


def check_float(name: str, array: Any) -> None:
    """Raises if `array` is not of a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(array), jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {jnp.result_type(array)}.")


def check_window(window: Any) -> None:
    """Raises unless `window` is a positive odd Python int."""
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}.")


def check_positive(name: str, value: Any) -> None:
    """Raises if a static (Python) number is <= 0; traced values are not checked."""
    if isinstance(value, int | float) and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_padding(padding: Any) -> None:
    """Raises unless `padding` is one of the two supported modes."""
    if padding not in ("reflect", "constant"):
        raise ValueError(f"padding must be 'reflect' or 'constant', got {padding!r}.")
