"""SIGKILL at seeded random moments, mid-save included: the resumed run is bitwise equal.

Slow (several `python -m tusk_jax.main` runs); run with
`python -m pytest -q -m faults_slow tests/test_faults.py tests/test_faults_kill.py`.

The kill points are drawn once from a seeded generator, so every run of the
test kills at the same kinds of moments (which instant inside a save is hit
depends on the machine, and any instant must be survivable): while orbax
writes step k (its `k.orbax-checkpoint-tmp` folder exists), right after step k
is complete, or between two saves once step n is logged.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tusk_jax import checkpointing

REPO = os.path.join(os.path.dirname(__file__), "..")
NUM_STEPS = 8
ARGS = [
    "--config=configs/tetrominoes.py:test",
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.train.checkpoint_every=2",
    "--config.train.image_every=4",
    "--config.train.max_to_keep=2",
]
# (kind, step): "mid_save" kills while step's save is in progress,
# "after_save" once it is complete, "logged" once step's metrics are written.
CANDIDATES = [
    ("mid_save", 2),
    ("logged", 3),
    ("after_save", 4),
    ("mid_save", 4),
    ("logged", 5),
    ("mid_save", 6),
    ("after_save", 6),
    ("logged", 7),
]


def kill_points(seed: int = 15, count: int = 3) -> list[tuple[str, int]]:
    """`count` kill points in increasing step order, at least one of them mid-save."""
    rng = np.random.default_rng(seed)
    while True:
        chosen = sorted(rng.choice(len(CANDIDATES), count, replace=False))
        points = [CANDIDATES[i] for i in chosen]
        steps = [step for _, step in points]
        if any(kind == "mid_save" for kind, _ in points) and len(set(steps)) == len(steps):
            return points


def _last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.strip()]
    return max(steps, default=0)


def _reached(workdir: str, kind: str, step: int) -> bool:
    checkpoints = os.path.join(workdir, "checkpoints")
    if kind == "mid_save":
        return os.path.isdir(os.path.join(checkpoints, f"{step}.orbax-checkpoint-tmp"))
    if kind == "after_save":
        return os.path.isdir(os.path.join(checkpoints, str(step)))
    return _last_logged_step(workdir) >= step


def _start(workdir: str, data_dir: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tusk_jax.main",
            *ARGS,
            f"--workdir={workdir}",
            f"--config.dataset.data_dir={data_dir}",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_until(workdir, data_dir, point, timeout=600.0) -> bool:
    """Runs main until `point` is reached (then SIGKILL: True) or it exits (False)."""
    process = _start(workdir, data_dir)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if point is not None and _reached(workdir, *point):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)
                return True
            time.sleep(0.02)
        assert process.poll() is not None, f"main did not finish within {timeout} s"
        stderr = process.stderr.read()
        assert process.returncode == 0, stderr[-3000:]
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        process.stderr.close()


@pytest.mark.slow
@pytest.mark.faults_slow
def test_sigkill_at_random_moments_resumes_bitwise(trained_tetrominoes, tmp_path):
    config, _ = trained_tetrominoes
    data_dir = config.dataset.data_dir
    reference = str(tmp_path / "uninterrupted")
    assert not _run_until(reference, data_dir, None)

    killed = str(tmp_path / "killed")
    delivered = [point for point in kill_points() if _run_until(killed, data_dir, point)]
    assert delivered, "no kill point was reached"
    assert not _run_until(killed, data_dir, None)  # resumes and finishes

    expected, step = checkpointing.restore_state(reference, config)
    found, found_step = checkpointing.restore_state(killed, config)
    assert step == found_step == NUM_STEPS
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(found), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
    print(f"kills delivered: {delivered}")
