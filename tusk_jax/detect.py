"""Keypoints of image files from a trained run: one JSON and one annotated PNG per image.

    python -m tusk_jax.detect --workdir=runs/tetrominoes --input 'photos/*.png' --output out/
    python -m tusk_jax.detect --workdir=RUN --input photos/ --output out/ --num_keypoints=20
    python -m tusk_jax.detect --exported=exported/tetrominoes --input 'photos/*.png' --output out/

This module owns reading image files and writing detection files; the model
is `tusk_jax.inference.Detector` (a training workdir) or
`tusk_jax.exported.ExportedDetector` (a folder of `tusk_jax.export`, whose
`workdir` and `step` are those of the run it was exported from). For each
readable input `<name>.<ext>` it writes `<output>/<name>.json`:

    {"file": ..., "width": W, "height": H, "workdir": ..., "step": ...,
     "num_keypoints": K, "min_confidence": ..., "scale": ...,
     "keypoints": [{"x", "y", "confidence", "prototype", "descriptor": [C floats]}, ...]}

with (x, y) in pixels of the file's image, pixel centres at integers (SPEC
section 1), and `<output>/<name>.png`, the image with a disc per keypoint
coloured by prototype. Two inputs with the same name get `<name>_2`, ...;
`<output>/summary.json` lists what was written and what was skipped.
Unreadable files (not an image, truncated, too small for K keypoints) are
reported and skipped; they never stop the batch.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageOps

from tusk_jax import detection_io, exported, inference, visualization

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# The annotated PNG is upscaled (nearest) until its longer side reaches about this size.
ANNOTATION_TARGET_SIDE = 256
ANNOTATION_MAX_SCALE = 8


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by glob patterns, files or directories (their image files), sorted, unique.

    Patterns may use `**` (recursive). A pattern that matches nothing is
    logged and skipped.
    """
    found: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = [
                os.path.join(pattern, name)
                for name in sorted(os.listdir(pattern))
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(pattern, name))
            ]
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            logging.warning("--input %r matches no file.", pattern)
        found.extend(matches)
    seen, unique = set(), []
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 `[H, W, 3]` (EXIF orientation applied, grey/alpha/palette to RGB).

    Raises:
      OSError (also PIL's UnidentifiedImageError), ValueError, SyntaxError
      (some broken PNGs), DecompressionBombError: not a readable image.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def output_stems(paths: Sequence[str]) -> list[str]:
    """Output base names: the input's name without extension, made unique with `_2`, `_3`."""
    used: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        count = used.get(stem, 0) + 1
        used[stem] = count
        stems.append(stem if count == 1 else f"{stem}_{count}")
    return stems


def annotate(
    image: np.ndarray, detections: detection_io.Detections, num_prototypes: int
) -> np.ndarray:
    """The image upscaled to about `ANNOTATION_TARGET_SIDE` with keypoint discs, uint8."""
    height, width = image.shape[:2]
    scale = int(np.clip(ANNOTATION_TARGET_SIDE // max(height, width), 1, ANNOTATION_MAX_SCALE))
    radius = max(0.9 * scale, 0.01 * max(height, width) * scale)
    return visualization.draw_keypoints(
        image,
        detections.keypoints,
        detections.prototype,
        num_prototypes,
        detections.confidence,
        scale=scale,
        radius=radius,
    )


def _write_json(path: str, record: dict) -> None:
    """Writes `record` as JSON, atomically; a `keypoints` list gets one line per keypoint."""
    record = dict(record)
    keypoints = record.pop("keypoints", None)
    text = json.dumps(record, indent=1)
    if keypoints is not None:
        items = ",\n  ".join(json.dumps(item) for item in keypoints)
        body = f"[\n  {items}\n ]" if keypoints else "[]"
        head = text[:-2] + ",\n" if record else "{\n"  # Drop the closing "\n}".
        text = head + f' "keypoints": {body}\n}}'
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


def detect_files(
    detector: inference.Detector | exported.ExportedDetector,
    paths: Sequence[str],
    output_dir: str,
    *,
    num_keypoints: int | None = None,
    min_confidence: float = 0.0,
    scale: float = 1.0,
    chunk_size: int = 32,
) -> dict:
    """Detects keypoints in image files and writes `<stem>.json` and `<stem>.png` for each.

    Args:
      detector: the model (`inference.load` or `exported.load`).
      paths: image files.
      output_dir: created if missing.
      num_keypoints, min_confidence, scale: see `inference.Detector.detect`.
      chunk_size: files read and detected together.

    Returns:
      dict with `written` (list of dicts `file`, `json`, `png`,
      `num_keypoints`) and `failed` (input path -> reason). Also written to
      `<output_dir>/summary.json`.
    """
    os.makedirs(output_dir, exist_ok=True)
    inputs = {os.path.abspath(p) for p in paths}
    written, failed = [], {}
    stems = output_stems(paths)
    k = detector.resolve_num_keypoints(num_keypoints)
    for start in range(0, len(paths), chunk_size):
        chunk = []
        names = zip(
            paths[start : start + chunk_size], stems[start : start + chunk_size], strict=True
        )
        for path, stem in names:
            json_path = os.path.join(output_dir, f"{stem}.json")
            png_path = os.path.join(output_dir, f"{stem}.png")
            if {os.path.abspath(json_path), os.path.abspath(png_path)} & inputs:
                failed[path] = f"its output {png_path} would overwrite an input file"
            else:
                try:
                    image = read_image(path)
                    if image.shape[0] * image.shape[1] < k:
                        raise ValueError(
                            f"{image.shape[1]}x{image.shape[0]} has fewer pixels than K={k}"
                        )
                    chunk.append((path, image, json_path, png_path))
                except Exception as error:  # noqa: BLE001 - PIL raises many types (even SyntaxError).
                    failed[path] = f"unreadable: {type(error).__name__}: {error}"
            if path in failed:
                logging.error("Skipping %s: %s", path, failed[path])
        if not chunk:
            continue
        try:
            results = detector.detect(
                [c[1] for c in chunk], k, min_confidence=min_confidence, scale=scale
            )
        except ValueError:
            # Isolate the image at fault; the others still get their files.
            results = []
            for path, image, _, _ in chunk:
                try:
                    results.append(
                        detector.detect(image, k, min_confidence=min_confidence, scale=scale)[0]
                    )
                except ValueError as error:
                    failed[path] = str(error)
                    logging.error("Skipping %s: %s", path, error)
                    results.append(None)
        for (path, image, json_path, png_path), found in zip(chunk, results, strict=True):
            if found is None:
                continue
            record = {
                "file": os.path.abspath(path),
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "workdir": detector.workdir and os.path.abspath(detector.workdir),
                "step": detector.step,
                "num_keypoints": k,
                "min_confidence": float(min_confidence),
                "scale": float(scale),
                "keypoints": found.to_json(),
            }
            _write_json(json_path, record)
            visualization.save_png(png_path, annotate(image, found, detector.num_prototypes))
            written.append(
                {"file": path, "json": json_path, "png": png_path, "num_keypoints": len(found)}
            )
    summary = {"written": written, "failed": failed}
    _write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command-line flags (called by `__main__` only, so that importing
    this module next to other command-line modules defines no duplicate flag)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "The training workdir (config.json, checkpoints/).", **fv)
    flags.DEFINE_string(
        "exported", None, "Instead of --workdir: a folder written by tusk_jax.export.", **fv
    )
    flags.DEFINE_multi_string(
        "input", None, "Image files: glob pattern (quote it), file or directory; repeatable.", **fv
    )
    flags.DEFINE_string("output", None, "Output directory for the JSON and PNG files.", **fv)
    flags.DEFINE_integer(
        "num_keypoints", None, "Keypoints per image; default: the trained K.", **fv
    )
    flags.DEFINE_float("min_confidence", 0.0, "Drop keypoints with a lower confidence.", **fv)
    flags.DEFINE_float("scale", 1.0, "Resize the images by this factor before the network.", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", **fv)
    flags.DEFINE_integer("batch_size", 16, "Images per network call.", **fv)


def run(flag_values: flags.FlagValues) -> dict:
    """Detects as the parsed flags say and prints a summary.

    Exits (SystemExit) with a message when no file matches, the run cannot
    be loaded, or no image could be processed.
    """
    for name in ("input", "output"):
        if not flag_values[name].value:
            raise app.UsageError(f"--{name} is required.")
    if bool(flag_values.workdir) == bool(flag_values.exported):
        raise app.UsageError("Give one of --workdir or --exported.")
    if flag_values.exported and (flag_values.step is not None or flag_values.scale != 1):
        raise app.UsageError(
            "--step and --scale apply to --workdir only: an exported detector is one step, "
            "and it resizes every image to its training size."
        )
    paths = expand_inputs(flag_values.input)
    if not paths:
        sys.exit(f"error: no file matches --input {flag_values.input}.")
    try:
        if flag_values.exported:
            detector = exported.load(flag_values.exported, batch_size=flag_values.batch_size)
        else:
            detector = inference.load(
                flag_values.workdir, flag_values.step, batch_size=flag_values.batch_size
            )
        summary = detect_files(
            detector,
            paths,
            flag_values.output,
            num_keypoints=flag_values.num_keypoints,
            min_confidence=flag_values.min_confidence,
            scale=flag_values.scale,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(
        f"{len(summary['written'])} image(s) written to {flag_values.output}, "
        f"{len(summary['failed'])} skipped."
    )
    for path, reason in summary["failed"].items():
        print(f"skipped {path}: {reason}")
    if not summary["written"]:
        sys.exit("error: no image could be processed.")
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
