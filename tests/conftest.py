"""Test-wide setup: two host CPU devices and a persistent compilation cache.

XLA reads XLA_FLAGS once, when jax initialises its backends, so the flag is
set here, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compiles dominate the suite's time on CPU; a cache shared by the xdist
# workers and reruns makes the second compile of the same program free.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "TUSK_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tusk_jax_xla")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
