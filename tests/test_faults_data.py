"""Bad input to the data and detection paths (issue 15, items 3, 4 and two of 7).

Each test feeds one hostile or clumsy input and checks the outcome: an error
naming the file or the cause, never a hang (hangs run under a deadline or in
a subprocess with a timeout, so a regression fails instead of stalling the
suite), images scaled by their bit depth, one bad image never stopping the
others. Stand-in models keep it fast: no training.
"""

import contextlib
import gzip
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from tusk_jax import datasets
from tusk_jax.datasets import celeba_wild, mnist_hard, tetrominoes


@contextlib.contextmanager
def deadline(seconds: int):
    """Raises TimeoutError in the block after `seconds` (a hang becomes a failure)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_idx(path, array: np.ndarray, compress: bool = False) -> str:
    """`array` (uint8) as an IDX file (gzipped if asked); returns the path."""
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += np.ascontiguousarray(array, np.uint8).tobytes()
    path = str(path)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


def write_mnist(folder, images: np.ndarray, labels: np.ndarray) -> None:
    """The four MNIST IDX files (train and t10k alike) in `folder`."""
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


def digit_pool(count: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """`count` 28x28 digits with a 20x20 square of ink each, labels 0..9."""
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = 200
    return images, (np.arange(count) % 10).astype(np.uint8)


# --- Item 3: the generators never hang; MNIST IDX files are checked ---------------------


def test_prepare_with_blank_mnist_digits_exits_naming_the_file(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_mnist(manual, np.zeros((30, 28, 28), np.uint8), np.zeros(30, np.uint8))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tusk_jax.datasets.prepare",
            "--dataset=mnist_hard",
            "--source=real",
            f"--manual_dir={manual}",
            f"--data_dir={tmp_path / 'data'}",
            "--num_train=4",
            "--num_test=4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train-images-idx3-ubyte: all 30 digit images are blank" in done.stderr
    assert "Traceback" not in done.stderr


def test_blank_digits_among_good_ones_are_left_out(tmp_path):
    images, labels = digit_pool()
    images[3] = 0
    write_mnist(tmp_path, images, labels)
    pool, pool_labels = mnist_hard.load_digits("real", "train", str(tmp_path))
    assert len(pool) == len(pool_labels) == 19 and pool.reshape(19, -1).max(1).min() > 0
    np.testing.assert_array_equal(pool_labels, np.delete(labels, 3))


def test_a_blank_digit_has_an_empty_ink_box_and_is_refused_by_the_composer():
    images, labels = digit_pool(2)
    images[1] = 0
    np.testing.assert_array_equal(mnist_hard.ink_boxes(images), [[4, 4, 24, 24], [0, 0, 0, 0]])
    with deadline(30), pytest.raises(ValueError, match="empty .all-zero. digit"):
        mnist_hard.compose_canvases(np.random.default_rng(0), images, labels, 2)


def test_too_many_digits_stop_with_the_cause_instead_of_looping():
    images, labels = digit_pool()
    rng = np.random.default_rng(0)
    # 20 boxes of 21x21 (with the gap) cannot cover 81x81: refused at once.
    with deadline(30), pytest.raises(ValueError, match="20 digits cannot fit on a 80x80"):
        mnist_hard.compose_canvases(rng, images, labels, 4, num_digits=20)
    # 14 fit by area, but random placement (almost) never finds room: bounded restarts.
    with deadline(30), pytest.raises(ValueError, match="could not place 14 digits .*80x80"):
        mnist_hard.compose_canvases(rng, images, labels, 4, num_digits=14)
    with pytest.raises(ValueError, match="num_objects must be >= 1"):
        mnist_hard.compose_canvases(rng, images, labels, 4, num_digits=0)


def test_tetrominoes_generator_gives_up_after_its_restart_budget(monkeypatch):
    with pytest.raises(ValueError, match=r"must be in \[1, 6\]"):
        tetrominoes.generate_scenes(np.random.default_rng(0), 4, num_pieces=7)
    monkeypatch.setattr(tetrominoes, "RESTARTS_PER_SCENE", 0)
    with deadline(30), pytest.raises(ValueError, match="could not place 6 pieces on a 35x35"):
        tetrominoes.generate_scenes(np.random.default_rng(0), 200, num_pieces=6)


def test_mnist_labels_outside_0_to_9_name_the_file(tmp_path):
    images, labels = digit_pool()
    labels[7] = 12
    write_mnist(tmp_path, images, labels)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: label 12 at index 7"):
        mnist_hard.load_digits("real", "train", str(tmp_path))


@pytest.mark.parametrize(
    "damage",
    ["truncated_gz", "not_gz", "short_header", "wrong_rank", "count_mismatch"],
)
def test_broken_idx_files_name_the_file(tmp_path, damage):
    images, labels = digit_pool()
    write_mnist(tmp_path, images, labels)
    target = tmp_path / "train-images-idx3-ubyte"
    if damage in ("truncated_gz", "not_gz"):
        os.remove(target)
        target = tmp_path / "train-images-idx3-ubyte.gz"
        write_idx(target, images, compress=True)
        whole = target.read_bytes()
        target.write_bytes(whole[: len(whole) // 2] if damage == "truncated_gz" else whole[20:])
    elif damage == "short_header":
        target.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    elif damage == "wrong_rank":
        write_idx(target, images.reshape(20, -1))
    else:
        write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
        target = tmp_path / "train-labels-idx1-ubyte"
    with pytest.raises(ValueError, match=f"^{target}: "):
        mnist_hard.load_digits("real", "train", str(tmp_path))


# --- Item 7: stale incomplete.* folders; the official CelebA layout --------------------


def prepare_config(tmp_path, name, **dataset):
    """The `prepare` config of dataset `name`: data in `tmp_path/data`, files in `.../manual`."""
    from tusk_jax.datasets import prepare

    return prepare.build_config(
        None,
        name,
        data_dir=str(tmp_path / "data"),
        manual_dir=str(tmp_path / "manual"),
        **dataset,
    )


def tiny_tetrominoes(tmp_path):
    """A procedural Tetrominoes config of 4 + 4 scenes."""
    return prepare_config(tmp_path, "tetrominoes", source="procedural", num_train=4, num_test=4)


def test_prepare_removes_the_incomplete_folder_of_a_killed_run(tmp_path):
    config = tiny_tetrominoes(tmp_path)
    builder = datasets.get_builder(config)
    config_dir = builder.data_path.parent
    # What a SIGKILLed `download_and_prepare` leaves: tfds' temporary folder, half written.
    stale = config_dir / f"incomplete.K1LLED_{builder.version}"
    os.makedirs(stale)
    (stale / "tusk_tetrominoes-train.array_record-00000-of-00001").write_bytes(b"\0" * 100)
    prepared = datasets.prepare_dataset(config)
    assert prepared.is_prepared() and len(prepared.as_data_source("train")) == 4
    assert not os.path.exists(stale)
    assert not [n for n in os.listdir(config_dir) if n.startswith("incomplete.")]


def test_a_preparation_in_progress_is_waited_for_not_removed(tmp_path):
    import fcntl
    import threading

    config = tiny_tetrominoes(tmp_path)
    config_dir = datasets.get_builder(config).data_path.parent
    os.makedirs(config_dir)
    live = config_dir / "incomplete.LIVE00_1.0.0"
    os.makedirs(live)
    result = {}
    with open(config_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Another preparer at work.
        worker = threading.Thread(
            target=lambda: result.setdefault("builder", datasets.prepare_dataset(config))
        )
        worker.start()
        worker.join(2.0)
        assert worker.is_alive() and live.exists()  # Waits; touches nothing.
    worker.join(60)
    assert not worker.is_alive() and result["builder"].is_prepared()
    assert not live.exists()  # Its owner is gone (lock released): stale now.


def test_celeba_builder_finds_the_official_download_layout(tmp_path):
    from test_datasets import _celeba_tree

    # The official download: CelebA/Img/img_celeba/, CelebA/Anno/, CelebA/Eval/.
    root = tmp_path / "manual" / "CelebA"
    _celeba_tree(root, np.random.default_rng(0))
    (root / "Img").mkdir()
    os.rename(root / "img_celeba", root / "Img" / "img_celeba")
    files = celeba_wild.find_files(str(tmp_path / "manual"))
    assert files["images"] == str(root / "Img" / "img_celeba")
    assert files["bbox"] == str(root / "Anno" / "list_bbox_celeba.txt")
    config = prepare_config(tmp_path, "celeba_wild", image_size=16)
    source = datasets.data_source(config, "test")
    assert len(source) == 2 and source[0]["image"].shape == (16, 16, 3)
