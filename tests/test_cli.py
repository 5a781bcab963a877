"""What the command lines share (`tusk_jax.cli`) and the progress bar's clock (`tusk_jax.progress`).

The logging filters on records, the commands on the shared trained run
(`python -m tusk_jax.evaluate` in a subprocess: quiet by default, the library
INFO lines with --verbosity=1), the config summary and the last line of a
training run, and a resumed run whose progress bar leaves the compiled first
step out of its rate.
"""

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from tqdm import std as tqdm_std
from tqdm import tqdm

import tusk_jax
from tests.test_train import FakeTrainIterator, make_config
from tusk_jax import cli, config_lib, datasets, progress, train

REPO = os.path.join(os.path.dirname(__file__), "..")
PACKAGE = os.path.dirname(os.path.abspath(tusk_jax.__file__))
# absl's line prefix: level letter, date, time, thread, file:line].
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", re.MULTILINE)


def record(path: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, message, None, None)


def test_project_lines_pass_library_info_is_hidden_and_repeats_shown_once():
    ours = os.path.join(PACKAGE, "evaluate.py")
    orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpointer.py")
    tfds = os.path.join("site-packages", "tensorflow_datasets", "core", "file_utils.py")
    shown = cli._ProjectInfoOnly()
    assert shown.filter(record(ours, logging.INFO, "Wrote x"))
    assert not shown.filter(record(orbax, logging.INFO, "Saving"))
    assert not shown.filter(record(orbax, logging.ERROR, "Save failed"))  # Reported by tusk_jax.
    assert shown.filter(record(tfds, logging.WARNING, "no dataset_info.json"))
    once = cli._LibraryLinesOnce()
    assert once.filter(record(tfds, logging.WARNING, "no dataset_info.json"))
    assert not once.filter(record(tfds, logging.WARNING, "no dataset_info.json"))
    assert once.filter(record(tfds, logging.WARNING, "another warning"))
    assert once.filter(record(ours, logging.WARNING, "a repeated tusk_jax warning"))
    assert once.filter(record(ours, logging.WARNING, "a repeated tusk_jax warning"))


def test_verbosity_1_shows_library_info_but_not_library_debug():
    ours = os.path.join(PACKAGE, "evaluate.py")
    orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpointer.py")
    shown = cli._NoLibraryDebug()
    assert shown.filter(record(orbax, logging.INFO, "Saving"))
    assert not shown.filter(record(orbax, logging.DEBUG, "Chunk layout"))
    assert shown.filter(record(ours, logging.DEBUG, "Write error in thread"))


def test_an_unprepared_dataset_is_no_warning(tmp_path, caplog):
    config = make_config()
    with config.unlocked():
        config.dataset.data_dir = str(tmp_path)
    builder = datasets.get_builder(config)
    os.makedirs(builder.data_path)  # Even a folder tfds would call a variant without info.
    with caplog.at_level(logging.INFO):
        assert not datasets.is_prepared(builder)
    assert "dataset_info.json" not in caplog.text


