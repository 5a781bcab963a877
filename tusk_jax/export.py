"""A trained detector written as a self-contained `jax.export` artifact (StableHLO).

    python -m tusk_jax.export --workdir=runs/tetrominoes --output=exported/tetrominoes
    python -m tusk_jax.export --workdir=RUN --step=N --num_keypoints=6 --reconstruction --output=DIR

This module owns making the artifact; the folder's format and its loader
(jax and numpy only) are `tusk_jax.exported`. The program is the in-process
detector's own body, `inference.Detector.network` (padding to multiples of
2**(depth - 1), the U-Net, cropping, NMS, top-K, soft-argmax, sampling), with
a symbolic batch, height and width (`jax.export` shape polymorphism,
`symbolic_shape("b, h, w, 3")` constrained to h * w >= K): one artifact
serves every image size and batch size, and gives the in-process detector's
keypoints at each. The weights are closed over: they become constants of the
program, so the artifact is the only file a user needs (no params file whose
tree structure the loader would have to rebuild without flax). It is lowered
for CPU, CUDA and TPU by default, so an artifact made on a CPU runs on an
accelerator. K is fixed at export.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax import export as jax_export

import tusk_jax
from tusk_jax import cli, exported, inference

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def _write_atomically(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def export_detector(
    detector: inference.Detector,
    output: str,
    num_keypoints: int | None = None,
    reconstruction: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> dict[str, Any]:
    """Writes `detector` for any image size to `<output>/detector.jax_export` and `.json`.

    Args:
      detector: the trained detector (`inference.load`).
      output: the export folder (created; an earlier export there is replaced).
      num_keypoints: K of the program (None: the trained K); it serves images
        of at least K pixels.
      reconstruction: also return the decoder's `reconstruction`.
      platforms: `jax.export` platforms to lower for ("cpu", "cuda", "rocm",
        "tpu").

    Returns:
      The metadata written to `detector.json` (see `tusk_jax.exported`).

    Raises:
      ValueError: a bad `num_keypoints` or platform.
    """
    k = detector.resolve_num_keypoints(num_keypoints)
    height = width = int(detector.config.dataset.image_size)
    platforms = tuple(platforms)
    unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
    if not platforms or unknown:
        raise ValueError(f"platforms must be among cpu, cuda, rocm, tpu; got {list(platforms)}.")
    network = detector.network(k, decode=reconstruction)
    names = exported.DETECTION_OUTPUTS + (
        (exported.RECONSTRUCTION_OUTPUT,) if reconstruction else ()
    )

    def detect(images):
        out = network(images)
        return {name: out[name] for name in names}

    # Any b, h, w; top-K needs h * w >= K (checked again when the program is called).
    shape = jax_export.symbolic_shape("b, h, w, 3", constraints=(f"h*w >= {k}",))
    images = jax.ShapeDtypeStruct(shape, np.float32)
    program = jax_export.export(jax.jit(detect), platforms=platforms)(images)
    blob = bytes(program.serialize())
    metadata = {
        "format": exported.FORMAT,
        "format_version": exported.FORMAT_VERSION,
        "artifact": exported.ARTIFACT_FILE,
        "artifact_sha256": hashlib.sha256(blob).hexdigest(),
        "image_size": [height, width],
        "num_keypoints": k,
        "window": int(detector.config.model.window),
        "num_prototypes": detector.num_prototypes,
        "feature_dim": int(detector.prototypes.shape[1]),
        "outputs": list(names),
        "input": f"images [b, h, w, 3] float32 in [0, 1], any b, h, w with h * w >= {k}",
        "platforms": list(platforms),
        "step": detector.step,
        "workdir": detector.workdir and os.path.abspath(detector.workdir),
        "tusk_jax_version": tusk_jax.__version__,
        "jax_version": jax.__version__,
        "config": json.loads(detector.config.to_json_best_effort()),
    }
    os.makedirs(output, exist_ok=True)
    _write_atomically(os.path.join(output, exported.ARTIFACT_FILE), blob)
    text = json.dumps(metadata, indent=1) + "\n"
    _write_atomically(os.path.join(output, exported.METADATA_FILE), text.encode())
    return metadata


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command-line flags (called by `__main__` only)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "The training workdir (config.json, checkpoints/).", **fv)
    flags.DEFINE_string("output", None, "The export folder (created).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", **fv)
    flags.DEFINE_integer(
        "num_keypoints", None, "K of the exported program; default: the trained K.", **fv
    )
    flags.DEFINE_bool("reconstruction", False, "Also export the decoder's reconstruction.", **fv)
    flags.DEFINE_list(
        "platforms", list(DEFAULT_PLATFORMS), "jax.export platforms to lower for.", **fv
    )


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Exports as the parsed flags say and prints where; exits with a message on failure."""
    for name in ("workdir", "output"):
        if not flag_values[name].value:
            raise app.UsageError(f"--{name} is required.")
    try:
        detector = inference.load(flag_values.workdir, flag_values.step)
        metadata = export_detector(
            detector,
            flag_values.output,
            num_keypoints=flag_values.num_keypoints,
            reconstruction=flag_values.reconstruction,
            platforms=flag_values.platforms,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    size = os.path.getsize(os.path.join(flag_values.output, exported.ARTIFACT_FILE))
    print(
        f"Exported step {metadata['step']} of {flag_values.workdir} "
        f"(K={metadata['num_keypoints']}, images of any size, outputs "
        f"{', '.join(metadata['outputs'])}; {size / 2**20:.1f} MiB) to {flag_values.output}."
    )
    return metadata


def main(argv):
    cli.start(argv)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
