"""Faults and bad input (issue 15): nothing lost, nothing silent.

Each test reproduces one way a run can be hurt -- a config changed on resume,
a full or read-only disk, corrupt or truncated checkpoint files, a NaN with
image summaries on, an invalid config on the command line -- and checks the
outcome: refused with one line naming the cause, or recovered from the newest
intact state, never silently wrong weights. Runs of `python -m tusk_jax.main`
killed at seeded random moments (mid-save included) are in
`test_faults_kill.py` (marked slow).
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tusk_jax import (
    checkpoint_integrity,
    checkpointing,
    config_lib,
    learning_curve,
    train,
    visualization,
)
from tusk_jax import state as state_lib

REPO = os.path.join(os.path.dirname(__file__), "..")


def _copy_run(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return str(workdir)


def _config(config, **overrides):
    new = type(config)(config.to_dict())
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        new[section][field] = value
    return new


def _main(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "tusk_jax.main", "--config=configs/tetrominoes.py:test", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _params_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


# ----------------------------------------------------------------------------
# Config checks: one line naming the field.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("tps.scale", 0.0),
        ("loss.kmeans_temperature", 0.0),
        ("dataset.num_train", 2),  # fewer than the batch of 4
        ("model.num_keypoints", 300),  # more than the 16 x 16 pixels
        ("tps.scale_var", 1.0),  # scales down to <= 0
        ("model.window", 4),
    ],
)
def test_invalid_config_names_the_field(trained_tetrominoes, field, value):
    config, _ = trained_tetrominoes
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        config_lib.validate_config(_config(config, **{field: value}))


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["--config.train.nope=1", f"--workdir={tmp_path}/a"], "train.nope"),
        (["--config.tps.scale=0", f"--workdir={tmp_path}/b"], "tps.scale"),
        (["--workdir="], "--workdir is empty"),
    ]
    for args, expected in cases:
        result = _main(*args)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert expected in _last_line(result.stderr), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ----------------------------------------------------------------------------
# Resuming with another config.
# ----------------------------------------------------------------------------


def test_resume_refuses_a_shape_change_and_writes_nothing(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    saved = open(os.path.join(workdir, "config.json")).read()
    for field, value, old in [("model.num_prototypes", 7, 6), ("model.base_width", 16, 8)]:
        with pytest.raises(config_lib.ConfigError) as info:
            train.train_and_evaluate(_config(config, **{field: value}), workdir)
        message = str(info.value)
        assert f"{field} {old} -> {value}" in message and "\n" not in message
    assert open(os.path.join(workdir, "config.json")).read() == saved
    assert not os.path.exists(os.path.join(workdir, config_lib.CHANGES_FILE))


def test_resume_refuses_a_meaning_change_unless_allowed(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    changed = _config(config, **{"model.window": 3, "model.num_keypoints": 2})
    with pytest.raises(config_lib.ConfigError, match="--allow_config_change") as info:
        train.train_and_evaluate(changed, workdir)
    assert "model.num_keypoints 3 -> 2" in str(info.value)
    assert "model.window 5 -> 3" in str(info.value)
    assert config_lib.load_config(workdir).model.window == 5
    # Allowed: resumed (the run is finished: no step to train) and recorded.
    train.train_and_evaluate(changed, workdir, allow_config_change=True)
    assert config_lib.load_config(workdir).model.window == 3
    with open(os.path.join(workdir, config_lib.CHANGES_FILE)) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["step"] == config.train.num_steps
    assert record["changes"]["model.window"] == {"old": 5, "new": 3, "kind": "meaning"}


def test_resume_accepts_harmless_changes(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    changed = _config(config, **{"train.log_every": 3, "train.max_to_keep": 5})
    train.train_and_evaluate(changed, workdir)
    assert config_lib.load_config(workdir).train.log_every == 3
    assert config_lib.config_changes(config_lib.load_config(workdir), changed) == []


def test_cli_shape_change_is_one_line_and_keeps_config_json(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    saved = open(os.path.join(workdir, "config.json")).read()
    result = _main(
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={config.dataset.data_dir}",
        "--config.model.num_prototypes=7",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "model.num_prototypes 6 -> 7" in _last_line(result.stderr)
    assert open(os.path.join(workdir, "config.json")).read() == saved


# ----------------------------------------------------------------------------
# Checkpoint integrity: corrupt, truncated, empty metadata.
# ----------------------------------------------------------------------------


def _data_files(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = []
    for folder, _, names in os.walk(root):
        files += [
            os.path.join(folder, n) for n in names if os.sep + "d" + os.sep in folder + os.sep
        ]
    assert files, root
    return sorted(files, key=os.path.getsize)


def _flip_bytes(path, count=4):
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data) // 2, count, replace=False) + len(data) // 4:
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _empty_metadata(path):
    open(path, "w").close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty_metadata"])
def test_corrupt_latest_step_falls_back_to_the_intact_one(trained_tetrominoes, tmp_path, damage):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    if damage == "empty_metadata":
        _empty_metadata(os.path.join(workdir, "checkpoints", "4", "state", "_METADATA"))
    else:
        {"flip": _flip_bytes, "truncate": _truncate}[damage](_data_files(workdir, 4)[-1])
    template = checkpointing.state_template(config)
    manager = checkpointing.create_manager(workdir, use_async=False)
    try:
        with pytest.raises(checkpointing.CorruptCheckpointError, match="step 4"):
            checkpointing.restore(manager, template, 4)
        restored, corrupt = checkpointing.restore_newest_intact(manager, template, workdir)
    finally:
        manager.close()
    assert corrupt == [4]
    assert restored[2] == 2 and int(restored[0].step) == 2


def test_evaluating_a_corrupt_step_names_it_and_the_other_steps(trained_tetrominoes, tmp_path):
    """evaluate / detect / export restore through `restore_state`: no silent fall-back."""
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    _flip_bytes(_data_files(workdir, 4)[-1])
    with pytest.raises(checkpointing.CorruptCheckpointError, match=r"step 4.*--step.*\[2\]"):
        checkpointing.restore_state(workdir, config)
    state, step = checkpointing.restore_state(workdir, config, step=2)
    assert step == 2 and int(state.step) == 2


def test_learning_curve_leaves_a_corrupt_step_out(trained_tetrominoes, tmp_path):
    _, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    _flip_bytes(_data_files(workdir, 2)[-1])
    rows = learning_curve.update_learning_curve(
        workdir, num_examples=4, batch_size=4, progress=False, plot=False
    )
    assert [row["step"] for row in rows] == [4]


def test_all_steps_corrupt_is_an_error_not_a_fresh_start(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    for step in (2, 4):
        _empty_metadata(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    with pytest.raises(checkpointing.CorruptCheckpointError, match="no intact checkpoint"):
        train.train_and_evaluate(config, workdir)


def test_checkpoint_without_checksum_restores_with_a_warning(trained_tetrominoes, tmp_path):
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    os.remove(checkpointing.checksum_path(checkpointing.checkpoint_dir(workdir), 4))
    manager = checkpointing.create_manager(workdir, use_async=False)
    try:
        state, _, step = checkpointing.restore(manager, checkpointing.state_template(config))
    finally:
        manager.close()
    assert step == 4 and int(state.step) == 4


def test_resume_after_corruption_retrains_the_same_weights(
    trained_tetrominoes, tmp_path, monkeypatch
):
    """Corrupt step 4: the run goes back to step 2 (saying so) and trains to the same step 4.

    Image summaries that raise (here: every figure) do not stop it either.
    """
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    expected, _ = checkpointing.restore_state(trained, config)
    _flip_bytes(_data_files(workdir, 4)[-1])

    def broken_figures(*args, **kwargs):
        raise ValueError("Input X contains NaN (figure failure injected by the test)")

    monkeypatch.setattr(visualization, "make_figures", broken_figures)
    final = train.train_and_evaluate(config, workdir)
    assert int(final.step) == 4
    assert _params_equal(final.params, expected.params)
    assert _params_equal(final.prototypes, expected.prototypes)
    assert sorted(os.listdir(os.path.join(workdir, checkpointing.CORRUPT_DIR))) == [
        "4",
        "4" + checkpointing.CHECKSUM_SUFFIX,
    ]
    restored, _ = checkpointing.restore_state(workdir, config)
    assert _params_equal(restored.params, expected.params)


# ----------------------------------------------------------------------------
# Full disk, read-only folders.
# ----------------------------------------------------------------------------


def test_unwritable_workdir_is_refused_at_start(trained_tetrominoes, tmp_path, monkeypatch):
    config, _ = trained_tetrominoes
    real_open = open

    def read_only_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tusk_write_test" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_integrity, "open", read_only_open, raising=False)
    workdir = tmp_path / "run"
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        train.train_and_evaluate(config, str(workdir))
    assert f"cannot write to {workdir}: Permission denied (EACCES)" in str(info.value)
    assert not os.path.exists(workdir / "config.json")


def test_disk_full_during_save_is_one_error_and_keeps_the_checkpoints(
    trained_tetrominoes, tmp_path, monkeypatch
):
    """ENOSPC inside orbax's asynchronous save: reported at once, steps 2 and 4 intact."""
    from etils import epath

    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    template = checkpointing.state_template(config)
    manager = checkpointing.create_manager(workdir)
    state, data, _ = checkpointing.restore(manager, template)
    path_class = type(epath.Path(workdir))
    real_write = path_class.write_text

    def full_disk(self, *args, **kwargs):
        if "orbax-checkpoint-tmp" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(path_class, "write_text", full_disk)
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        checkpointing.save(manager, 6, state, data)
        checkpointing.wait(manager)
    message = str(info.value)
    assert "No space left on device (ENOSPC)" in message
    assert checkpointing.checkpoint_dir(workdir) in message
    # Close (which waits for orbax's writer threads) while the disk is still full:
    # undoing the patch first let a late thread finish and finalise step 6 (seen once in CI).
    with contextlib.suppress(Exception):  # close() raises the save's error once more
        manager.close()
    monkeypatch.undo()
    manager = checkpointing.create_manager(workdir, use_async=False)
    try:
        assert sorted(manager.all_steps()) == [2, 4]
        restored, corrupt = checkpointing.restore_newest_intact(manager, template, workdir)
    finally:
        manager.close()
    assert corrupt == [] and restored[2] == 4


