"""Pieces shared by the dataset modules: builder base class, paths, sources, resizing.

This module owns
- where data lives: `data_dir` (config, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets) and `manual_dir` (config, else
  <data_dir>/downloads/manual);
- the `source` choice (`auto` | `real` | `procedural`) and its logging;
- `TuskBuilder`, the tfds builder base: array_record files,
  `tfds.features.Tensor` features, no TensorFlow, examples stored in source
  order (`disable_shuffling`), atomic preparation (tfds writes into an
  `incomplete.*` folder and renames it only when every split is written);
- numpy resizing used by the preprocessing (nearest for masks, bilinear for
  photos) and the matching coordinate map. Coordinates follow SPEC 1: (x, y)
  pixels, pixel centres at integers, so a resize from size S to size S' maps
  x -> (x + 0.5) * S' / S - 0.5.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

SOURCES = ("auto", "real", "procedural")
TASKS = ("object_discovery", "multi_instance", "landmarks")  # The protocols of SPEC 6.


@dataclasses.dataclass(frozen=True)
class PaperResult:
    """One row of the paper's results (SPEC 8), in percent."""

    metric: str  # Key in the evaluation's metrics.
    label: str
    tusk: float  # TUSK in the paper.
    best_other: str = ""  # Best other method in the paper, as text.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of tusk_jax knows about one dataset (`config.dataset.name`).

    Attributes:
      name: the dataset name.
      task: its evaluation protocol, one of `TASKS`.
      splits: public split names (landmarks: `train`, `regressor_train`, `test`).
      config: the `tusk_jax/configs/<config>.py` whose `get_config()` gives its defaults.
      generator: True if an embedded generator makes scenes with
        `dataset.num_objects` objects (so evaluation can choose the count).
      generator_source: `dataset.source` for scenes of another object count
        (None: keep the run's).
      split_aliases: public split -> stored split (splits sharing storage).
      evaluator_options: keyword arguments of the task's evaluator.
      num_landmarks: annotated landmarks per image (landmark datasets; 0 otherwise).
      paper: the paper's results.
    """

    name: str
    task: str
    splits: tuple[str, ...]
    config: str
    generator: bool = False
    generator_source: str | None = None
    split_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    evaluator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_landmarks: int = 0
    paper: tuple[PaperResult, ...] = ()


class DataFileError(ValueError):
    """A data folder or stored dataset file that cannot be read; names it and the fix."""


def get_data_dir(config: ml_collections.ConfigDict) -> str:
    """tfds data dir: config.dataset.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.

    Raises:
      DataFileError: the path exists and is not a folder (named with where it came from).
    """
    data_dir, origin = config.dataset.get("data_dir", None), "config.dataset.data_dir"
    if not data_dir:
        data_dir, origin = os.environ.get("TFDS_DATA_DIR"), "$TFDS_DATA_DIR"
    if not data_dir:
        data_dir, origin = os.path.join(os.path.expanduser("~"), "tensorflow_datasets"), "default"
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataFileError(
            f"the tfds data dir {data_dir} ({origin}) is a file, not a folder; point "
            "$TFDS_DATA_DIR or --config.dataset.data_dir at a folder (created if needed)."
        )
    return data_dir


def get_manual_dir(config: ml_collections.ConfigDict) -> str:
    """Folder of real files: config.dataset.manual_dir, else <data_dir>/downloads/manual."""
    manual_dir = config.dataset.get("manual_dir", None)
    if not manual_dir:
        manual_dir = os.path.join(get_data_dir(config), "downloads", "manual")
    return os.path.abspath(os.path.expanduser(manual_dir))


def get_source(config: ml_collections.ConfigDict) -> str:
    """config.dataset.source, validated."""
    source = config.dataset.get("source", "auto")
    if source not in SOURCES:
        raise ValueError(f"config.dataset.source must be one of {SOURCES}, got {source!r}")
    return source


def find_file(manual_dir: str, candidates: Sequence[str]) -> str | None:
    """First of `candidates` (paths relative to manual_dir) that exists, else None."""
    for candidate in candidates:
        path = os.path.join(manual_dir, candidate)
        if os.path.exists(path):
            return path
    return None


def missing_file_error(
    dataset: str, what: str, manual_dir: str, candidates: Sequence[str], origin: str
) -> FileNotFoundError:
    """An error naming the missing file, the folder searched and where the data comes from."""
    tried = "\n".join(f"  {os.path.join(manual_dir, c)}" for c in candidates)
    return FileNotFoundError(
        f"{dataset}: {what} not found. Looked for:\n{tried}\n"
        f"(manual dir: {manual_dir}; set config.dataset.manual_dir or --manual_dir to change it).\n"
        f"Where to get it: {origin}\nSee tusk_jax/datasets/README.md."
    )


def is_prepared(data_dir: str, builder_cls: type, config_name: str) -> bool:
    """Whether `builder_cls` with config `config_name` is fully prepared in `data_dir`.

    Checked on disk, without building the builder (which logs warnings).
    """
    return os.path.exists(
        os.path.join(
            data_dir, builder_cls.name, config_name, str(builder_cls.VERSION), "dataset_info.json"
        )
    )


def log_source(dataset: str, source: str, detail: str) -> None:
    logging.info("Dataset %s: using the %s source (%s).", dataset, source.upper(), detail)


class TuskBuilder(tfds.core.GeneratorBasedBuilder):
    """tfds builder base: array_record, Tensor features, source order, explicit manual dir.

    Subclasses define `_features()` (name -> tfds feature) and
    `_split_generators`. The folder of real files is passed as `manual_dir`
    (tfds' own `dl_manager.manual_dir` insists on a non-empty folder even
    for procedural configs).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, manual_dir: str | None = None, **kwargs):
        self._manual_dir = manual_dir
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _features(self) -> dict:
        raise NotImplementedError

    def _generate_examples(self, *args, **kwargs):
        # Subclasses return their own generators from _split_generators.
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(self._features()),
            disable_shuffling=True,  # Keep source order: splits are "first N", "last M".
        )

    @property
    def manual_dir(self) -> str:
        if not self._manual_dir:
            raise ValueError(f"{self.name}: no manual_dir given for the real source")
        return self._manual_dir


