"""The authors' pretrained models (the PyTorch release's files) as tusk_jax workdirs.

    python -m tusk_jax.convert_release --checkpoint=PATH/tet_models \
        --config=configs/tetrominoes.py --workdir=runs/tetrominoes_release
    python -m tusk_jax.convert_release --checkpoint=PATH/celeba_models \
        --config=configs/celeba.py --workdir=runs/celeba_release \
        --linear_projection=PATH/MAFL/celeba/LinearProjection_model

The written workdir is an ordinary one: `config.json` (the given config with
the model fields the release fixes, `RELEASE_MODEL_FIELDS`), an orbax
checkpoint of step 0 with its checksum (fresh optimizer states: the release
does not save them), `release_conversion.json` (where it came from) and, with
`--linear_projection`, `release_regressor.npz`, which `tusk_jax.evaluate` uses
for the landmark error (`--regressor`). `evaluate`, `learning_curve`,
`detect`, `export`, `inference.load` read it; `main` on it fine-tunes from the
authors' weights. Reading and checking the files is `tusk_jax.release_files`'
job; everything is checked before anything is written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tusk_jax import checkpointing, cli, config_lib, release_files, run_identity, torch_files
from tusk_jax import state as state_lib
from tusk_jax.release_files import (  # noqa: F401 - part of this module's API
    REGRESSOR_FILE,
    ReleaseCheckpointError,
    read_release_regressor,
    read_release_state,
)

CONVERSION_FILE = "release_conversion.json"
RELEASE_DEPTH = 4  # The release's U-Net has four resolutions.
# Model fields the release's network fixes whatever the dataset (the value, or
# "base_width" for "the same as model.base_width"), and why.
RELEASE_MODEL_FIELDS = {
    "depth": (RELEASE_DEPTH, "the release's U-Net has four resolutions"),
    "num_groups": ("base_width", "GroupNorm has group_norm_channel = min_channel groups"),
    "head_groups": (0, "the heatmap head's GroupNorm has one channel per group"),
    "upsample_align_corners": (True, "nn.Upsample(align_corners=True)"),
    "soft_argmax_border": ("zeros", "the soft-argmax zero-pads the score map"),
    "temperature": (0.2, "exp(S / 0.2) in SamplePointsDiff"),
    "descriptor_sampling": ("nearest", "sample_features reads the truncated pixel"),
}
# The soft-argmax's fixed kernels, saved as buffers of the state dict.


def release_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list]:
    """`config` with the model fields the release fixes (`RELEASE_MODEL_FIELDS`).

    Returns:
      `(config, changes)`: an unlocked copy, and `(field, old, new, why)` for
      each field that had another value.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    changes = []
    for field, (value, why) in RELEASE_MODEL_FIELDS.items():
        if value == "base_width":
            value = config.model.base_width
        if config.model[field] != value:
            changes.append((f"model.{field}", config.model[field], value, why))
            config.model[field] = value
    return config, changes


# ----------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_new_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise ReleaseCheckpointError(
            f"--workdir {workdir} already exists and is not empty: give a new folder (the "
            "converter never writes into another run)."
        )


