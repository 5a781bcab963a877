"""Human3.6M (SPEC 5): background-removed frames with 32 2-D joints, 6 train / 1 test subjects.

Real source only (the dataset's licence forbids redistribution). Manual dir
layout (looked up in `<manual_dir>/h36m/` first, then `<manual_dir>/`):

    S1/<any folders>/<frame>.jpg|png     background-removed frames (any size)
    S5/...  S6/...  S7/...  S8/...  S9/...  S11/...
    landmarks.csv                        one line per frame:
        <path relative to the h36m folder>,x0,y0,x1,y1,...,x31,y31

The path's first folder is the subject. Joint (x, y) are pixels of the frame
as stored (x = column, y = row, pixel centres at integers) in the 32-joint
Human3.6M order. Lines starting with `#` are comments; frames are stored in
the order of the file. Frames the CSV does not name are ignored; a named
frame that is missing is an error. This is the layout of the reference's
`crop_foreground_h36m` folder (`cropped_pose.h5` -> CSV, one row per image).

Splits (Zhang et al. 2018 / Lorenz et al. 2019, the reference):
`train` = subjects S1, S5, S6, S7, S8, S9 (unsupervised training and the
regressor: `regressor_train` is the same split), `test` = S11.

Preprocessing (SPEC 5 "112 (short side)"): the short side is resized to S
(antialiased bilinear), then the centre S x S square is kept (reference
frames are square, so the crop removes nothing there); joints follow.
`back_facing` (for the left/right swap of the protocol): the person turns
their back to the camera when their left joints appear LEFT of their right
joints in the image: (x[LShoulder] - x[RShoulder]) + (x[LHip] - x[RHip]) < 0
with the H36M-32 indices LShoulder 17, RShoulder 25, LHip 6, RHip 1.
Stored (tfds `tusk_h36m`, config `size{S}`): `image` uint8 [S, S, 3],
`landmarks` float32 [32, 2] at S.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tusk_jax.datasets import common

NUM_JOINTS = 32
TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8", "S9")
TEST_SUBJECTS = ("S11",)
L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 17, 25, 6, 1
SPLIT_ALIASES = {"regressor_train": "train"}
CSV_CANDIDATES = ("h36m/landmarks.csv", "landmarks.csv")
ORIGIN = (
    "Human3.6M (http://vision.imar.ro/human3.6m), frames with the background "
    "removed by the dataset's tool, converted to the layout in "
    "tusk_jax/datasets/h36m.py (landmarks.csv + S*/ folders)."
)


def read_csv(path: str) -> list[tuple[str, np.ndarray]]:
    """(relative path, joints float32 [32, 2]) per frame, in file order."""
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(",")
            if len(parts) != 1 + 2 * NUM_JOINTS:
                raise ValueError(
                    f"{path}:{line_no}: expected a path and {2 * NUM_JOINTS} numbers, "
                    f"got {len(parts) - 1}"
                )
            try:
                joints = np.array([float(v) for v in parts[1:]], np.float32)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: {e}") from e
            rows.append((parts[0].strip(), joints.reshape(NUM_JOINTS, 2)))
    return rows


def subject_of(relative_path: str) -> str:
    return relative_path.replace("\\", "/").split("/")[0]


def back_facing(joints: np.ndarray) -> np.ndarray:
    """bool [...]: whether joints [..., 32, 2] show a person seen from the back (module doc)."""
    x = joints[..., 0]
    return (x[..., L_SHOULDER] - x[..., R_SHOULDER]) + (x[..., L_HIP] - x[..., R_HIP]) < 0


def load_frame(path: str, size: int, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Short side -> size, centre crop size x size: (uint8 [size, size, 3], joints [32, 2])."""
    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = common.resize_bilinear_uint8(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size]
    joints = common.scale_points(joints, (height, width), (new_h, new_w))
    joints = joints - np.array([left, top], np.float32)
    return crop, joints.astype(np.float32)


@dataclasses.dataclass
class H36mConfig(tfds.core.BuilderConfig):
    image_size: int = 112


class TuskH36m(common.TuskBuilder):
    """Human3.6M background-removed frames with 32 joints; S1,5,6,7,8,9 train, S11 test."""

    BUILDER_CONFIGS = [H36mConfig(name="size112", image_size=112)]

    def _features(self) -> dict:
        s = self.builder_config.image_size
        return {
            "image": common.uint8_tensor((s, s, 3)),
            "landmarks": common.float_tensor((NUM_JOINTS, 2)),
        }

    def _split_generators(self, dl_manager):
        del dl_manager
        csv = common.find_file(self.manual_dir, CSV_CANDIDATES)
        if csv is None:
            raise common.missing_file_error(
                "h36m", "landmarks.csv", self.manual_dir, CSV_CANDIDATES, ORIGIN
            )
        rows = read_csv(csv)
        root = os.path.dirname(csv)
        return {
            "train": self._examples(root, [r for r in rows if subject_of(r[0]) in TRAIN_SUBJECTS]),
            "test": self._examples(root, [r for r in rows if subject_of(r[0]) in TEST_SUBJECTS]),
        }

    def _examples(self, root: str, rows: list[tuple[str, np.ndarray]]):
        s = self.builder_config.image_size
        for relative, joints in rows:
            path = os.path.join(root, relative)
            if not os.path.exists(path):
                raise FileNotFoundError(f"h36m: frame {path} named in landmarks.csv is missing")
            image, joints = load_frame(path, s, joints)
            yield relative, {"image": image, "landmarks": joints}


def make_builder(config: ml_collections.ConfigDict) -> TuskH36m:
    """Builder for config.dataset.image_size; real files only."""
    if common.get_source(config) == "procedural":
        raise ValueError(
            "h36m has no procedural source (config.dataset.source='procedural'); "
            "use 'auto' or 'real' with the frames in the manual dir"
        )
    data_dir = common.get_data_dir(config)
    manual_dir = common.get_manual_dir(config)
    size = int(config.dataset.image_size)
    name = f"size{size}"
    csv = common.find_file(manual_dir, CSV_CANDIDATES)
    if csv is None and not common.is_prepared(data_dir, TuskH36m, name):
        raise common.missing_file_error("h36m", "landmarks.csv", manual_dir, CSV_CANDIDATES, ORIGIN)
    common.log_source("h36m", "real", csv or "prepared earlier")
    return common.instantiate(
        TuskH36m, H36mConfig(name=name, image_size=size), data_dir=data_dir, manual_dir=manual_dir
    )


def preprocess(
    batch: dict[str, np.ndarray], image_size: int, with_labels: bool
) -> dict[str, np.ndarray]:
    """Stored frames -> `image` float32 [B, S, S, 3], `landmarks` [B, 32, 2], `back_facing` [B]."""
    images = batch["image"]
    in_hw = images.shape[1:3]
    if in_hw != (image_size, image_size):
        images = np.stack(
            [common.resize_bilinear_uint8(im, image_size, image_size) for im in images]
        )
    out = {"image": common.to_float_images(images)}
    if with_labels:
        out["landmarks"] = common.scale_points(batch["landmarks"], in_hw, (image_size, image_size))
        out["back_facing"] = back_facing(batch["landmarks"])
    return out


DATASETS = (
    common.DatasetInfo(
        name="h36m",
        task="landmarks",
        num_landmarks=NUM_JOINTS,
        splits=("train", "regressor_train", "test"),
        config="h36m",
        split_aliases=SPLIT_ALIASES,
        evaluator_options={"normalizer": "image_size"},
        paper=(common.PaperResult("forward_error", "error / image size", 6.88, "Lorenz 2.79"),),
    ),
)
