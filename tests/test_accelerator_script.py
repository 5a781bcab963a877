"""benchmarks/accelerator.sh --dry_run: every step of the accelerator run on the :test configs."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "accelerator.sh")


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "acc"
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run(
        ["bash", SCRIPT, "--dry_run", "--dry_run_seconds=60", f"--output={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "SUMMARY.md").read_text()
    assert "FAILED" not in summary
    for name in ("quick_tests", "memory", "learning_curve"):
        assert f"- {name}: ok in " in summary, summary
    # A float32 and a bfloat16 timing line per config (the dry run times
    # Tetrominoes), each with its step time.
    times = (out / "step_times.txt").read_text().splitlines()
    assert [line.split(":")[:2] for line in times] == [
        ["float32", " tetrominoes"],
        ["bfloat16", " tetrominoes"],
    ]
    assert all("ms/iteration" in line for line in times)
    memory = json.loads((out / "memory.json").read_text())
    assert [row["config"] for row in memory] == ["tetrominoes", "mnist_hard"]
    curve = json.loads((out / "tetrominoes" / "learning_curve.json").read_text())
    assert curve and all("ari_fg" in row for row in curve)


def test_bad_arguments_are_named():
    done = subprocess.run(
        ["bash", SCRIPT, "--bogus"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
    done = subprocess.run(["bash", SCRIPT], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--output=DIR is required" in done.stderr
