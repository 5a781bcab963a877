"""A detector exported by `tusk_jax.export`, loaded and run with jax and numpy alone.

    from tusk_jax import exported
    detector = exported.load("exported/tetrominoes")
    found = detector.detect(images)                 # as inference.Detector.detect
    found[0].keypoints, found[0].confidence, found[0].prototype, found[0].descriptors

This module owns the export folder's format and its loader. The folder holds

- `detector.jax_export`: a serialized `jax.export.Exported` (StableHLO) of
  `fn(images)`, images `[b, h, w, 3]` float32 in [0, 1] with symbolic b, h
  and w (any batch and any image size with h * w >= K), returning a dict of
  `keypoints` `[b, K, 2]` ((x, y) pixels of the h x w input, pixel centres at
  integers, SPEC section 1), `confidence` `[b, K]`, `prototype` `[b, K]`
  int32, `descriptors` `[b, K, C]` (unit norm) and optionally
  `reconstruction` `[b, h, w, 3]`. The program is `inference.Detector.network`,
  the in-process detector's own body: the image is padded inside it to
  multiples of 2**(depth - 1) (reflection) and the maps are cropped back. The
  weights are constants of the program: no other file is needed.
- `detector.json`: what the program is (training image size, K, window,
  number of prototypes, output names, platforms), where it comes from (the
  run's config, workdir and step, the tusk_jax and jax versions that wrote
  it) and the artifact's sha256, checked on load.

Around the program, `ExportedDetector.detect` is `inference.Detector.detect`
through the same helpers (`tusk_jax.detection_io`: `detect_images`,
`run_by_size`): any count and size, uint8 or float, grey or RGB; `scale`
resizes each image before the network; each image runs at its own size and
the keypoints are mapped back to its pixels. So the keypoints are the
in-process detector's (within float rounding) at every size and scale. K is
fixed when exporting. Format 1 artifacts (one fixed size, every image
resized to it) are refused with a line saying to export again.

Only jax, numpy and the standard library are imported (no flax, optax,
orbax, tfds, ml_collections, PIL): `pip install jax flatbuffers` and
`pip install --no-deps` of this package are enough to run an exported
detector (flatbuffers is jax's serialization format).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax import export as jax_export
from numpy.typing import ArrayLike

from tusk_jax.detection_io import Detections, as_image_list, detect_images, run_by_size

ARTIFACT_FILE = "detector.jax_export"
METADATA_FILE = "detector.json"
FORMAT = "tusk_jax.exported_detector"
FORMAT_VERSION = 2  # 2: any image size (symbolic h, w); 1: the training size only.
DETECTION_OUTPUTS = ("keypoints", "confidence", "prototype", "descriptors")
RECONSTRUCTION_OUTPUT = "reconstruction"
# Fields every detector.json has (written by tusk_jax.export.export_detector).
METADATA_FIELDS = (
    "format",
    "format_version",
    "artifact",
    "artifact_sha256",
    "image_size",
    "num_keypoints",
    "window",
    "num_prototypes",
    "feature_dim",
    "outputs",
    "platforms",
    "step",
    "workdir",
    "config",
    "tusk_jax_version",
    "jax_version",
)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def read_metadata(directory: str) -> dict[str, Any]:
    """`<directory>/detector.json`, checked for the fields and format this loader reads.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not JSON, not an export's metadata, or another format version.
    """
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: not found; {directory!r} is not a folder written by python -m "
            "tusk_jax.export."
        )
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as JSON ({_one_line(error)}).") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not the metadata of an exported detector (format {FORMAT!r}).")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {metadata['format_version']} is newer than this loader's "
            f"({FORMAT_VERSION}); tusk_jax {metadata.get('tusk_jax_version')} wrote it."
        )
    if metadata.get("format_version", 0) < FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {metadata.get('format_version')} (tusk_jax "
            f"{metadata.get('tusk_jax_version')}) runs every image at one fixed size, so its "
            "keypoints differ from the in-process detector's at other sizes; this loader reads "
            f"format {FORMAT_VERSION} (any image size): export it again with python -m "
            f"tusk_jax.export --workdir={metadata.get('workdir') or 'RUN'} --output={directory}."
        )
    missing = [field for field in METADATA_FIELDS if field not in metadata]
    if missing:
        raise ValueError(f"{path}: fields missing: {', '.join(missing)}.")
    return metadata


def _backend_platforms() -> set[str]:
    """The `jax.export` platform names the default backend can run."""
    backend = jax.default_backend()
    return {"cuda", "rocm"} if backend == "gpu" else {backend}


def _check_program(exported: Any, metadata: dict[str, Any], artifact: str, meta: str) -> None:
    """Raises ValueError where the deserialized program and its JSON disagree."""
    made = f"written by jax {metadata['jax_version']}, read by jax {jax.__version__}"
    low = jax_export.minimum_supported_calling_convention_version
    high = jax_export.maximum_supported_calling_convention_version
    version = exported.calling_convention_version
    if not low <= version <= high:
        raise ValueError(
            f"{artifact}: calling convention version {version} is not supported by this jax "
            f"(versions {low}..{high}; {made}); run it with jax {metadata['jax_version']} or "
            "export it again with this jax."
        )
    if not set(exported.platforms) & _backend_platforms():
        raise ValueError(
            f"{artifact}: lowered for {', '.join(exported.platforms)} only, not for this "
            f"machine's {jax.default_backend()}; export it again with --platforms."
        )
    problems = []
    if len(exported.in_avals) != 1:
        problems.append(f"the program takes {len(exported.in_avals)} arguments, not one batch")
    else:
        image = exported.in_avals[0]
        any_size = image.ndim == 4 and all(map(jax_export.is_symbolic_dim, image.shape[:3]))
        if not any_size or image.shape[3] != 3 or image.dtype != np.float32:
            problems.append(
                f"format {FORMAT_VERSION} takes images float32[b,h,w,3] of any size, the "
                f"artifact {image.str_short()}"
            )
    names = jax.tree_util.tree_unflatten(exported.out_tree, range(len(exported.out_avals)))
    if not isinstance(names, dict) or set(names) != set(metadata["outputs"]):
        listed = sorted(names) if isinstance(names, dict) else names
        problems.append(f"outputs {sorted(metadata['outputs'])} in the JSON vs {listed}")
    else:
        keypoints = exported.out_avals[names["keypoints"]].shape
        descriptors = exported.out_avals[names["descriptors"]].shape
        if keypoints[1] != metadata["num_keypoints"]:
            problems.append(
                f"num_keypoints {metadata['num_keypoints']} in the JSON vs {keypoints[1]} in "
                "the artifact"
            )
        if descriptors[2] != metadata["feature_dim"]:
            problems.append(
                f"feature_dim {metadata['feature_dim']} in the JSON vs {descriptors[2]} in "
                "the artifact"
            )
    if problems:
        raise ValueError(f"{meta} does not match {artifact}: {'; '.join(problems)}.")


def load(directory: str, batch_size: int = 16) -> ExportedDetector:
    """The exported detector in `directory` (see the module docstring).

    Args:
      directory: a folder written by `python -m tusk_jax.export`.
      batch_size: images per call of the program (batches are padded to a
        power of two up to it: one compilation per distinct batch size).

    Raises:
      FileNotFoundError: `detector.json` or the artifact is missing.
      ValueError: a corrupt or truncated artifact, one this jax cannot read or
        run, or a `detector.json` that does not describe it; the message is one
        line naming the file.
    """
    metadata = read_metadata(directory)
    meta = os.path.join(directory, METADATA_FILE)
    artifact = os.path.join(directory, metadata["artifact"])
    if not os.path.isfile(artifact):
        raise FileNotFoundError(f"{artifact}: not found (named by {meta}).")
    with open(artifact, "rb") as f:
        blob = f.read()
    same_hash = hashlib.sha256(blob).hexdigest() == metadata["artifact_sha256"]
    try:
        program = jax_export.deserialize(bytearray(blob))
    except Exception as error:  # noqa: BLE001 - flatbuffers fails with any type on bad bytes.
        damaged = "" if same_hash else f", and its sha256 differs from {meta}'s: damaged or cut"
        raise ValueError(
            f"{artifact}: cannot be read as a jax.export artifact (written by jax "
            f"{metadata['jax_version']}, read by jax {jax.__version__}{damaged}): "
            f"{_one_line(error)}"
        ) from error
    if not same_hash:
        raise ValueError(
            f"{meta} does not describe {artifact}: the artifact's sha256 differs from the "
            "JSON's (the JSON of another export, or the artifact was replaced); export again."
        )
    _check_program(program, metadata, artifact, meta)
    return ExportedDetector(program, metadata, directory, batch_size)


class ExportedDetector:
    """An exported TUSK detector: `detect` (and `reconstruct`) as `inference.Detector`'s.

    Attributes:
      directory: the export folder.
      metadata: its `detector.json`.
      image_size: (H, W), the training size (for information: the program
        takes any size).
      num_keypoints: K, fixed at export.
      num_prototypes: M.
      window: the NMS / soft-argmax window in pixels of the network input.
      config: the run's config (a plain dict).
      step: the checkpoint step it was exported from.
      workdir: the run's workdir when it was exported.
      batch_size: images per call of the program.
    """

    def __init__(
        self, program: Any, metadata: dict[str, Any], directory: str, batch_size: int = 16
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.directory = directory
        self.metadata = metadata
        self.image_size = tuple(int(s) for s in metadata["image_size"])
        self.num_keypoints = int(metadata["num_keypoints"])
        self.num_prototypes = int(metadata["num_prototypes"])
        self.window = int(metadata["window"])
        self.config = metadata["config"]
        self.step = metadata["step"]
        self.workdir = metadata["workdir"]
        self.batch_size = int(batch_size)
        # One compilation per distinct (batch, height, width), as in process.
        self._call = jax.jit(program.call)

    def resolve_num_keypoints(self, num_keypoints: int | None) -> int:
        """The exported K; raises ValueError for any other `num_keypoints` than None or K."""
        if num_keypoints is not None and num_keypoints != self.num_keypoints:
            raise ValueError(
                f"num_keypoints={num_keypoints!r}, but the detector in {self.directory!r} was "
                f"exported with num_keypoints={self.num_keypoints} (K is fixed in an exported "
                f"program); export again with --num_keypoints={num_keypoints}."
            )
        return self.num_keypoints

    def _run(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The program on each image at its own size; one numpy dict per image."""
        return run_by_size(images, self._call, self.batch_size, self.num_keypoints)

    def detect(
        self,
        images: ArrayLike | Sequence[ArrayLike],
        num_keypoints: int | None = None,
        min_confidence: float = 0.0,
        scale: float = 1.0,
    ) -> list[Detections]:
        """Keypoints, confidences, prototype ids and descriptors of each image.

        As `inference.Detector.detect` (the same `detection_io.detect_images`).

        Args:
          images: one image, a list of images (any sizes) or a batch
            `[B, H, W, C]` (see `detection_io.as_image_list`); each image needs
            at least K pixels (after `scale`).
          num_keypoints: None or the exported K.
          min_confidence: keypoints with a lower confidence are left out.
          scale: images are resized by this factor (bilinear) before the
            network; keypoints are mapped back to the given image's pixels.

        Returns:
          One `Detections` per image, in order, keypoints in the given image's
          (x, y) pixels.
        """
        self.resolve_num_keypoints(num_keypoints)
        return detect_images(images, self._run, min_confidence, scale)

    def reconstruct(
        self, images: ArrayLike | Sequence[ArrayLike], num_keypoints: int | None = None
    ) -> list[np.ndarray]:
        """The decoder's rebuild of each image from its keypoints, at the image's size.

        As `inference.Detector.reconstruct` (without `return_layers`).

        Args:
          images: as for `detect`.
          num_keypoints: None or the exported K.

        Returns:
          One float32 `[h, w, 3]` in [0, 1] per image of size h x w.

        Raises:
          ValueError: the detector was exported without `--reconstruction`.
        """
        self.resolve_num_keypoints(num_keypoints)
        if RECONSTRUCTION_OUTPUT not in self.metadata["outputs"]:
            raise ValueError(
                f"The detector in {self.directory!r} was exported without the reconstruction; "
                "export again with --reconstruction."
            )
        outputs = self._run(as_image_list(images))
        return [np.asarray(out[RECONSTRUCTION_OUTPUT], np.float32) for out in outputs]
