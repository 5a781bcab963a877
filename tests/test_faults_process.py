"""Faults of the training process: two writers, crashes, foreign checkpoints, signals.

One writer per workdir (`tusk_jax.workdir_lock`), an error exits within
seconds whatever the background threads do (`tusk_jax.process_exit`), each
step knows its run (`tusk_jax.run_identity`), and SIGTERM / Ctrl-C act at
once where there is nothing to save. The tests that start
`python -m tusk_jax.main` (or `tests/fault_main.py`, main with a fault
injected) are marked `faults_slow`:
`python -m pytest -q -m faults_slow tests/test_faults_process.py`.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from tusk_jax import checkpointing, config_lib, models, run_identity, train, workdir_lock
from tusk_jax import state as state_lib

REPO = os.path.join(os.path.dirname(__file__), "..")
FAULT_MAIN = os.path.join(os.path.dirname(__file__), "fault_main.py")


def _config(config, **overrides):
    new = type(config)(config.to_dict())
    for dotted, value in overrides.items():
        *section, field = dotted.split(".")
        (new[section[0]] if section else new)[field] = value
    return new


def _copy_run(trained, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(trained, workdir)
    return str(workdir)


def _hold_lock(workdir):
    """A child process holding the workdir's lock until killed (prints 'locked')."""
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from tusk_jax import workdir_lock
        workdir_lock.WorkdirLock({workdir!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def _main_command(*args, script=None):
    head = [script] if script else ["-m", "tusk_jax.main"]
    return [sys.executable, *head, "--config=configs/tetrominoes.py:test", *args]


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------
# 1. One writer per workdir.
# ----------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder_then_a_dead_holder_is_taken_over(
    trained_tetrominoes, tmp_path, caplog
):
    config, _ = trained_tetrominoes
    workdir = str(tmp_path / "run")
    holder = _hold_lock(workdir)
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError) as info:
            train.fit(_config(config, **{"train.num_steps": 1}), workdir)
        message = str(info.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}, started " in message
        assert "\n" not in message and "another --workdir" in message
        # Refused before anything was written: the lock file is all there is.
        assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
    finally:
        holder.kill()  # SIGKILL: no clean release, the record stays.
        holder.wait()
    assert json.load(open(workdir_lock.lock_path(workdir)))["pid"] == holder.pid
    caplog.set_level("WARNING")
    state = train.fit(_config(config, **{"train.num_steps": 1}), workdir)
    assert int(state.step) == 1
    assert any(
        "Taking over the lock" in r.getMessage() and f"pid {holder.pid}" in r.getMessage()
        for r in caplog.records
    )
    assert open(workdir_lock.lock_path(workdir)).read() == ""  # Released at the end.


