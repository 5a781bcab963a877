"""Bad input that used to end in a traceback wall or a misleading line: one line each.

A config file that is missing or broken, a damaged dataset file or a data dir
that is a file, a config.json key ml_collections cannot hold, batch size or
step count below 1, a checkpoint step pruned while it is read, K above what
an image can give, and a detect batch with failures: each is named with the
file or field and the fix, and scripts can tell a partial failure.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from tusk_jax import checkpointing, config_lib, datasets, detect, inference, ops

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "tusk_jax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_line_error(result) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "not found"),
        ("def get_config(:\n    pass\n", "failed (line 1): SyntaxError: invalid syntax"),
        ("def get_config():\n    return undefined_name\n", "failed (line 2): NameError"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / "my_config.py"
    if content is not None:
        path.write_text(content)
    result = _main(f"--config={path}", f"--workdir={tmp_path}/run")
    line = _one_line_error(result)
    assert line.startswith(f"tusk_jax.main: config file {path}") and expected in line, line
    assert result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.batch_size=0", "config train.batch_size: must be an int >= 1 (pairs per step)"),
        ("train.batch_size=-2", "config train.batch_size: must be an int >= 1 (pairs per step)"),
        ("train.num_steps=0", "config train.num_steps: must be >= 1, got 0."),
    ],
)
def test_counts_below_one_name_their_own_field(tmp_path, override, expected):
    result = _main(
        "--config=configs/tetrominoes.py:test", f"--config.{override}", f"--workdir={tmp_path}/r"
    )
    line = _one_line_error(result)
    assert expected in line and "multiple of" not in line and "warmup" not in line, line


def _damaged_data(trained_tetrominoes, tmp_path, damage):
    """A copy of the fixture's data dir whose train array_record file is damaged."""
    config, _ = trained_tetrominoes
    data_dir = tmp_path / "data"
    shutil.copytree(config.dataset.data_dir, data_dir)
    config = type(config)(config.to_dict())
    config.dataset.data_dir = str(data_dir)
    builder = datasets.get_builder(config)
    (path,) = builder.info.splits["train"].filepaths
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if damage == "half" else 0)
    return config, path


