"""Tetrominoes (SPEC 5): DeepMind's TFRecord reader and an embedded procedural generator.

Real source: `tetrominoes_train.tfrecords` of DeepMind's multi_object_datasets
(GZIP TFRecord of tf.train.Example; 35x35 images, 4 entities = background + 3
pieces). Features: `image` [35, 35, 3] and `mask` [4, 35, 35, 1] as byte
lists with one byte per element (mask 255 on the entity), float `x`, `y`,
`shape`, `visibility` [4] and `color` [4, 3] (RGB in {0, 1}). Splits (paper,
reference): the first `num_train` records (50K) train, the next `num_test`
(10K) test.

Procedural source (`generate_scenes`): the same format, made with numpy.
35x35 black canvas, `num_pieces` non-overlapping pieces (they may touch) made
of 5x5-pixel blocks, each one of the 19 fixed orientations of the 7
tetrominoes (`PIECES`) in one of 6 colours (red, green, blue, yellow,
magenta, cyan), placed one after the other at uniform random pixel positions
(a piece that would overlap an earlier one is re-drawn; a scene that jams
restarts, RESTARTS_PER_SCENE times per scene on average at most, then a
ValueError). Masks: entity 0 is
the background, entity i the i-th piece. `shape`: 0 for the background,
1..19 for the pieces (the reference subtracts 1); `x`, `y`: centre of the
piece's pixels (x = column, y = row, pixel centres at integers), 0 for the
background; `visibility`: 1 for every entity (pieces never overlap). Train
and test come from disjoint seed streams.

Stored (tfds `tusk_tetrominoes`): `image` uint8 [35, 35, 3], `mask` uint8
[E, 35, 35] (0/255), `x`, `y`, `shape`, `visibility` float32 [E], `color`
float32 [E, 3]. `preprocess` resizes with nearest to the training size and
decodes labels: shape = code - 1 (background 0), colour index in
COLOR_NAMES order from the RGB triple (the reference's table), mask = index of
the entity whose mask is set (0 = background).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tusk_jax.datasets import common, tfrecord

IMAGE_SIZE = 35
BLOCK = 5  # Pixels per tetromino block side.
REAL_ENTITIES = 4
REAL_FILE = "tetrominoes_train.tfrecords"
REAL_CANDIDATES = (f"tetrominoes/{REAL_FILE}", REAL_FILE, f"multi_object_datasets/{REAL_FILE}")
ORIGIN = (
    "DeepMind multi_object_datasets, gs://multi-object-datasets/tetrominoes/"
    f"{REAL_FILE} (https://github.com/deepmind/multi_object_datasets)."
)
SEED = 20221128  # Base seed of the procedural generator (independent of config.seed).
MAX_TRIES = 50  # Failed placements in a row before a scene is restarted.
# Restarts allowed per scene on average before giving up (3 pieces: 0.007, 6: about 6).
RESTARTS_PER_SCENE = 100
EXAMPLES_PER_BLOCK = 2000  # Generator block; block b of split s uses seed (SEED, s, b).

# Colour index = reference's table from the RGB triple: red 0, green 1, blue 2,
# cyan 3, magenta 4, yellow 5.
COLOR_NAMES = ("red", "green", "blue", "cyan", "magenta", "yellow")
COLORS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=np.float32
)
# RGB bits (r*4 + g*2 + b) -> colour index; black / white (not pieces) -> 0.
_RGB_BITS_TO_INDEX = np.array([0, 2, 1, 3, 0, 4, 5, 0], dtype=np.int32)

REAL_SPEC = {
    "image": ("bytes", (IMAGE_SIZE, IMAGE_SIZE, 3)),
    "mask": ("bytes", (REAL_ENTITIES, IMAGE_SIZE, IMAGE_SIZE, 1)),
    "x": ("float", (REAL_ENTITIES,)),
    "y": ("float", (REAL_ENTITIES,)),
    "shape": ("float", (REAL_ENTITIES,)),
    "color": ("float", (REAL_ENTITIES, 3)),
    "visibility": ("float", (REAL_ENTITIES,)),
}


def _all_orientations() -> np.ndarray:
    """The 19 fixed tetrominoes: [19, 4, 2] block (row, col) cells, normalised to start at 0."""
    bases = {
        "I": [(0, 0), (0, 1), (0, 2), (0, 3)],
        "O": [(0, 0), (0, 1), (1, 0), (1, 1)],
        "T": [(0, 0), (0, 1), (0, 2), (1, 1)],
        "S": [(0, 1), (0, 2), (1, 0), (1, 1)],
        "Z": [(0, 0), (0, 1), (1, 1), (1, 2)],
        "J": [(0, 0), (1, 0), (1, 1), (1, 2)],
        "L": [(0, 2), (1, 0), (1, 1), (1, 2)],
    }
    pieces = []
    for cells in bases.values():
        seen = []
        cells = np.array(cells)
        for _ in range(4):
            normalised = cells - cells.min(axis=0)
            key = sorted(map(tuple, normalised.tolist()))
            if key not in seen:
                seen.append(key)
                pieces.append(key)
            cells = np.stack([cells[:, 1], -cells[:, 0]], axis=1)  # Rotate by 90 degrees.
    return np.array(pieces, dtype=np.int64)


PIECES = _all_orientations()
NUM_SHAPES = len(PIECES)
assert NUM_SHAPES == 19
_PIECE_HW = (PIECES.max(axis=1) + 1) * BLOCK  # [19, 2] (height, width) pixels.
# Pixel (row, col) offsets of every pixel of each piece: [19, 4 * BLOCK^2, 2].
_block = np.stack(np.meshgrid(np.arange(BLOCK), np.arange(BLOCK), indexing="ij"), -1).reshape(-1, 2)
_PIECE_PIXELS = (PIECES[:, :, None, :] * BLOCK + _block[None, None]).reshape(NUM_SHAPES, -1, 2)


def _stored_scenes(
    ids: np.ndarray, shapes: np.ndarray, colors: np.ndarray, corners: np.ndarray
) -> dict[str, np.ndarray]:
    """`generate_scenes`' stored arrays from the placed pieces (entity id per pixel)."""
    num_scenes, num_pieces = shapes.shape
    size = IMAGE_SIZE
    palette = np.concatenate(
        [np.zeros((num_scenes, 1, 3), np.uint8), (COLORS * 255).astype(np.uint8)[colors]], 1
    )  # [N, E, 3]
    image = palette.reshape(-1, 3)[
        (np.arange(num_scenes)[:, None] * (num_pieces + 1) + ids).reshape(-1)
    ].reshape(num_scenes, size, size, 3)
    entity_rgb = palette.astype(np.float32) / 255
    ids = ids.reshape(num_scenes, size, size)
    entities = np.arange(num_pieces + 1, dtype=np.uint8)
    mask = (ids[:, None] == entities[None, :, None, None]).view(np.uint8) * np.uint8(255)
    # Piece centres: mean (x, y) of each piece's pixels (x = column, y = row).
    centres = (_PIECE_PIXELS.mean(axis=1) + 0.0)[shapes]  # [N, P, 2] (row, col) offsets.
    cy = np.concatenate([np.zeros((num_scenes, 1)), corners[..., 0] + centres[..., 0]], 1)
    cx = np.concatenate([np.zeros((num_scenes, 1)), corners[..., 1] + centres[..., 1]], 1)
    shape_code = np.concatenate([np.zeros((num_scenes, 1)), shapes + 1], 1)
    return {
        "image": image,
        "mask": mask,
        "x": cx.astype(np.float32),
        "y": cy.astype(np.float32),
        "shape": shape_code.astype(np.float32),
        "color": entity_rgb.astype(np.float32),
        "visibility": np.ones((num_scenes, num_pieces + 1), np.float32),
    }