@pytest.fixture(scope="module")
def run_copy(trained_tetrominoes, tmp_path_factory):
    """A copy of the shared run (evaluation writes eval/ into its workdir)."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(trained_tetrominoes[1], workdir, ignore=shutil.ignore_patterns("eval"))
    return str(workdir)


def module_files() -> set[str]:
    return {name for _, _, files in os.walk(PACKAGE) for name in files if name.endswith(".py")}


@pytest.mark.parametrize("verbosity", [None, 1])
def test_evaluate_hides_library_info_lines_unless_verbosity_1(run_copy, verbosity):
    args = [f"--workdir={run_copy}", "--num_examples=4", "--tsne_points=0"]
    if verbosity is not None:
        args.append(f"--verbosity={verbosity}")
    done = subprocess.run(
        [sys.executable, "-m", "tusk_jax.evaluate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = ABSL_LINE.findall(done.stderr)
    ours = module_files()
    library_info = sorted({f for level, f in lines if level == "I" and f not in ours})
    assert "Restored step 4 from" in done.stderr  # tusk_jax's own INFO lines stay.
    if verbosity is None:
        assert library_info == [], library_info
    else:
        assert any("checkpoint" in f or "tensorstore" in f for f in library_info), library_info


def test_config_summary_lists_the_fields_that_differ_from_the_defaults():
    config = make_config()
    summary = cli.config_summary(config, "runs/x")
    head, *lines = summary.splitlines()
    changes = config_lib.config_changes(config_lib.base_defaults(), config)
    assert head == (
        f"Config: {len(changes)} fields differ from the base defaults "
        "(the full config: runs/x/config.json):"
    )
    assert len(lines) == len(changes) > 0
    assert "  model.window: 5 (default 27)" in lines
    assert "  variant: 'test'" in lines  # Not in the base config.
    assert not any(line.startswith("  dataset.name:") for line in lines)
    assert not any(line.startswith("  seed:") for line in lines)  # Equal to the default.


def test_finished_line_names_the_workdir_step_and_next_commands():
    assert cli.finished_line("runs/my run", 2000) == (
        "done: runs/my run at step 2000; next: "
        "python -m tusk_jax.evaluate --workdir='runs/my run' | "
        "python -m tusk_jax.detect --workdir='runs/my run' --input='IMAGES/*.png' "
        "--output=DETECTIONS | "
        "python -m tusk_jax.export --workdir='runs/my run' --output=EXPORTED"
    )


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rate_of(bar: tqdm) -> float:
    """The steps per second the bar shows (its moving average, else its mean)."""
    shown = bar.format_dict
    if shown["rate"]:
        return shown["rate"]
    return (shown["n"] - shown["initial"]) / shown["elapsed"]


@pytest.mark.parametrize("restart", [True, False])
def test_restart_clock_leaves_the_first_step_out_of_the_rate(monkeypatch, restart):
    clock = FakeClock()
    monkeypatch.setattr(tqdm_std, "time", clock)
    bar = tqdm(total=2000, initial=1000, disable=False, mininterval=2.0, file=open(os.devnull, "w"))
    clock.now += 3600.0  # The first step compiles for an hour.
    if restart:
        progress.restart_clock(bar, 1001)
    else:
        bar.update(1)
    for _ in range(20):
        clock.now += 0.5
        bar.update(1)
    assert bar.n == 1021
    eta_hours = (bar.total - bar.n) / rate_of(bar) / 3600
    if restart:
        assert rate_of(bar) == pytest.approx(2.0, rel=1e-6)
        assert eta_hours == pytest.approx(979 / 2 / 3600)
    else:  # What the bar showed before: the compile counted as a step.
        assert eta_hours > 10
    bar.close()


def test_a_resumed_runs_progress_rate_ignores_its_first_step(tmp_path, monkeypatch):
    """Training resumed at step 2: step 3 compiles (1000 s on the bar's clock), step 4 takes 1 s."""
    clock = FakeClock()
    monkeypatch.setattr(tqdm_std, "time", clock)

    def tick(position):
        clock.now += 1000.0 if position == 3 else 1.0

    monkeypatch.setattr(
        train.input_pipeline,
        "create_train_iterator",
        lambda config: FakeTrainIterator(config, on_step=tick),
    )
    bars = []
    restart = progress.restart_clock

    def kept(bar, n):
        bars.append(bar)
        restart(bar, n)

    monkeypatch.setattr(progress, "restart_clock", kept)
    train.fit(make_config(num_steps=2), str(tmp_path))
    bars.clear()
    train.fit(make_config(num_steps=4), str(tmp_path))
    (bar,) = bars
    assert (bar.initial, bar.n) == (3, 4)
    assert rate_of(bar) == pytest.approx(1.0)  # Not 2 steps / 1001 s.
