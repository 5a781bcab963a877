"""The documented defaults, re-exported: they live in `tusk_jax/configs/base.py`.

Kept so that configs written as `from configs import base` keep working;
new configs can import `from tusk_jax.configs import base`, which needs no
`configs` folder on the path.
"""

from tusk_jax.configs.base import (
    VARIANTS,
    cpu_overrides,
    finalize,
    get_base_config,
    test_overrides,
)

__all__ = ["VARIANTS", "cpu_overrides", "finalize", "get_base_config", "test_overrides"]