def generate_scenes(
    rng: np.random.Generator, num_scenes: int, num_pieces: int = 3
) -> dict[str, np.ndarray]:
    """Generates Tetrominoes scenes in the stored format, vectorised over scenes.

    Args:
      rng: numpy generator (the scenes are a deterministic function of it).
      num_scenes: N.
      num_pieces: P pieces per scene (E = P + 1 entities with the background).

    Returns:
      dict with `image` uint8 [N, 35, 35, 3], `mask` uint8 [N, E, 35, 35]
      (255 on the entity), `x`, `y`, `shape`, `visibility` float32 [N, E],
      `color` float32 [N, E, 3].

    Raises:
      ValueError: `num_pieces` outside [1, 6], or scenes that keep jamming
        (more than RESTARTS_PER_SCENE restarts per scene on average).
    """
    if num_pieces < 1 or num_pieces > 6:
        raise ValueError(
            f"tetrominoes: num_pieces (dataset.num_objects) must be in [1, 6] for a 35x35 "
            f"canvas, got {num_pieces}"
        )
    restarts_left = RESTARTS_PER_SCENE * num_scenes
    size = IMAGE_SIZE
    shapes = rng.integers(0, NUM_SHAPES, (num_scenes, num_pieces))
    colors = rng.integers(0, len(COLORS), (num_scenes, num_pieces))
    corners = np.zeros((num_scenes, num_pieces, 2), np.int64)  # (row, col) of the top-left.
    ids = np.zeros((num_scenes, size * size), np.uint8)  # Entity index per pixel.
    # Pieces are placed one after the other; a piece that would overlap an
    # earlier one is re-drawn (shape kept, new position) until it fits; a
    # scene that jammed (MAX_TRIES failures in a row) starts again from scratch.
    count = np.zeros(num_scenes, np.int64)  # Pieces placed so far.
    fails = np.zeros(num_scenes, np.int64)
    todo = np.arange(num_scenes)
    while todo.size:
        p = count[todo]
        shape = shapes[todo, p]
        hw = _PIECE_HW[shape]  # [m, 2]
        top_left = np.floor(rng.random((todo.size, 2)) * (size - hw + 1)).astype(np.int64)
        pix = top_left[:, None, :] + _PIECE_PIXELS[shape]  # [m, Q, 2]
        flat = pix[..., 0] * size + pix[..., 1]  # [m, Q]
        free = ~np.any(ids[todo[:, None], flat] > 0, axis=1)
        placed = todo[free]
        ids[placed[:, None], flat[free]] = (p[free] + 1).astype(np.uint8)[:, None]
        corners[placed, p[free]] = top_left[free]
        count[placed] += 1
        fails[placed] = 0
        failed = todo[~free]
        fails[failed] += 1
        jammed = failed[fails[failed] >= MAX_TRIES]
        if jammed.size:
            restarts_left -= jammed.size
            if restarts_left < 0:
                raise ValueError(
                    f"tetrominoes: could not place {num_pieces} pieces on a {size}x{size} "
                    f"canvas: {RESTARTS_PER_SCENE * num_scenes} restarts of {MAX_TRIES} failed "
                    f"positions each for {num_scenes} scenes; lower dataset.num_objects"
                )
            ids[jammed] = 0
            count[jammed] = 0
            fails[jammed] = 0
            shapes[jammed] = rng.integers(0, NUM_SHAPES, (jammed.size, num_pieces))
            colors[jammed] = rng.integers(0, len(COLORS), (jammed.size, num_pieces))
        todo = todo[count[todo] < num_pieces]
    return _stored_scenes(ids, shapes, colors, corners)


