"""`python -m tusk_jax.main` end to end: a finished run started again resumes, not restarts.

It prints the config as its differences from the base defaults and ends with one line
naming the workdir, the step and the commands to run next.
"""

import os
import shutil
import subprocess
import sys

from tusk_jax import cli

REPO = os.path.join(os.path.dirname(__file__), "..")


def test_main_resumes_a_finished_run(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = sorted(os.listdir(workdir / "checkpoints"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tusk_jax.main",
            "--config=configs/tetrominoes.py:test",
            f"--workdir={workdir}",
            f"--config.dataset.data_dir={config.dataset.data_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from the checkpoint of step {config.train.num_steps}" in result.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == before
    # The config as the fields that differ from the base defaults, not all of it.
    assert f"fields differ from the base defaults (the full config: {workdir}/config.json):" in (
        result.stderr
    )
    assert "  model.window: 5 (default 27)" in result.stderr
    assert "  seed:" not in result.stderr
    # The last line: where the run is and what to run next.
    assert result.stdout.splitlines()[-1] == cli.finished_line(str(workdir), config.train.num_steps)
    assert result.stdout.splitlines()[-1].startswith(f"done: {workdir} at step 4; next: ")


def test_main_rejects_a_bad_override(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tusk_jax.main",
            "--config=configs/tetrominoes.py:test",
            f"--workdir={tmp_path}",
            "--config.model.window=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "model.window" in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
