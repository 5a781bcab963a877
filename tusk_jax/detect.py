"""Keypoints of image files from a trained run: one JSON and one annotated PNG per image.

    python -m tusk_jax.detect --workdir=runs/tetrominoes --input 'photos/*.png' --output out/
    python -m tusk_jax.detect --workdir=RUN --input photos/ --output out/ --num_keypoints=20
    python -m tusk_jax.detect --exported=exported/tetrominoes --input 'photos/*.png' --output out/

The model is `tusk_jax.inference.Detector` (a training workdir) or
`tusk_jax.exported.ExportedDetector` (a folder of `tusk_jax.export`). For
each readable input `<name>.<ext>` this writes `<output>/<name>.json`:

    {"file": ..., "width": W, "height": H, "network_width": w, "network_height": h,
     "pixel_values": "8-bit", "workdir": ..., "step": ...,
     "num_keypoints": K, "min_confidence": ..., "scale": ...,
     "keypoints": [{"x", "y", "confidence", "prototype", "descriptor": [C floats]}, ...]}

with (x, y) in pixels of the file's image, pixel centres at integers (SPEC
section 1), and `<output>/<name>.png`, the image the network saw (w x h)
with a disc per keypoint coloured by prototype. Two inputs with the same
name (also differing only in case) get `<name>_2`, ...; `<output>/summary.json`
lists what was written and what was skipped, and is written even when the
batch is interrupted; an input named `summary.*` gets `summary_2.*`. Its
`source` names the model (`workdir`, `exported`, `step`): a folder that
holds another model's detections is refused unless `--overwrite`.

Pixel values are scaled by the file's bit depth: 8-bit as they are, 16-bit
PNG/TIFF by 65535 (other integer depths by theirs), float TIFF in [0, 1] by
255, other floats stretched from their range ("pixel_values" says which).
Size: the network sees the file times `--scale`, downscaled further to at
most `--max_pixels` (2048 x 2048) while the pixels are
still integers (JPEG decoded at reduced scale), so a large photo never
becomes a large float array; files above 150 M pixels are
refused before decoding. A file that cannot be read (not an image,
truncated, too large), is too small (fewer pixels than K), cannot be
detected (e.g. out of memory) or written is reported in `failed` and
skipped; it never stops the batch, but the command then ends with exit
status 2 and a line counting the failures (`--keep_going`: 0); 1 when no
image could be processed. A K above the peaks NMS can find in an image
(`ops.max_peaks`, e.g. 36 in 16 x 16 with window 5) is warned about once
per run: the keypoints past the peaks are suppressed pixels, not peaks.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from tusk_jax import cli, detection_io, exported, image_files, inference, ops, visualization

# Output stems kept for the command's own files: an input `summary.png` writes
# `summary_2.json` / `summary_2.png`, never over `summary.json`.
RESERVED_STEMS = ("summary",)
# Exit status when some inputs failed and others were written (0 with --keep_going);
# 1: no input could be processed, or the run could not be loaded.
EXIT_SOME_FAILED = 2
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
                if name.lower().endswith(image_files.IMAGE_EXTENSIONS)
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


def output_stems(paths: Sequence[str]) -> list[str]:
    """Output base names: the input's name without extension, made unique with `_2`, `_3`.

    Unique also when case is ignored (case-insensitive filesystems) and never
    one of RESERVED_STEMS (the summary's name).
    """
    used = {stem.casefold() for stem in RESERVED_STEMS}
    stems = []
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0]
        stem, count = base, 1
        while stem.casefold() in used:
            count += 1
            stem = f"{base}_{count}"
        used.add(stem.casefold())
        stems.append(stem)
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


def _record(path: str, read, found, settings: dict) -> dict:
    """The JSON record of one file's detections, keypoints in the file's pixels."""
    return {
        "file": os.path.abspath(path),
        "width": read.width,
        "height": read.height,
        "network_width": int(read.image.shape[1]),
        "network_height": int(read.image.shape[0]),
        "pixel_values": read.pixel_values,
        **settings,
        "keypoints": dataclasses.replace(
            found, keypoints=read.to_file_pixels(found.keypoints)
        ).to_json(),
    }


def _read_chunk(paths, stems, output_dir, inputs, k, reading, fail) -> list[tuple]:
    """`(path, read image, json path, png path)` of each readable file; `fail`s the others."""
    chunk = []
    for path, stem in zip(paths, stems, strict=True):
        json_path = os.path.join(output_dir, f"{stem}.json")
        png_path = os.path.join(output_dir, f"{stem}.png")
        if {os.path.abspath(json_path), os.path.abspath(png_path)} & inputs:
            fail(path, f"its output {png_path} would overwrite an input file")
            continue
        try:
            read = image_files.read_image(path, *reading)
            h, w = read.image.shape[:2]
        except Exception as error:  # noqa: BLE001 - PIL raises many types (even SyntaxError).
            fail(path, f"unreadable: {type(error).__name__}: {error}")
            continue
        if h * w < k:
            fail(
                path,
                f"too small: the network sees {w}x{h}, fewer pixels than K={k} keypoints; "
                f"use --num_keypoints={h * w} or less, or a larger --scale",
            )
            continue
        chunk.append((path, read, json_path, png_path))
    return chunk


def _warn_beyond_peaks(chunk, k: int, window: int, warned: list) -> None:
    """Logs once per run (`warned`) when K exceeds the NMS peaks an image can hold.

    The keypoints past `ops.max_peaks` are suppressed pixels, not score-map
    peaks (`ops.top_k_peaks`); they are still written, best first after the peaks.
    """
    if warned:
        return
    for path, read, _, _ in chunk:
        h, w = read.image.shape[:2]
        peaks = ops.max_peaks(h, w, window)
        if k > peaks:
            warned.append(path)
            logging.warning(
                "--num_keypoints=%d exceeds the %d peak(s) that NMS (window %d) can find in a "
                "%dx%d image (%s first): keypoints past them are not peaks; use "
                "--num_keypoints=%d or less, or a larger --scale (warned once).",
                k,
                peaks,
                window,
                w,
                h,
                path,
                peaks,
            )
            return


def _check_reading(scale: float, max_pixels: int | None) -> None:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}.")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels!r}.")


def _window(detector) -> int:
    """The NMS window of a workdir's `Detector` or an `ExportedDetector`."""
    if isinstance(detector, exported.ExportedDetector):
        return detector.window
    return int(detector.config.model.window)


def _detect_chunk(detector, chunk, k, min_confidence, fail) -> list:
    """The detections of each read file (None where detection failed), together if possible."""
    if not chunk:
        return []
    try:
        return detector.detect([c[1].image for c in chunk], k, min_confidence=min_confidence)
    except Exception:  # noqa: BLE001 - e.g. out of memory: find the image at fault.
        results = []
        for path, read, _, _ in chunk:
            try:
                results.append(detector.detect(read.image, k, min_confidence=min_confidence)[0])
            except Exception as error:  # noqa: BLE001 - the others still get their files.
                fail(path, f"detection failed: {type(error).__name__}: {error}")
                results.append(None)
        return results


SUMMARY_FILE = "summary.json"


def source_of(detector: inference.Detector | exported.ExportedDetector) -> dict:
    """What made the detections: `{"workdir", "exported", "step"}` (absolute paths or None)."""
    folder = detector.directory if isinstance(detector, exported.ExportedDetector) else None
    return {
        "workdir": detector.workdir and os.path.abspath(detector.workdir),
        "exported": folder and os.path.abspath(folder),
        "step": detector.step,
    }


def _describe(source: dict | None) -> str:
    if not isinstance(source, dict):
        return "a model its summary.json does not name (an older tusk_jax.detect)"
    run = f"step {source.get('step')} of {source.get('workdir') or 'an unsaved run'}"
    if source.get("exported"):
        return f"the export {source['exported']} ({run})"
    return run


def check_output_dir(output_dir: str, source: dict, overwrite: bool = False) -> None:
    """Raises ValueError if `output_dir` holds the detections of another model than `source`.

    The model of earlier detections is the `source` of `<output_dir>/summary.json`;
    a folder without one, or `overwrite`, passes.
    """
    path = os.path.join(output_dir, SUMMARY_FILE)
    if overwrite or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            earlier = json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != source:
        raise ValueError(
            f"{output_dir} holds the detections of {_describe(earlier)}, not of "
            f"{_describe(source)}; pass --overwrite to replace them, or choose another --output."
        )


def _settings(detector, num_keypoints, min_confidence, scale, max_pixels) -> dict:
    """The checked detection settings each JSON records (ValueError on a bad one)."""
    k = detector.resolve_num_keypoints(num_keypoints)
    _check_reading(scale, max_pixels)
    return {
        "workdir": detector.workdir and os.path.abspath(detector.workdir),
        "step": detector.step,
        "num_keypoints": k,
        "min_confidence": float(min_confidence),
        "scale": float(scale),
    }


def detect_files(
    detector: inference.Detector | exported.ExportedDetector,
    paths: Sequence[str],
    output_dir: str,
    *,
    overwrite: bool = False,
    num_keypoints: int | None = None,
    min_confidence: float = 0.0,
    scale: float = 1.0,
    max_pixels: int | None = image_files.MAX_NETWORK_PIXELS,
    max_file_pixels: int = image_files.MAX_FILE_PIXELS,
    chunk_size: int = 32,
) -> dict:
    """Detects keypoints in image files and writes `<stem>.json` and `<stem>.png` for each.

    A file that cannot be read, detected or written is recorded in `failed`
    and never stops the others; the summary is written even if interrupted.

    Args:
      detector: the model (`inference.load` or `exported.load`).
      paths: image files.
      output_dir: created if missing.
      num_keypoints, min_confidence: see `inference.Detector.detect`.
      scale, max_pixels, max_file_pixels: see `image_files.read_image`.
      chunk_size: files read and detected together.
      overwrite: replace the detections of another model in `output_dir`
        (else ValueError, see `check_output_dir`).

    Returns:
      `{"source": source_of(detector), "written": [{file, json, png, num_keypoints}],
      "failed": {path: reason}}`, also written to `<output_dir>/summary.json`.
    """
    source = source_of(detector)
    check_output_dir(output_dir, source, overwrite)
    os.makedirs(output_dir, exist_ok=True)
    inputs = {os.path.abspath(p) for p in paths}
    written, failed, warned = [], {}, []
    stems = output_stems(paths)
    settings = _settings(detector, num_keypoints, min_confidence, scale, max_pixels)
    k = settings["num_keypoints"]

    def fail(path: str, reason: str) -> None:
        failed[path] = reason
        logging.error("Skipping %s: %s", path, reason)

    try:
        for start in range(0, len(paths), chunk_size):
            chunk = _read_chunk(
                paths[start : start + chunk_size],
                stems[start : start + chunk_size],
                output_dir,
                inputs,
                k,
                (scale, max_pixels, max_file_pixels),
                fail,
            )
            _warn_beyond_peaks(chunk, k, _window(detector), warned)
            results = _detect_chunk(detector, chunk, k, min_confidence, fail)
            for (path, read, json_path, png_path), found in zip(chunk, results, strict=True):
                if found is None:
                    continue
                try:
                    _write_json(json_path, _record(path, read, found, settings))
                    annotated = annotate(read.image, found, detector.num_prototypes)
                    visualization.save_png(png_path, annotated)
                except OSError as error:
                    fail(path, f"cannot write its output: {type(error).__name__}: {error}")
                    continue
                written.append(
                    {"file": path, "json": json_path, "png": png_path, "num_keypoints": len(found)}
                )
    finally:
        summary = {"source": source, "written": written, "failed": failed}
        _write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
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
    flags.DEFINE_integer(
        "max_pixels",
        image_files.MAX_NETWORK_PIXELS,
        "At most this many pixels per image reach the network; larger ones (after --scale) "
        "are downscaled, keypoints still in the file's pixels.",
        **fv,
    )
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", **fv)
    flags.DEFINE_integer("batch_size", 16, "Images per network call.", **fv)
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace the detections of another model (workdir, export or step) in --output.",
        **fv,
    )
    flags.DEFINE_bool(
        "keep_going",
        False,
        f"Exit 0 when some inputs failed but others were written (default: exit "
        f"{EXIT_SOME_FAILED}, so that scripts notice).",
        **fv,
    )


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
    if flag_values.exported and flag_values.step is not None:
        raise app.UsageError(
            "--step applies to --workdir only: an exported detector is one checkpoint step."
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
            max_pixels=flag_values.max_pixels,
            overwrite=flag_values.overwrite,
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
    if summary["failed"] and not flag_values.keep_going:
        print(
            f"error: {len(summary['failed'])} of {len(paths)} input(s) failed (listed above and "
            f"in {os.path.join(flag_values.output, 'summary.json')}); exit status "
            f"{EXIT_SOME_FAILED} (--keep_going: 0).",
            file=sys.stderr,
        )
        sys.exit(EXIT_SOME_FAILED)
    return summary


def main(argv):
    cli.start(argv)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