@dataclasses.dataclass
class TetrominoesConfig(tfds.core.BuilderConfig):
    source: str = "procedural"  # real | procedural
    num_train: int = 50_000
    num_test: int = 10_000
    num_pieces: int = 3


def config_name(source: str, num_train: int, num_test: int, num_pieces: int) -> str:
    if source == "real":
        return f"real_train{num_train}_test{num_test}"
    return f"procedural_train{num_train}_test{num_test}_pieces{num_pieces}"


class TuskTetrominoes(common.TuskBuilder):
    """Tetrominoes scenes (DeepMind multi_object_datasets format or the embedded generator)."""

    BUILDER_CONFIGS = [TetrominoesConfig(name=config_name("procedural", 50_000, 10_000, 3))]

    def _num_entities(self) -> int:
        cfg = self.builder_config
        return REAL_ENTITIES if cfg.source == "real" else cfg.num_pieces + 1

    def _features(self) -> dict:
        e, s = self._num_entities(), IMAGE_SIZE
        return {
            "image": common.uint8_tensor((s, s, 3)),
            "mask": common.uint8_tensor((e, s, s), zlib=True),
            "x": common.float_tensor((e,)),
            "y": common.float_tensor((e,)),
            "shape": common.float_tensor((e,)),
            "color": common.float_tensor((e, 3)),
            "visibility": common.float_tensor((e,)),
        }

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if cfg.source == "real":
            path = common.find_file(self.manual_dir, REAL_CANDIDATES)
            if path is None:
                raise common.missing_file_error(
                    "tetrominoes", REAL_FILE, self.manual_dir, REAL_CANDIDATES, ORIGIN
                )
            return {
                "train": self._real_examples(path, 0, cfg.num_train),
                "test": self._real_examples(path, cfg.num_train, cfg.num_train + cfg.num_test),
            }
        return {
            "train": self._procedural_examples(0, cfg.num_train),
            "test": self._procedural_examples(1, cfg.num_test),
        }

    def _real_examples(self, path: str, start: int, stop: int):
        count = 0
        for index, ex in tfrecord.read_examples(path, REAL_SPEC, indices=range(start, stop)):
            ex["mask"] = ex["mask"][..., 0]
            count += 1
            yield index, ex
        if count < stop - start:
            raise ValueError(
                f"{path}: has only {start + count} records, the split needs records "
                f"[{start}, {stop}); lower dataset.num_train / num_test."
            )

    def _procedural_examples(self, split_id: int, num: int):
        cfg = self.builder_config
        for block_start in range(0, num, EXAMPLES_PER_BLOCK):
            n = min(EXAMPLES_PER_BLOCK, num - block_start)
            rng = np.random.default_rng([SEED, split_id, block_start // EXAMPLES_PER_BLOCK])
            scenes = generate_scenes(rng, n, cfg.num_pieces)
            for i in range(n):
                yield block_start + i, {k: v[i] for k, v in scenes.items()}


def real_file(config: ml_collections.ConfigDict) -> str | None:
    return common.find_file(common.get_manual_dir(config), REAL_CANDIDATES)


def make_builder(config: ml_collections.ConfigDict) -> TuskTetrominoes:
    """The builder for `config` (resolving source auto/real/procedural; logs the choice)."""
    source = common.get_source(config)
    data_dir = common.get_data_dir(config)
    manual_dir = common.get_manual_dir(config)
    d = config.dataset

    def builder(source: str) -> TuskTetrominoes:
        return common.instantiate(
            TuskTetrominoes,
            TetrominoesConfig(
                name=config_name(source, d.num_train, d.num_test, d.num_objects),
                source=source,
                num_train=d.num_train,
                num_test=d.num_test,
                num_pieces=d.num_objects if source == "procedural" else REAL_ENTITIES - 1,
            ),
            data_dir=data_dir,
            manual_dir=manual_dir,
        )

    path = real_file(config)
    real_prepared = common.is_prepared(
        data_dir, TuskTetrominoes, config_name("real", d.num_train, d.num_test, 3)
    )
    if source == "real" or (source == "auto" and (real_prepared or path is not None)):
        if path is None and not real_prepared:
            raise common.missing_file_error(
                "tetrominoes", REAL_FILE, manual_dir, REAL_CANDIDATES, ORIGIN
            )
        common.log_source("tetrominoes", "real", path or "prepared earlier")
        return builder("real")
    if source == "auto":
        detail = (
            f"no {REAL_FILE} in {manual_dir}; embedded generator, {d.num_train} train / "
            f"{d.num_test} test scenes, {d.num_objects} pieces"
        )
    else:
        detail = "forced by config.dataset.source; embedded generator"
    common.log_source("tetrominoes", "procedural", detail)
    return builder("procedural")


def color_index(rgb: np.ndarray) -> np.ndarray:
    """RGB triples [..., 3] in {0, 1} -> colour index in COLOR_NAMES order (0 if not a colour)."""
    bits = (rgb > 0.5).astype(np.int32)
    return _RGB_BITS_TO_INDEX[bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]]


def entity_ids(mask: np.ndarray) -> np.ndarray:
    """Entity masks uint8 [B, E, H, W] (255 on the entity) -> int32 [B, H, W] entity index."""
    return np.argmax(mask, axis=1).astype(np.int32)


def preprocess(
    batch: dict[str, np.ndarray], image_size: int, with_labels: bool
) -> dict[str, np.ndarray]:
    """Stored examples (stacked, leading batch axis B) -> pipeline arrays.

    Returns `image` float32 [B, S, S, 3] in [0, 1] (nearest resize, SPEC 5)
    and, with labels: `mask` int32 [B, S, S], `shape`, `color` int32 [B, E],
    `visibility` float32 [B, E].
    """
    out = {
        "image": common.to_float_images(
            common.resize_nearest(batch["image"], image_size, image_size)
        )
    }
    if with_labels:
        ids = entity_ids(batch["mask"])
        out["mask"] = common.resize_nearest(ids, image_size, image_size)
        out["shape"] = np.maximum(batch["shape"].astype(np.int32) - 1, 0)
        out["color"] = color_index(batch["color"])
        out["visibility"] = batch["visibility"].astype(np.float32)
    return out


DATASETS = (
    common.DatasetInfo(
        name="tetrominoes",
        task="object_discovery",
        splits=("train", "test"),
        config="tetrominoes",
        generator=True,
        generator_source="procedural",  # DeepMind's file always has 3 pieces.
        paper=(
            common.PaperResult("ari_fg", "ARI-FG", 99.7, "Slot Attention 99.5 ± 0.2"),
            common.PaperResult("shape_accuracy", "shape accuracy", 91.3),
            common.PaperResult("color_accuracy", "colour accuracy", 100.0),
        ),
    ),
)
