"""CelebA in the wild (SPEC 5): unaligned CelebA faces covering > 30% of the image, MAFL splits.

Real source only. Manual dir layout (the official CelebA folders plus the
MAFL lists; `<m>` is the manual dir, files looked up in `<m>/celeba/` first,
then `<m>/CelebA/` (the official download's folder), then `<m>/`):

    img_celeba/000001.jpg ...           "In-The-Wild Images" (unaligned), or
    Img/img_celeba/000001.jpg ...       the same where the official download has it
    Anno/list_bbox_celeba.txt           face boxes: image x_1 y_1 width height
    Anno/list_landmarks_celeba.txt      5 landmarks of the unaligned images
    Eval/list_eval_partition.txt        image partition (0 train, 1 val, 2 test)
    MAFL/training.txt, MAFL/testing.txt MAFL lists (also accepted in Eval/)

Splits (reference, Thewlis et al. / He et al. protocol), all keeping only
faces whose box covers more than 30% of the image (box area / image area):
- `train`: CelebA partition 0 minus the MAFL test images (unsupervised training);
- `regressor_train`: MAFL training images (fits the linear regressor);
- `test`: MAFL testing images (the reported error).

Preprocessing (reference): the whole image is resized to S x S (aspect not
kept; antialiased bilinear), landmarks follow with pixel centres at integers:
x -> (x + 0.5) * S / W - 0.5. Landmark order: left eye, right eye, nose,
left mouth corner, right mouth corner (eyes first: the inter-ocular
distance is |lm[0] - lm[1]|). Stored (tfds `tusk_celeba_wild`, config
`size{S}`): `image` uint8 [S, S, 3], `landmarks` float32 [5, 2] at S.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tusk_jax.datasets import common

MIN_FACE_FRACTION = 0.3
NUM_LANDMARKS = 5
ORIGIN = (
    "CelebA (http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html): img_celeba.7z "
    "('In-The-Wild Images'), Anno/ and Eval/ folders; MAFL lists training.txt / "
    "testing.txt from the MAFL project (Zhang et al., TCDCN)."
)
# Folders searched, in order, inside the manual dir ("CelebA" is the official download's name).
ROOTS = ("celeba/", "CelebA/", "")
# Each file's places inside a root: flat, or the official layout (Img/img_celeba/).
_PLACES = {
    "images": ("img_celeba", "Img/img_celeba"),
    "bbox": ("Anno/list_bbox_celeba.txt",),
    "landmarks": ("Anno/list_landmarks_celeba.txt",),
    "partition": ("Eval/list_eval_partition.txt",),
    "mafl_train": ("MAFL/training.txt", "Eval/training.txt"),
    "mafl_test": ("MAFL/testing.txt", "Eval/testing.txt"),
}
FILES = {
    key: tuple(root + place for root in ROOTS for place in places)
    for key, places in _PLACES.items()
}


def find_files(manual_dir: str) -> dict[str, str]:
    """Paths of every needed file; FileNotFoundError naming the first missing one."""
    out = {}
    for key, candidates in FILES.items():
        path = common.find_file(manual_dir, candidates)
        if path is None:
            raise common.missing_file_error("celeba_wild", key, manual_dir, candidates, ORIGIN)
        out[key] = path
    return out


def read_table(path: str, num_values: int) -> dict[str, np.ndarray]:
    """CelebA annotation table: image name -> int values [num_values] (header lines skipped)."""
    table = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts or not parts[0].lower().endswith((".jpg", ".png")):
                continue  # Count line and column header.
            if len(parts) != num_values + 1:
                raise ValueError(f"{path}:{line_no}: expected {num_values} values, got {line!r}")
            table[parts[0]] = np.array([float(v) for v in parts[1:]], np.float32)
    return table


def read_list(path: str) -> list[str]:
    """One image name per line (first token), blank lines skipped."""
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def split_names(files: dict[str, str]) -> dict[str, list[str]]:
    """Image names of train / regressor_train / test before the face-size filter."""
    partition = read_table(files["partition"], 1)
    mafl_test = read_list(files["mafl_test"])
    excluded = set(mafl_test)
    train = sorted(n for n, p in partition.items() if p[0] == 0 and n not in excluded)
    return {"train": train, "regressor_train": read_list(files["mafl_train"]), "test": mafl_test}


@dataclasses.dataclass
class CelebaWildConfig(tfds.core.BuilderConfig):
    image_size: int = 80


class TuskCelebaWild(common.TuskBuilder):
    """Unaligned CelebA faces covering > 30% of the image, with 5 landmarks; MAFL splits."""

    BUILDER_CONFIGS = [CelebaWildConfig(name="size80", image_size=80)]

    def _features(self) -> dict:
        s = self.builder_config.image_size
        return {
            "image": common.uint8_tensor((s, s, 3)),
            "landmarks": common.float_tensor((NUM_LANDMARKS, 2)),
        }

    def _split_generators(self, dl_manager):
        del dl_manager
        files = find_files(self.manual_dir)
        names = split_names(files)
        bbox = read_table(files["bbox"], 4)
        landmarks = read_table(files["landmarks"], 2 * NUM_LANDMARKS)
        return {
            split: self._examples(files["images"], n, bbox, landmarks) for split, n in names.items()
        }

    def _examples(self, image_dir: str, names: list[str], bbox: dict, landmarks: dict):
        s = self.builder_config.image_size
        for name in names:
            if name not in bbox or name not in landmarks:
                raise ValueError(f"celeba_wild: {name} has no box or landmarks in the Anno files")
            path = os.path.join(image_dir, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"celeba_wild: image {path} listed but missing")
            with Image.open(path) as im:
                width, height = im.size
                _, _, box_w, box_h = bbox[name]
                if box_w * box_h / (width * height) <= MIN_FACE_FRACTION:
                    continue
                image = np.asarray(im.convert("RGB"))
            yield (
                name,
                {
                    "image": common.resize_bilinear_uint8(image, s, s),
                    "landmarks": common.scale_points(
                        landmarks[name].reshape(NUM_LANDMARKS, 2), (height, width), (s, s)
                    ),
                },
            )


def make_builder(config: ml_collections.ConfigDict) -> TuskCelebaWild:
    """Builder for config.dataset.image_size; real files only."""
    if common.get_source(config) == "procedural":
        raise ValueError(
            "celeba_wild has no procedural source (config.dataset.source='procedural'); "
            "use 'auto' or 'real' with the CelebA files in the manual dir"
        )
    data_dir = common.get_data_dir(config)
    manual_dir = common.get_manual_dir(config)
    size = int(config.dataset.image_size)
    name = f"size{size}"
    if not common.is_prepared(data_dir, TuskCelebaWild, name):
        find_files(manual_dir)  # Raises, naming the first missing file.
    common.log_source("celeba_wild", "real", manual_dir)
    return common.instantiate(
        TuskCelebaWild,
        CelebaWildConfig(name=name, image_size=size),
        data_dir=data_dir,
        manual_dir=manual_dir,
    )


def preprocess(
    batch: dict[str, np.ndarray], image_size: int, with_labels: bool
) -> dict[str, np.ndarray]:
    """Stored faces (stacked) -> `image` float32 [B, S, S, 3], `landmarks` float32 [B, 5, 2]."""
    images = batch["image"]
    in_hw = images.shape[1:3]
    if in_hw != (image_size, image_size):
        images = np.stack(
            [common.resize_bilinear_uint8(im, image_size, image_size) for im in images]
        )
    out = {"image": common.to_float_images(images)}
    if with_labels:
        out["landmarks"] = common.scale_points(batch["landmarks"], in_hw, (image_size, image_size))
    return out


DATASETS = (
    common.DatasetInfo(
        name="celeba_wild",
        task="landmarks",
        num_landmarks=NUM_LANDMARKS,
        splits=("train", "regressor_train", "test"),
        config="celeba",
        evaluator_options={"normalizer": "inter_ocular"},
        paper=(
            common.PaperResult(
                "forward_error", "error / inter-ocular distance", 18.49, "He et al. tuned 12.10"
            ),
        ),
    ),
)
