"""CLEVR6 / CLEVR10 (SPEC 5) from DeepMind's `clevr_with_masks` TFRecord.

Real source only: `clevr_with_masks_train.tfrecords` of DeepMind's
multi_object_datasets (GZIP TFRecord of tf.train.Example, 100K scenes):
`image` [240, 320, 3] and `mask` [11, 240, 320, 1] as byte lists with one
byte per element (entity 0 = background, 255 on the entity), `size`,
`material`, `shape`, `color` [11] as byte lists (0 = no object; objects:
shape 1..3, colour 1..8, size 1..2, material 1..2), float `x`, `y`, `z`,
`rotation`, `visibility` [11] and `pixel_coords` [11, 3].

Splits, as in the reference (and Slot Attention / IODINE): only the first
NUM_RECORDS = 70 000 records are used.
- clevr6: of those, the scenes with at most 6 objects (object slot 7 empty,
  i.e. `color[7] == 0`, the reference's test): about half of them; the last
  `num_test` (10K) kept scenes are the test split, the others train. (The
  paper's "first 70K images with <= 6 objects, 60K train" cannot be met: the
  whole file holds about 50K such scenes; the reference's rule is used.)
- clevr10: all of them (3..10 objects); the last `num_test` records (60K..70K)
  are the test split, the others train. Its test scenes with <= 6 objects are
  all in clevr6's test split, so a model trained on clevr6 never saw them.

Preparation reads the file once to find the clevr6 boundary (no CRC check,
a byte search for the `color` feature) and once more to convert (with CRC
checks); on one core expect 1-3 hours for the 10.5 GB file (pip install
google-crc32c makes the CRC part negligible).

Stored (tfds `tusk_clevr`, configs `clevr6_*`, `clevr10_*`): the same
features at full resolution (`mask` [11, 240, 320] zlib-compressed).
`preprocess` (SPEC 5, reference): centre crop 192x192, resize to the training
size with nearest (the reference's `F.interpolate` default) for the image
and the mask; labels shape/colour/size/material = code - 1 (0 for the
background), mask = entity index (0 = background).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging

from tusk_jax.datasets import common, tfrecord

HEIGHT, WIDTH, ENTITIES = 240, 320, 11
CROP = 192
NUM_RECORDS = 70_000
MAX_OBJECTS_CLEVR6 = 6
REAL_FILE = "clevr_with_masks_train.tfrecords"
REAL_CANDIDATES = (
    f"clevr_with_masks/{REAL_FILE}",
    REAL_FILE,
    f"multi_object_datasets/clevr_with_masks/{REAL_FILE}",
)
ORIGIN = (
    "DeepMind multi_object_datasets, gs://multi-object-datasets/clevr_with_masks/"
    f"{REAL_FILE} (https://github.com/deepmind/multi_object_datasets)."
)
REAL_SPEC = {
    "image": ("bytes", (HEIGHT, WIDTH, 3)),
    "mask": ("bytes", (ENTITIES, HEIGHT, WIDTH, 1)),
    "x": ("float", (ENTITIES,)),
    "y": ("float", (ENTITIES,)),
    "z": ("float", (ENTITIES,)),
    "pixel_coords": ("float", (ENTITIES, 3)),
    "rotation": ("float", (ENTITIES,)),
    "size": ("bytes", (ENTITIES,)),
    "material": ("bytes", (ENTITIES,)),
    "shape": ("bytes", (ENTITIES,)),
    "color": ("bytes", (ENTITIES,)),
    "visibility": ("float", (ENTITIES,)),
}
# Serialised map entry key of the `color` feature, then Feature{bytes_list{11 x (0x0A 0x01 b)}}.
_COLOR_KEY = b"\n\x05color\x12"


def record_colors(payload: bytes) -> np.ndarray:
    """Colour codes uint8 [11] of one serialised record, by a byte search (fast index pass)."""
    at = payload.find(_COLOR_KEY)
    if at >= 0:
        body = payload[at + len(_COLOR_KEY) + 3 : at + len(_COLOR_KEY) + 3 + 3 * ENTITIES]
        triples = np.frombuffer(body, np.uint8).reshape(-1, 3) if len(body) == 33 else None
        if triples is not None and (triples[:, 0] == 0x0A).all() and (triples[:, 1] == 1).all():
            return triples[:, 2].copy()
    return tfrecord.parse_example(payload, {"color": REAL_SPEC["color"]})["color"]


def split_indices(path: str, variant: str, num_records: int, num_test: int) -> dict[str, list[int]]:
    """Record indices of the train and test splits of clevr6 / clevr10 (see module doc)."""
    if variant == "clevr10":
        kept = list(range(num_records))  # A short file is reported by the conversion.
    else:
        logging.info("clevr6: indexing the first %d records of %s ...", num_records, path)
        kept, count = [], 0
        records = tfrecord.read_records(path, False, indices=range(num_records))
        for index, payload in tqdm.tqdm(
            records, total=num_records, desc="clevr6 index", unit="rec"
        ):
            count += 1
            if record_colors(payload)[MAX_OBJECTS_CLEVR6 + 1] == 0:
                kept.append(index)
        if count < num_records:
            raise ValueError(f"{path}: has {count} records, clevr6 needs {num_records}")
    if len(kept) <= num_test:
        raise ValueError(f"{path}: {variant} keeps {len(kept)} scenes, not more than {num_test}")
    return {"train": kept[:-num_test], "test": kept[-num_test:]}


@dataclasses.dataclass
class ClevrConfig(tfds.core.BuilderConfig):
    variant: str = "clevr6"  # clevr6 | clevr10
    num_records: int = NUM_RECORDS
    num_test: int = 10_000


def config_name(variant: str, num_records: int, num_test: int) -> str:
    return f"{variant}_records{num_records}_test{num_test}"


class TuskClevr(common.TuskBuilder):
    """CLEVR with masks (DeepMind multi_object_datasets), clevr6 / clevr10 splits."""

    BUILDER_CONFIGS = [
        ClevrConfig(name=config_name(v, NUM_RECORDS, 10_000), variant=v)
        for v in ("clevr6", "clevr10")
    ]

    def _features(self) -> dict:
        e = ENTITIES
        feats = {
            "image": common.uint8_tensor((HEIGHT, WIDTH, 3)),
            "mask": common.uint8_tensor((e, HEIGHT, WIDTH), zlib=True),
            "pixel_coords": common.float_tensor((e, 3)),
        }
        for k in ("size", "material", "shape", "color"):
            feats[k] = common.uint8_tensor((e,))
        for k in ("x", "y", "z", "rotation", "visibility"):
            feats[k] = common.float_tensor((e,))
        return feats

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        path = common.find_file(self.manual_dir, REAL_CANDIDATES)
        if path is None:
            raise common.missing_file_error(
                cfg.variant, REAL_FILE, self.manual_dir, REAL_CANDIDATES, ORIGIN
            )
        splits = split_indices(path, cfg.variant, cfg.num_records, cfg.num_test)
        return {name: self._examples(path, idx) for name, idx in splits.items()}

    def _examples(self, path: str, indices: list[int]):
        count = 0
        for index, ex in tfrecord.read_examples(path, REAL_SPEC, indices=set(indices)):
            ex["mask"] = ex["mask"][..., 0]
            count += 1
            yield index, ex
        if count < len(indices):
            raise ValueError(
                f"{path}: ended after {count} of the {len(indices)} records this split needs "
                f"(records up to {max(indices)}); the file is incomplete."
            )


def make_builder(config: ml_collections.ConfigDict) -> TuskClevr:
    """Builder of config.dataset.name (clevr6 | clevr10); real files only."""
    variant = config.dataset.name
    source = common.get_source(config)
    if source == "procedural":
        raise ValueError(
            f"{variant} has no procedural source (config.dataset.source='procedural'); use "
            "'auto' or 'real' with the DeepMind file in the manual dir"
        )
    data_dir = common.get_data_dir(config)
    manual_dir = common.get_manual_dir(config)
    num_records = int(config.dataset.get("clevr_num_records", NUM_RECORDS))
    num_test = int(config.dataset.num_test)
    name = config_name(variant, num_records, num_test)
    path = common.find_file(manual_dir, REAL_CANDIDATES)
    if path is None and not common.is_prepared(data_dir, TuskClevr, name):
        raise common.missing_file_error(variant, REAL_FILE, manual_dir, REAL_CANDIDATES, ORIGIN)
    common.log_source(variant, "real", path or "prepared earlier")
    return common.instantiate(
        TuskClevr,
        ClevrConfig(name=name, variant=variant, num_records=num_records, num_test=num_test),
        data_dir=data_dir,
        manual_dir=manual_dir,
    )


def preprocess(
    batch: dict[str, np.ndarray], image_size: int, with_labels: bool
) -> dict[str, np.ndarray]:
    """Stored scenes (stacked) -> `image` float32 [B, S, S, 3] (+ labels, see module doc).

    Centre crop CROP x CROP then nearest resize to S; labels: `mask` int32
    [B, S, S], `shape`, `color`, `size`, `material` int32 [B, 11],
    `visibility` float32 [B, 11].
    """
    top, left = (HEIGHT - CROP) // 2, (WIDTH - CROP) // 2
    image = batch["image"][:, top : top + CROP, left : left + CROP]
    out = {"image": common.to_float_images(common.resize_nearest(image, image_size, image_size))}
    if with_labels:
        ids = np.argmax(batch["mask"][:, :, top : top + CROP, left : left + CROP], axis=1)
        out["mask"] = common.resize_nearest(ids.astype(np.int32), image_size, image_size)
        for k in ("shape", "color", "size", "material"):
            out[k] = np.maximum(batch[k].astype(np.int32) - 1, 0)
        out["visibility"] = batch["visibility"].astype(np.float32)
    return out


DATASETS = (
    common.DatasetInfo(
        name="clevr6",
        task="object_discovery",
        splits=("train", "test"),
        config="clevr6",
        paper=(
            common.PaperResult("ari_fg", "ARI-FG", 98.3, "Slot Attention 98.8 ± 0.3"),
            common.PaperResult("shape_accuracy", "shape accuracy", 46.8),
            common.PaperResult("color_accuracy", "colour accuracy", 90.7),
            common.PaperResult("size_accuracy", "size accuracy", 97.1),
        ),
    ),
    common.DatasetInfo(
        name="clevr10",
        task="object_discovery",
        splits=("train", "test"),
        config="clevr6",  # Evaluated with the CLEVR6 model (the paper's Table 8).
        paper=(common.PaperResult("ari_fg", "ARI-FG (trained on CLEVR6)", 97.6),),
    ),
)