def convert(
    checkpoint: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    linear_projection: str | None = None,
) -> dict[str, Any]:
    """Writes a tusk_jax workdir holding a release model (see the module docstring).

    Args:
      checkpoint: the release's `<name>_models` file.
      config: the dataset's config (e.g. `configs/tetrominoes.py`'s); the
        release's fixed model fields are set in it, the rest must fit the file.
      workdir: a new (or empty) folder.
      linear_projection: optional `LinearProjection_model` of a landmark dataset.

    Returns:
      dict with `workdir`, `step`, `config_changes` (`release_config`'s) and
      `num_parameters`.

    Raises:
      ReleaseCheckpointError, torch_files.TorchFileError, FileNotFoundError:
        before anything is written.
    """
    config, changes = release_config(config)
    config_lib.validate_config(config, training=False)
    _check_new_workdir(workdir)
    state_dict, prototypes, step = read_release_state(checkpoint)
    params = release_files.convert_state_dict(state_dict, prototypes, config)
    regressor = None
    if linear_projection is not None:
        regressor = read_release_regressor(linear_projection, config)
    created = not os.path.exists(workdir)
    try:
        _write(workdir, config, params, prototypes, step, regressor)
        _write_provenance(workdir, checkpoint, linear_projection, changes, step)
    except BaseException:
        # Nothing half-written stays: the folder was new or empty.
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for name in os.listdir(workdir):
                target = os.path.join(workdir, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        raise
    return {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "config_changes": changes,
        "num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
    }


def _write(workdir, config, params, prototypes, step, regressor) -> None:
    os.makedirs(workdir, exist_ok=True)
    checkpointing.check_writable(workdir)
    state = checkpointing.state_template(config)
    tx, prototype_tx = state_lib.make_optimizers(config)
    params = jax.tree.map(np.asarray, params)
    state = state.replace(
        step=np.asarray(step, np.int32),
        params=params,
        prototypes=prototypes,
        opt_state=jax.device_get(tx.init(params)),
        prototype_opt_state=jax.device_get(prototype_tx.init(prototypes)),
        rng=np.asarray(jax.random.split(jax.random.PRNGKey(config.seed), 3)[2]),
    )
    # config.json with a new run identity first; the step carries the identity.
    identity = run_identity.write_run_identity(workdir, config)
    manager = checkpointing.create_manager(workdir, config.train.max_to_keep, use_async=False)
    try:
        data_state = {"step": step, "seed": int(config.seed)}
        checkpointing.save(manager, step, state, data_state, identity=identity)
        checkpointing.wait(manager)
    finally:
        manager.close()
    if regressor is not None:
        path = os.path.join(workdir, release_files.REGRESSOR_FILE)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, weight=regressor)
        os.replace(path + ".tmp", path)


def _write_provenance(workdir, checkpoint, linear_projection, changes, step) -> None:
    record = {
        "source": os.path.abspath(checkpoint),
        "source_sha256": _sha256(checkpoint),
        "linear_projection": linear_projection and os.path.abspath(linear_projection),
        "linear_projection_sha256": linear_projection and _sha256(linear_projection),
        "step": step,
        "config_changes": [
            {"field": f, "given": a, "written": b, "why": why} for f, a, b, why in changes
        ],
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    path = os.path.join(workdir, CONVERSION_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


# Command line.
# ----------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command-line flags (defined by `__main__` only)."""
    fv = {"flag_values": flag_values}
    config_flags.DEFINE_config_file(
        "config",
        None,
        "The dataset's config (configs/<dataset>.py, no variant); overrides as for main.",
        lock_config=False,
        **fv,
    )
    flags.DEFINE_string(
        "checkpoint", None, "The release's model file, e.g. saved_models/tet_models.", **fv
    )
    flags.DEFINE_string("workdir", None, "The tusk_jax workdir to create (new or empty).", **fv)
    flags.DEFINE_string(
        "linear_projection",
        None,
        "Optional: the release's LinearProjection_model (MAFL or Human3.6M regressor).",
        **fv,
    )


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Converts as the flags say; one line and exit code 1 on a refused input."""
    for name in ("checkpoint", "config", "workdir"):
        if not flag_values[name].value:
            raise app.UsageError(f"--{name} is required.")
    try:
        result = convert(
            flag_values.checkpoint,
            flag_values.config,
            flag_values.workdir,
            flag_values.linear_projection,
        )
    except (ReleaseCheckpointError, torch_files.TorchFileError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    except config_lib.ConfigError as error:
        sys.exit(f"error: {error}")
    for field, given, written, why in result["config_changes"]:
        print(f"config {field}: {given!r} -> {written!r} ({why})")
    workdir = result["workdir"]
    print(
        f"wrote {workdir}: the release's model as step {result['step']} "
        f"({result['num_parameters']:,} parameters)."
    )
    print(f"next: python -m tusk_jax.evaluate --workdir={workdir}")
    return result


def main(argv):
    cli.start(argv)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
