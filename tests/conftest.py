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

import fcntl  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402, F401
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_tetrominoes(tmp_path_factory, worker_id):
    """`(config, workdir)`: tetrominoes:test trained by `train.fit` (4 steps).

    Trained once per test run: the xdist workers share one folder and a file
    lock, so whichever worker comes first trains and the others reuse it.
    """
    from configs import tetrominoes
    from tusk_jax import train

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base
    config = tetrominoes.get_config("test")
    with config.unlocked():
        config.dataset.data_dir = str(shared / "tusk_data")
    workdir = shared / "tusk_trained_tetrominoes"
    with open(shared / "tusk_trained_tetrominoes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "checkpoints" / str(config.train.num_steps)).is_dir():
            shutil.rmtree(workdir, ignore_errors=True)
            train.fit(config, str(workdir))
    return config, str(workdir)


def pytest_collection_modifyitems(config, items):
    """Tests marked `faults_slow` run only when selected: `pytest -m faults_slow`."""
    if "faults_slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fault injection: run with -m faults_slow")
    for item in items:
        if "faults_slow" in item.keywords:
            item.add_marker(skip)
