"""Bad input to the data and detection paths (issue 15, items 3, 4 and two of 7).

Each test feeds one hostile or clumsy input and checks the outcome: an error
naming the file or the cause, never a hang (hangs run under a deadline or in
a subprocess with a timeout, so a regression fails instead of stalling the
suite), images scaled by their bit depth, one bad image never stopping the
others. Stand-in models keep it fast: no training.
"""

import contextlib
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import tetrominoes as tetrominoes_config
from tusk_jax import datasets, detect, image_files, inference, models
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


# --- Item 4: detect reads any bit depth and size; one bad file never stops the rest -----


@pytest.fixture(scope="module")
def detector():
    """A Detector on test_inference's stand-in encoder (score = brightest channel)."""
    from test_inference import fake_encode

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.TUSK, "encode", fake_encode)
        config = tetrominoes_config.get_config("test")
        yield inference.Detector(config, {"params": {}}, np.eye(3, dtype=np.float32))


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> str:
    """A 6000 x 6000 grey PNG of value 100 (36 M pixels; small on disk)."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    Image.new("L", (6000, 6000), 100).save(path, compress_level=1)
    return str(path)


def png16(path, values: np.ndarray) -> str:
    """A 16-bit PNG written by hand (PIL writes no 16-bit RGB): grey [H, W] or RGB [H, W, 3]."""
    height, width = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = values.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize(
    "kind, note",
    [
        ("grey16_png", "16-bit: value / 65535"),
        ("rgb16_png", "8-bit"),  # PIL itself reduces 16-bit colour PNGs correctly.
        ("grey16_tiff", "16-bit: value / 65535"),
        ("float_tiff", "float in [0, 1]: value * 255"),
    ],
)
def test_mid_grey_of_any_bit_depth_reads_as_mid_grey(tmp_path, kind, note):
    path = str(tmp_path / f"{kind}.{kind.split('_')[1]}")
    if kind == "grey16_png":
        png16(path, np.full((6, 7), 32768, np.uint16))
    elif kind == "rgb16_png":
        png16(path, np.full((6, 7, 3), 32768, np.uint16))
    elif kind == "grey16_tiff":
        Image.fromarray(np.full((6, 7), 32768, np.uint16)).save(path)
    else:
        Image.fromarray(np.full((6, 7), 0.5, np.float32)).save(path)
    read = image_files.read_image(path)
    assert read.image.shape == (6, 7, 3) and (read.width, read.height) == (7, 6)
    np.testing.assert_array_equal(read.image, 128)  # Was 255 (clipped) or 0.
    assert read.pixel_values == note


def test_float_tiff_outside_0_1_is_stretched_and_nan_refused(tmp_path):
    ramp = np.linspace(-50.0, 950.0, 6 * 7, dtype=np.float32).reshape(6, 7)
    Image.fromarray(ramp).save(tmp_path / "ramp.tiff")
    read = image_files.read_image(str(tmp_path / "ramp.tiff"))
    assert read.image.min() == 0 and read.image.max() == 255
    assert read.pixel_values == "float in [-50, 950]: stretched to [0, 255]"
    ramp[2, 3] = np.nan
    Image.fromarray(ramp).save(tmp_path / "nan.tiff")
    with pytest.raises(ValueError, match="non-finite"):
        image_files.read_image(str(tmp_path / "nan.tiff"))


def test_a_16_bit_png_is_detected_and_drawn_mid_grey(detector, tmp_path):
    png16(tmp_path / "grey.png", np.full((24, 32), 32768, np.uint16))
    summary = detect.detect_files(
        detector, [str(tmp_path / "grey.png")], str(tmp_path / "out"), num_keypoints=3
    )
    assert len(summary["written"]) == 1 and not summary["failed"]
    annotated = np.asarray(Image.open(tmp_path / "out" / "grey.png"))
    assert np.median(annotated) == 128  # The picture, not a white sheet.
    with open(tmp_path / "out" / "grey.json") as f:
        assert json.load(f)["pixel_values"] == "16-bit: value / 65535"


def test_a_huge_image_is_downscaled_while_still_8_bit(big_png, tmp_path):
    tracemalloc.start()
    try:
        read = image_files.read_image(big_png, max_pixels=64 * 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read.image.shape == (64, 64, 3) and (read.width, read.height) == (6000, 6000)
    np.testing.assert_array_equal(read.image, 100)
    # numpy never held the full image (108 MB as RGB uint8, 432 MB as float32).
    assert peak < 5e6, peak
    np.testing.assert_allclose(
        read.to_file_pixels([[0, 0], [63, 63]]), [[46.375] * 2, [5952.625] * 2]
    )
    # A JPEG is decoded at 1/8 scale when that is enough.
    Image.new("RGB", (2400, 1600), (10, 20, 30)).save(tmp_path / "big.jpg", quality=95)
    read = image_files.read_image(str(tmp_path / "big.jpg"), max_pixels=300 * 200)
    assert read.image.shape == (200, 300, 3) and (read.width, read.height) == (2400, 1600)


def test_an_image_above_the_pixel_limit_is_refused_and_the_others_go_on(
    detector, big_png, tmp_path
):
    Image.new("L", (32, 24), 40).save(tmp_path / "small.png")
    paths = [big_png, str(tmp_path / "small.png")]
    summary = detect.detect_files(
        detector, paths, str(tmp_path / "out"), num_keypoints=3, max_file_pixels=30_000_000
    )
    assert [os.path.basename(w["file"]) for w in summary["written"]] == ["small.png"]
    assert summary["failed"][paths[0]] == (
        "unreadable: ValueError: 6000x6000 (36.0 M pixels) is above the limit of 30 M pixels "
        "per file; downscale it first"
    )
    # Under the limit it is downscaled to max_pixels; keypoints come back in its pixels.
    summary = detect.detect_files(
        detector, paths[:1], str(tmp_path / "out2"), num_keypoints=3, max_pixels=32 * 32
    )
    with open(summary["written"][0]["json"]) as f:
        record = json.load(f)
    assert (record["width"], record["network_width"]) == (6000, 32)
    xy = np.array([[k["x"], k["y"]] for k in record["keypoints"]])
    assert xy.shape == (3, 2) and np.all(xy > 90) and np.all(xy < 5910)


def test_an_input_named_summary_never_overwrites_the_summary(detector, tmp_path):
    for name in ("summary.png", "Summary.png", "x.png"):
        Image.new("RGB", (32, 24), (50, 60, 70)).save(tmp_path / name)
    paths = [str(tmp_path / n) for n in ("summary.png", "Summary.png", "x.png")]
    out = tmp_path / "out"
    detect.detect_files(detector, paths, str(out), num_keypoints=3)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert [os.path.basename(w["json"]) for w in summary["written"]] == [
        "summary_2.json",
        "Summary_3.json",
        "x.json",
    ]
    with open(out / "summary_2.json") as f:
        assert json.load(f)["file"] == paths[0]
    assert detect.output_stems(["a.png", "A.jpg", "a_2.png", "summary.tif"]) == [
        "a",
        "A_2",
        "a_2_2",
        "summary_2",
    ]


def test_one_bad_image_never_stops_the_others(detector, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "c.png", "e.png"):
        Image.new("RGB", (32, 24), (90, 90, 90)).save(folder / name)
    Image.new("RGB", (37, 24), (90, 90, 90)).save(folder / "b_oom.png")
    (folder / "d_corrupt.png").write_bytes((folder / "a.png").read_bytes()[:60])
    out = tmp_path / "out"
    (out / "e.png").mkdir(parents=True)  # e's annotated PNG cannot be written.
    detect_one = detector.detect

    def detect_or_run_out_of_memory(images, *args, **kwargs):
        if any(image.shape[1] == 37 for image in inference.as_image_list(images)):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 3.5 GiB")
        return detect_one(images, *args, **kwargs)

    monkeypatch.setattr(detector, "detect", detect_or_run_out_of_memory)
    paths = detect.expand_inputs([str(folder)])
    summary = detect.detect_files(detector, paths, str(out), num_keypoints=3)
    assert [os.path.basename(w["file"]) for w in summary["written"]] == ["a.png", "c.png"]
    failed = {os.path.basename(p): reason for p, reason in summary["failed"].items()}
    assert sorted(failed) == ["b_oom.png", "d_corrupt.png", "e.png"]
    assert failed["b_oom.png"].startswith("detection failed: RuntimeError: RESOURCE_EXHAUSTED")
    assert failed["d_corrupt.png"].startswith("unreadable: ")
    assert failed["e.png"].startswith("cannot write its output: IsADirectoryError")
    with open(out / "summary.json") as f:
        assert json.load(f)["failed"] == summary["failed"]


def test_the_summary_is_written_when_the_batch_is_interrupted(detector, tmp_path, monkeypatch):
    paths = []
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 24), (90, 90, 90)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    detect_one = detector.detect
    calls = []

    def interrupted_on_the_second_call(images, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return detect_one(images, *args, **kwargs)

    monkeypatch.setattr(detector, "detect", interrupted_on_the_second_call)
    with pytest.raises(KeyboardInterrupt):
        detect.detect_files(detector, paths, str(tmp_path / "out"), num_keypoints=3, chunk_size=1)
    with open(tmp_path / "out" / "summary.json") as f:
        summary = json.load(f)
    assert [w["file"] for w in summary["written"]] == [paths[0]] and not summary["failed"]