# ----------------------------------------------------------------------------
# NaN with image summaries on.
# ----------------------------------------------------------------------------


def test_nan_is_reported_before_image_summaries(trained_tetrominoes, tmp_path):
    """NaN prototypes in the checkpoint: the NaN loss is named, not a t-SNE failure."""
    config, trained = trained_tetrominoes
    workdir = _copy_run(trained, tmp_path)
    manager = checkpointing.create_manager(workdir, use_async=False)
    try:
        state, data, _ = checkpointing.restore(manager, checkpointing.state_template(config))
        poisoned = state.replace(
            step=np.int32(5), prototypes=np.full_like(state.prototypes, np.nan)
        )
        checkpointing.save(manager, 5, poisoned, data)
        checkpointing.wait(manager)
    finally:
        manager.close()
    resumed = _config(config, **{"train.num_steps": 6, "train.image_every": 1})
    with pytest.raises(train.NonFiniteError, match="step 6: loss/"):
        train.train_and_evaluate(resumed, workdir)


@pytest.mark.slow
@pytest.mark.faults_slow
def test_nan_learning_rate_on_the_command_line(trained_tetrominoes, tmp_path):
    """The issue's command: one line naming the step and the term, exit status 1."""
    config, _ = trained_tetrominoes
    result = _main(
        f"--workdir={tmp_path / 'run'}",
        f"--config.dataset.data_dir={config.dataset.data_dir}",
        "--config.train.learning_rate=nan",
        "--config.train.image_every=1",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Non-finite value" in _last_line(result.stderr)
    assert "contains NaN" not in result.stderr


# ----------------------------------------------------------------------------
# Ctrl-C during start-up.
# ----------------------------------------------------------------------------


def test_ctrl_c_during_start_up_stops_cleanly(trained_tetrominoes, tmp_path, monkeypatch):
    """SIGINT while the model compiles: no KeyboardInterrupt, no step, no checkpoint."""
    config, _ = trained_tetrominoes
    create = state_lib.create_train_state

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return create(*args, **kwargs)

    monkeypatch.setattr(state_lib, "create_train_state", interrupted)
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 0
    assert checkpointing.saved_steps(str(tmp_path / "run")) == []