def test_evaluation_does_not_need_the_lock(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    holder = _hold_lock(workdir)
    try:
        state, step = checkpointing.restore_state(workdir, config)
    finally:
        holder.kill()
        holder.wait()
    assert step == int(state.step) == config.train.num_steps


@pytest.mark.slow
@pytest.mark.faults_slow
def test_two_mains_on_one_workdir_the_second_refuses_at_once(trained_tetrominoes, tmp_path):
    """The issue's commands: the second (another seed) stops with one line; the first finishes."""
    config, _ = trained_tetrominoes
    workdir = tmp_path / "run"
    data = f"--config.dataset.data_dir={config.dataset.data_dir}"
    first = subprocess.Popen(
        _main_command(f"--workdir={workdir}", data, "--config.train.num_steps=12"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "config.json").exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            _main_command(f"--workdir={workdir}", data, "--config.seed=1"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"in use by another training run (host {socket.gethostname()}, pid {first.pid}" in (
            _last_line(second.stderr)
        )
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    assert config_lib.load_config(str(workdir)).seed == config.seed
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == sorted(steps) and steps[-1] == 12
    assert checkpointing.saved_steps(str(workdir))[-1] == 12


# ----------------------------------------------------------------------------
# 2. An error exits within seconds, whatever the background threads do.
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.faults_slow
@pytest.mark.parametrize("where", ["loop_error", "prefetch_error"])
def test_an_error_exits_within_seconds_despite_a_stuck_writer_thread(
    trained_tetrominoes, tmp_path, where
):
    """A non-daemon writer thread that never ends (a hung disk) does not keep a crash alive."""
    config, _ = trained_tetrominoes
    process = subprocess.Popen(
        _main_command(
            f"--workdir={tmp_path / 'run'}",
            f"--config.dataset.data_dir={config.dataset.data_dir}",
            "--config.train.num_steps=6",
            "--config.train.checkpoint_every=2",
            script=FAULT_MAIN,
        ),
        cwd=REPO,
        env={**os.environ, "TUSK_FAULT": f"stuck_writer,{where}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"no exit within 400 s: {stderr[-2000:]}")
    ended = time.time()
    assert process.returncode == 1, stderr[-3000:]
    raised = float(stderr.split("fault_main: error raised at ")[1].split()[0])
    assert ended - raised < 60, f"{ended - raised:.0f} s from the error to the exit"
    assert "fault injected in the" in stderr and "still running" in _last_line(stderr)
    assert checkpointing.saved_steps(str(tmp_path / "run")) == [2]


# ----------------------------------------------------------------------------
# 3. Checkpoints know their run.
# ----------------------------------------------------------------------------


def _step_metadata(workdir, step):
    return os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "_CHECKPOINT_METADATA")


def test_a_step_of_another_run_is_refused_and_adopted_only_when_asked(
    trained_tetrominoes, tmp_path, caplog
):
    """Another run's step 6 (seed 1) copied into this run: one line naming both run ids."""
    config, trained = trained_tetrominoes
    other = str(tmp_path / "other")
    train.fit(_config(config, **{"seed": 1, "train.num_steps": 6}), other)
    workdir = _copy_run(trained, tmp_path)
    shutil.copytree(
        os.path.join(checkpointing.checkpoint_dir(other), "6"),
        os.path.join(checkpointing.checkpoint_dir(workdir), "6"),
    )
    mine = config_lib.load_run_identity(workdir)["run_id"]
    theirs = config_lib.load_run_identity(other)["run_id"]
    assert mine != theirs
    resumed = _config(config, **{"train.num_steps": 8})
    saved = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(run_identity.ForeignCheckpointError) as info:
        train.fit(resumed, workdir)
    message = str(info.value)
    assert f"belongs to run {theirs}" in message and f"this workdir's run {mine}" in message
    assert "--adopt_checkpoint" in message and "\n" not in message
    assert open(os.path.join(workdir, "config.json")).read() == saved
    # Adopted: goes on from step 6 in this run's data order, recorded in config.json.
    caplog.set_level("WARNING")
    state = train.fit(resumed, workdir, adopt_checkpoint=True)
    assert int(state.step) == 8
    identity = config_lib.load_run_identity(workdir)
    assert identity["run_id"] == mine
    assert [(a["step"], a["run_id"]) for a in identity["adopted"]] == [(6, theirs)]
    assert any("Adopting checkpoint step 6" in r.getMessage() for r in caplog.records)
    manager = checkpointing.create_manager(workdir, use_async=False)
    found = run_identity.read_step(manager, 8)
    manager.close()
    assert found["run_id"] == mine
    assert found["config_sha256"] == run_identity.config_digest(resumed)


def test_a_run_without_identity_resumes_with_one_warning(trained_tetrominoes, tmp_path, caplog):
    """Workdirs of earlier versions: no run id in config.json nor in the steps."""
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    for step in checkpointing.saved_steps(workdir):
        path = _step_metadata(workdir, step)
        metadata = json.load(open(path))
        metadata.pop("custom_metadata", None)
        json.dump(metadata, open(path, "w"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    saved.pop(config_lib.RUN_KEY)
    json.dump(saved, open(os.path.join(workdir, "config.json"), "w"))
    caplog.set_level("WARNING")
    state = train.fit(_config(config, **{"train.num_steps": 5}), workdir)
    assert int(state.step) == 5
    warnings = [r.getMessage() for r in caplog.records if "has no run id" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0]
    new_id = config_lib.load_run_identity(workdir)["run_id"]  # Made now, saved from now on.
    manager = checkpointing.create_manager(workdir, use_async=False)
    assert run_identity.read_step(manager, 5)["run_id"] == new_id


def test_write_run_identity_for_a_converted_workdir(trained_tetrominoes, tmp_path):
    """A step 0 saved outside training (a converter) with the identity resumes as the run's."""
    config, trained = trained_tetrominoes
    workdir = str(tmp_path / "converted")
    metadata = run_identity.write_run_identity(workdir, config)
    assert config_lib.load_run_identity(workdir)["run_id"] == metadata["run_id"]
    assert config_lib.load_config(workdir).model.num_prototypes == config.model.num_prototypes
    initial = jax.device_get(state_lib.create_train_state(config, models.create_model(config)))
    manager = checkpointing.create_manager(workdir, use_async=False)
    checkpointing.save(manager, 0, initial, {"step": 0}, identity=metadata)
    manager.close()
    state = train.fit(_config(config, **{"train.num_steps": 1}), workdir)
    assert int(state.step) == 1
    assert config_lib.load_run_identity(workdir)["adopted"] == []


@pytest.mark.slow
@pytest.mark.faults_slow
def test_a_foreign_step_on_the_command_line_is_one_line(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    data_dir = config.dataset.data_dir
    workdir = _copy_run(trained, tmp_path)
    path = _step_metadata(workdir, 4)  # Step 4 now says it was saved by another run.
    metadata = json.load(open(path))
    metadata["custom_metadata"]["run_id"] = "20250101-000000-0ther000"
    json.dump(metadata, open(path, "w"))
    result = subprocess.run(
        _main_command(f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "belongs to run 20250101-000000-0ther000" in _last_line(result.stderr)


# ----------------------------------------------------------------------------
# 4. Signals.
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.faults_slow
def test_sigterm_during_the_first_compilation_exits_at_once(trained_tetrominoes, tmp_path):
    """No persistent cache: the first step compiles for tens of seconds; SIGTERM 1 s into it."""
    config, _ = trained_tetrominoes
    workdir = str(tmp_path / "run")
    result = subprocess.run(
        _main_command(
            f"--workdir={workdir}",
            f"--config.dataset.data_dir={config.dataset.data_dir}",
            script=FAULT_MAIN,
        ),
        cwd=REPO,
        env={**os.environ, "TUSK_FAULT": "sigterm_in_compile", "JAX_ENABLE_COMPILATION_CACHE": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    ended = time.time()
    assert result.returncode == 0, result.stderr[-3000:]
    sent = float(result.stderr.split("fault_main: SIGTERM sent at ")[1].split()[0])
    assert ended - sent < 15, f"{ended - sent:.1f} s from SIGTERM to the exit"
    assert "SIGTERM received before the first step: nothing to save" in _last_line(result.stderr)
    assert checkpointing.saved_steps(workdir) == []
    assert open(workdir_lock.lock_path(workdir)).read() == ""


@pytest.mark.slow
@pytest.mark.faults_slow
def test_ctrl_c_twice_exits_130_at_once_without_a_segfault(trained_tetrominoes, tmp_path):
    """Ctrl-C, then Ctrl-C 0.3 s later while the first one's checkpoint is being written."""
    config, _ = trained_tetrominoes
    workdir, mark = tmp_path / "run", tmp_path / "stepped"
    process = subprocess.Popen(
        _main_command(
            f"--workdir={workdir}",
            f"--config.dataset.data_dir={config.dataset.data_dir}",
            "--config.train.num_steps=1000",
            script=FAULT_MAIN,
        ),
        cwd=REPO,
        env={**os.environ, "TUSK_FAULT": "slow_save", "TUSK_FAULT_MARK": str(mark)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not mark.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        second = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        elapsed = time.monotonic() - second
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr[-3000:]
    assert elapsed < 10, f"{elapsed:.1f} s after the second Ctrl-C"
    assert "Fatal Python error" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted twice: stopped at once without saving" in _last_line(stderr)
    assert open(workdir_lock.lock_path(str(workdir))).read() == ""