def instantiate(builder_cls: type, config: tfds.core.BuilderConfig, **kwargs):
    """`builder_cls(config=config, **kwargs)`, passing a registered config by name (tfds rule)."""
    registered = builder_cls.builder_configs.get(config.name)
    return builder_cls(config=config.name if registered == config else config, **kwargs)


def uint8_tensor(shape: Sequence[int], zlib: bool = False) -> tfds.features.Tensor:
    """A uint8 Tensor feature stored as one byte string (zlib-compressed if asked)."""
    encoding = tfds.features.Encoding.ZLIB if zlib else tfds.features.Encoding.BYTES
    return tfds.features.Tensor(shape=tuple(shape), dtype=np.uint8, encoding=encoding)


def float_tensor(shape: Sequence[int]) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=tuple(shape), dtype=np.float32)


# ---------------------------------------------------------------------------
# Resizing (numpy / PIL) and the coordinate map that goes with it.
# ---------------------------------------------------------------------------
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize: floor((i + 0.5) * in / out)."""
    idx = np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a batch [B, H, W] or [B, H, W, C] to [B, height, width, ...]."""
    rows = nearest_indices(images.shape[1], height)
    cols = nearest_indices(images.shape[2], width)
    return images[:, rows][:, :, cols]


def resize_bilinear_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize (PIL) of one uint8 image [H, W, C] -> [height, width, C]."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    squeeze = image.ndim == 3 and image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return out[..., None] if squeeze else out


def scale_points(
    xy: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int], offset_xy=(0.0, 0.0)
) -> np.ndarray:
    """Maps (x, y) pixel coordinates through a crop then a resize.

    The crop removes `offset_xy` pixels at the left/top (x -> x - offset);
    the resize takes an image of `in_hw` (height, width, after the crop) to
    `out_hw`; with pixel centres at integers, x -> (x + 0.5) * W'/W - 0.5.

    Args:
      xy: [..., 2] (x, y) pixels.
    """
    xy = np.asarray(xy, np.float32)
    sx = out_hw[1] / in_hw[1]
    sy = out_hw[0] / in_hw[0]
    x = (xy[..., 0] - offset_xy[0] + 0.5) * sx - 0.5
    y = (xy[..., 1] - offset_xy[1] + 0.5) * sy - 0.5
    return np.stack([x, y], axis=-1).astype(np.float32)


def to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C] (C = 1 or 3) -> float32 [B, H, W, 3] in [0, 1]."""
    images = images.astype(np.float32) * np.float32(1.0 / 255.0)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images
