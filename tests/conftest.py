"""Test-wide setup: two host CPU devices and a persistent compilation cache.

XLA reads XLA_FLAGS and jax reads its JAX_* variables once, at import, so they
are set here, before any test module imports jax. Being environment variables,
they also reach the processes tests start (multi-process runs, notebook
kernels), which then share the compilation cache.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiles dominate the suite's time on CPU; a cache shared by the xdist
# workers and subprocesses makes the second compile of the same program cheap.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get(
        "TUSK_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tusk_jax_xla")
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402, F401