@pytest.mark.parametrize("damage", ["half", "empty"])
def test_a_damaged_dataset_file_names_itself_and_the_command_that_remakes_it(
    trained_tetrominoes, tmp_path, damage
):
    config, path = _damaged_data(trained_tetrominoes, tmp_path, damage)
    with pytest.raises(datasets.DataFileError) as error:
        datasets.data_source(config, "train")
    message = str(error.value)
    assert "\n" not in message and path in message and "holds 0 of its 64 examples" in message
    command = message.split("prepare the dataset anew with: ")[1]
    assert command.startswith("python -m tusk_jax.datasets.prepare --dataset=tetrominoes")
    assert command.endswith("--force")
    # The command given repairs it.
    done = subprocess.run(
        [sys.executable, *command.split()[1:]], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    source = datasets.data_source(config, "train")
    assert len(source) == 64 and source[63]["image"].shape == (35, 35, 3)


def test_a_data_dir_that_is_a_file_is_named(trained_tetrominoes, tmp_path, monkeypatch):
    config, _ = trained_tetrominoes
    config = type(config)(config.to_dict())
    config.dataset.data_dir = None
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    monkeypatch.setenv("TFDS_DATA_DIR", str(not_a_folder))
    with pytest.raises(datasets.DataFileError, match=r"\(\$TFDS_DATA_DIR\) is a file, not a"):
        datasets.data_source(config, "train")


@pytest.mark.parametrize("where", [(), ("model",)])
def test_a_config_json_key_configdict_cannot_hold_is_one_line(trained_tetrominoes, tmp_path, where):
    workdir = tmp_path / "run"
    shutil.copytree(trained_tetrominoes[1], workdir)
    saved = json.loads((workdir / "config.json").read_text())
    node = saved
    for name in where:
        node = node[name]
    node["__reduce__"] = 1
    (workdir / "config.json").write_text(json.dumps(saved))
    field = ".".join((*where, "__reduce__"))
    with pytest.raises(config_lib.ConfigError, match=f"invalid config field '{field}'"):
        config_lib.load_config(str(workdir))
    result = subprocess.run(
        [sys.executable, "-m", "tusk_jax.evaluate", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {workdir}/config.json:")


def _pruned_while_read(monkeypatch, workdir):
    """Removes the first step `check_state_matches` is asked about, as a pruning trainer would."""
    real = checkpointing.check_state_matches
    removed = []

    def vanish_then_check(manager, step, template, run_dir):
        if not removed:
            removed.append(step)
            path = os.path.join(checkpointing.checkpoint_dir(workdir), str(step))
            shutil.rmtree(path)
            os.remove(checkpointing.checksum_path(checkpointing.checkpoint_dir(workdir), step))
        return real(manager, step, template, run_dir)

    monkeypatch.setattr(checkpointing, "check_state_matches", vanish_then_check)
    return removed


def test_a_step_pruned_while_read_is_skipped_not_called_corrupt(
    trained_tetrominoes, tmp_path, monkeypatch, caplog
):
    config, trained = trained_tetrominoes
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    removed = _pruned_while_read(monkeypatch, workdir)
    state, step = checkpointing.restore_state(workdir, config)
    assert removed == [4] and step == 2
    expected, _ = checkpointing.restore_state(trained, config, step=2)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(expected.params), strict=True
        )
    )
    warnings = [r.getMessage() for r in caplog.records if "removed while being read" in r.message]
    assert len(warnings) == 1 and "step(s) 4" in warnings[0] and "using step 2" in warnings[0]
    assert not any("corrupt" in r.getMessage() for r in caplog.records)


def test_an_explicit_step_pruned_while_read_says_so(trained_tetrominoes, tmp_path, monkeypatch):
    config, trained = trained_tetrominoes
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    _pruned_while_read(monkeypatch, workdir)
    with pytest.raises(FileNotFoundError, match=r"step 4 .* was removed while it was read.*\[2\]"):
        checkpointing.restore_state(workdir, config, step=4)


def test_max_peaks_is_reached_and_beyond_it_top_k_returns_no_peaks():
    # Distinct peaks on a lattice of spacing 3 (window 5): 6 x 6 in 16 x 16.
    score = np.zeros((16, 16), np.float32)
    rows, cols = np.meshgrid(np.arange(0, 16, 3), np.arange(0, 16, 3), indexing="ij")
    score[rows, cols] = 0.5 + np.arange(rows.size).reshape(rows.shape) / 100
    assert ops.max_peaks(16, 16, 5) == 36
    _, peak_scores = ops.top_k_peaks(jax.numpy.asarray(score), 37, 5)
    assert np.all(np.asarray(peak_scores)[:36] > 0) and float(peak_scores[36]) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        noise = jax.numpy.asarray(rng.random((16, 16), np.float32))
        assert int(np.count_nonzero(ops.non_max_suppression(noise, 5))) <= 36


def _detect(*args):
    flag_values = flags.FlagValues()
    detect.define_flags(flag_values)
    flag_values(["detect", *args])
    return detect.run(flag_values)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(folder / "a16.png")
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), np.uint8)).save(folder / "one.png")
    return folder


def test_detect_names_a_too_small_image_and_exits_2(trained_tetrominoes, images, tmp_path, capsys):
    workdir = trained_tetrominoes[1]
    with pytest.raises(SystemExit) as exit_:
        _detect(f"--workdir={workdir}", f"--input={images}", f"--output={tmp_path}/out")
    assert exit_.value.code == detect.EXIT_SOME_FAILED == 2
    out, err = capsys.readouterr()
    assert (
        f"skipped {images}/one.png: too small: the network sees 1x1, fewer pixels than K=3 "
        "keypoints; use --num_keypoints=1 or less, or a larger --scale"
    ) in out
    assert "unreadable" not in out
    assert err.strip().splitlines()[-1].startswith("error: 1 of 2 input(s) failed")
    summary = _detect(
        f"--workdir={workdir}", f"--input={images}", f"--output={tmp_path}/out2", "--keep_going"
    )
    assert [os.path.basename(w["file"]) for w in summary["written"]] == ["a16.png"]


def test_detect_warns_once_when_k_exceeds_the_peaks(trained_tetrominoes, images, tmp_path, caplog):
    _, workdir = trained_tetrominoes
    detector = inference.load(workdir)
    paths = [str(images / "a16.png")] * 2
    summary = detect.detect_files(detector, paths, str(tmp_path / "out"), num_keypoints=100)
    assert [w["num_keypoints"] for w in summary["written"]] == [100, 100]
    warnings = [r.getMessage() for r in caplog.records if "exceeds the 36 peak(s)" in r.message]
    assert len(warnings) == 1 and "window 5" in warnings[0] and "16x16" in warnings[0]
    failed = detect.detect_files(detector, paths[:1], str(tmp_path / "o2"), num_keypoints=10000)
    assert failed["failed"][paths[0]].startswith("too small: the network sees 16x16")
