"""The authors' pretrained models (the PyTorch release's files) as tusk_jax workdirs.

    python -m tusk_jax.convert_release --checkpoint=PATH/tet_models \
        --config=configs/tetrominoes.py --workdir=runs/tetrominoes_release
    python -m tusk_jax.convert_release --checkpoint=PATH/celeba_models \
        --config=configs/celeba.py --workdir=runs/celeba_release \
        --linear_projection=PATH/MAFL/celeba/LinearProjection_model

The release's `train.py` saves `torch.save({'model': state_dict, 'prototype': P})`
as `<name>_models`; `evaluate_celeba_h36m.py` saves the landmark regressor as
`LinearProjection_model` (`{'model': {'mlp.weight': [2T, 2KM]}}`). Both are read
with `tusk_jax.torch_files` (no PyTorch, nothing in the file is executed).

The written workdir is an ordinary one: `config.json` (the given config with
the model fields the release fixes, see `RELEASE_MODEL_FIELDS`), an orbax
checkpoint of step 0 with its checksum (fresh optimizer states: the release
does not save them), `release_conversion.json` (where it came from) and, with
`--linear_projection`, `release_regressor.npz`, which `tusk_jax.evaluate` uses
for the landmark error (`--regressor`). `evaluate`, `learning_curve`,
`detect`, `export`, `inference.load` read it; `main` on it fine-tunes from the
authors' weights.

Everything is checked before anything is written: each tensor the model of
the config needs must be in the file with the shape that config gives, and
nothing else may be (but the soft-argmax's fixed kernels, checked against
`model.window`); a refusal is one line naming the tensor, both shapes and the
config field to change.

Layouts: PyTorch convolutions are `[out, in, kh, kw]` (Flax: `[kh, kw, in,
out]`), GroupNorm `weight`/`bias` are Flax's `scale`/`bias`. The release's
U-Net stages `dconv_down1..4`, `dconv_up3..1` are tusk_jax's `down0..3`,
`up2..0`, each `Sequential(conv, norm, relu, conv, norm, relu)` (indices 0, 1,
3, 4); `conv_last` is `out`; the heatmap head `heatmap_header.{0,1,3,4}` is
`head_conv0`, `head_norm0`, `head_conv1`, `head_norm1`.
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
from absl import app, flags, logging
from ml_collections import config_flags

from tusk_jax import checkpointing, config_lib, datasets, models, torch_files
from tusk_jax import state as state_lib

REGRESSOR_FILE = "release_regressor.npz"
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
_WINDOW_BUFFERS = ("x_kernel", "y_kernel", "s_kernel")
_STAGE_LAYERS = {"0": "conv0", "1": "norm0", "3": "conv1", "4": "norm1"}
_HEAD_LAYERS = {"0": "head_conv0", "1": "head_norm0", "3": "head_conv1", "4": "head_norm1"}


class ReleaseCheckpointError(ValueError):
    """A release file that does not fit the chosen config (or is not a release file)."""


# ----------------------------------------------------------------------------
# Names and layouts.
# ----------------------------------------------------------------------------


def torch_key(path: tuple[str, ...]) -> str:
    """The release's state-dict key (no `module.`) of a Flax parameter path.

    E.g. `("params", "encoder", "unet", "down0", "conv0", "kernel")` ->
    `encoder.encoder_features.dconv_down1.0.weight`.
    """
    if path[1] == "encoder" and path[2] != "unet":
        layer = {v: k for k, v in _HEAD_LAYERS.items()}[path[2]]
        module = f"encoder.heatmap_header.{layer}"
    else:
        prefix = "encoder.encoder_features" if path[1] == "encoder" else "decoder.decoder"
        stage = path[3]
        if stage == "out":
            module = f"{prefix}.conv_last"
        else:
            kind = "dconv_down" if stage.startswith("down") else "dconv_up"
            level = int(stage.lstrip("downup")) + 1
            index = {v: k for k, v in _STAGE_LAYERS.items()}[path[4]]
            module = f"{prefix}.{kind}{level}.{index}"
    return f"{module}.{'bias' if path[-1] == 'bias' else 'weight'}"


def _to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax leaf's shape in the release's layout (conv kernels HWIO -> OIHW)."""
    if path[-1] == "kernel":
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def _from_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        array = array.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    return np.ascontiguousarray(array, dtype=np.float32)


def _field_hint(key: str, config: ml_collections.ConfigDict, found, expected) -> str:
    """The config field that sets the shape of release tensor `key`, with the file's value."""
    m = config.model
    if key == "prototype":
        return (
            f"model.num_prototypes={found[0]} (the config has {m.num_prototypes}) and "
            f"model.feature_dim={found[1]} (the config has {m.feature_dim})"
        )
    if key.startswith("decoder.decoder.conv_last.") and found[0] in (3, 4):
        mode = "plain" if found[0] == 3 else "alpha"
        if mode != m.decoder_mode:
            return f"model.decoder_mode={mode} (the config has {m.decoder_mode!r})"
    if ".dconv_down1." in key and found[0] != expected[0]:
        return f"model.base_width={found[0]} (the config has {m.base_width})"
    if key == "decoder.decoder.dconv_down1.0.weight" and found[1] != expected[1]:
        return f"model.feature_dim={found[1]} (the config has {m.feature_dim})"
    if key.startswith("encoder.encoder_features.conv_last") or "heatmap_header" in key:
        return f"model.feature_dim={found[0]} (the config has {m.feature_dim})"
    return f"model.base_width (the config has {m.base_width}) or model.feature_dim"


# ----------------------------------------------------------------------------
# Reading and checking.
# ----------------------------------------------------------------------------


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


def read_release_state(path: str) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """The state dict (keys without `module.`), the prototypes `[M, C]` and the step of a file.

    Accepts keys with and without DistributedDataParallel's `module.` prefix,
    and the prototypes in the state dict (`prototype`), at the top level
    (`prototype`) or both (then they must be equal).

    Raises:
      ReleaseCheckpointError: not a release model file, or the two prototype
        entries differ.
      torch_files.TorchFileError: unreadable or unsafe file.
    """
    saved = torch_files.read_torch_file(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ReleaseCheckpointError(
            f"{path} is not a model file of the release: it holds {found}, a dict with a "
            "'model' state dict (and 'prototype') was expected (the release's <name>_models)."
        )
    state = {}
    for key, value in saved["model"].items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if not isinstance(value, np.ndarray):
            raise ReleaseCheckpointError(f"{path}: state-dict entry {key!r} is not a tensor.")
        if name in state:
            raise ReleaseCheckpointError(f"{path}: {name!r} appears with and without 'module.'.")
        state[name] = value
    in_dict, top = state.pop("prototype", None), saved.get("prototype")
    if in_dict is None and top is None:
        raise ReleaseCheckpointError(
            f"{path}: no 'prototype' tensor, neither in the state dict nor at the top level."
        )
    if in_dict is not None and top is not None and not np.array_equal(in_dict, top):
        raise ReleaseCheckpointError(
            f"{path}: the state dict's 'prototype' {in_dict.shape} and the top-level "
            f"'prototype' {np.shape(top)} differ; the file is inconsistent."
        )
    prototypes = np.asarray(in_dict if in_dict is not None else top, np.float32)
    step = saved.get("step", 0)
    step = int(step) if isinstance(step, int) and step >= 0 else 0
    return state, prototypes, step


def _check_window(state: dict[str, np.ndarray], window: int) -> None:
    """The soft-argmax buffers (if saved) must be the kernels of `window`."""
    offsets = np.arange(window, dtype=np.float32) - window // 2
    expected = {
        "x_kernel": np.broadcast_to(offsets[None, :], (window, window)),
        "y_kernel": np.broadcast_to(offsets[:, None], (window, window)),
        "s_kernel": np.ones((window, window), np.float32),
    }
    for name in _WINDOW_BUFFERS:
        key = f"sample_points_diff.{name}"
        if key not in state:
            continue
        value = state[key]
        if value.shape != (1, 1, window, window):
            size = value.shape[-1] if value.ndim == 4 else "?"
            raise ReleaseCheckpointError(
                f"tensor {key} has shape {value.shape} in the file, the config gives "
                f"{(1, 1, window, window)}: set model.window={size} (the config has {window})."
            )
        if not np.array_equal(value[0, 0], expected[name]):
            raise ReleaseCheckpointError(
                f"tensor {key} does not hold the soft-argmax kernel of a {window}x{window} "
                "window: not a model file of the release."
            )


def convert_state_dict(
    state: dict[str, np.ndarray], prototypes: np.ndarray, config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Flax variables `{'params': ...}` of `config`'s model from a release state dict.

    Raises:
      ReleaseCheckpointError: a tensor is missing, extra or of another shape
        than `config` gives (one line: the tensor, both shapes, the field).
    """
    model = models.create_model(config)
    size = 8 * 2 ** (config.model.depth - 1)
    template = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    )
    m, c = config.model.num_prototypes, config.model.feature_dim
    used = set()
    if prototypes.shape != (m, c):
        raise ReleaseCheckpointError(
            f"tensor prototype has shape {prototypes.shape} in the file, the config gives "
            f"{(m, c)}: set {_field_hint('prototype', config, prototypes.shape, (m, c))}."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [tuple(str(getattr(k, "key", k)) for k in key_path) for key_path, _ in leaves]
    # A layer's weight is checked before its bias: its shape says more.
    for path, (_, leaf) in sorted(
        zip(paths, leaves, strict=True), key=lambda p: (p[0][:-1], p[0][-1] == "bias")
    ):
        key = torch_key(path)
        expected = _to_torch_shape(path, leaf.shape)
        if key not in state:
            raise ReleaseCheckpointError(
                f"tensor {key} {expected} is missing from the file: it is not a model of "
                f"this config (model.depth={config.model.depth}, model.decoder_mode="
                f"{config.model.decoder_mode!r}) or not a release model file."
            )
        found = state[key].shape
        if found != expected:
            raise ReleaseCheckpointError(
                f"tensor {key} has shape {found} in the file, the config gives {expected}: "
                f"set {_field_hint(key, config, found, expected)}."
            )
        used.add(key)
    converted = [_from_torch(path, state[torch_key(path)]) for path in paths]
    _check_window(state, config.model.window)
    extra = sorted(
        key
        for key in state
        if key not in used and key not in {f"sample_points_diff.{n}" for n in _WINDOW_BUFFERS}
    )
    if extra:
        hint = " (model.depth?)" if any("dconv" in key for key in extra) else ""
        raise ReleaseCheckpointError(
            f"tensor {extra[0]} {state[extra[0]].shape} in the file has no place in the model "
            f"of this config{hint}" + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "") + "."
        )
    return jax.tree_util.tree_unflatten(treedef, converted)


def read_release_regressor(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
    """The release's landmark regressor as `[2 K M, 2 T]` (landmarks = features @ W).

    Its features are the release's slot layout (`landmark_regression.
    release_landmark_features`) of keypoints in image fractions (x / W, y / H).

    Raises:
      ReleaseCheckpointError: not a `LinearProjection_model`, or K M or T differ
        from the config's model and dataset.
    """
    saved = torch_files.read_torch_file(path)
    weight = saved.get("model", {}).get("mlp.weight") if isinstance(saved, dict) else None
    if not isinstance(weight, np.ndarray) or weight.ndim != 2:
        raise ReleaseCheckpointError(
            f"{path} is not the release's LinearProjection_model (a 'model' dict with a 2-D "
            "'mlp.weight' was expected)."
        )
    info = datasets.get_info(config.dataset.name)
    if info.task != "landmarks":
        raise ReleaseCheckpointError(
            f"--linear_projection: dataset {info.name!r} is a {info.task} dataset; the "
            "release's landmark regressor is for celeba_wild (MAFL) and h36m."
        )
    k, m = config.model.num_keypoints, config.model.num_prototypes
    expected = (2 * info.num_landmarks, 2 * k * m)
    if weight.shape != expected:
        raise ReleaseCheckpointError(
            f"tensor mlp.weight of {path} has shape {weight.shape}, the config gives "
            f"{expected} (2 x {info.num_landmarks} landmarks, 2 x K={k} x M={m}): set "
            "model.num_keypoints and model.num_prototypes to the model it was fitted on."
        )
    return np.ascontiguousarray(weight.T, np.float32)


# ----------------------------------------------------------------------------
# Writing.
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
    config_lib.validate_config(config)
    _check_new_workdir(workdir)
    state_dict, prototypes, step = read_release_state(checkpoint)
    params = convert_state_dict(state_dict, prototypes, config)
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
    manager = checkpointing.create_manager(workdir, config.train.max_to_keep, use_async=False)
    try:
        checkpointing.save(manager, step, state, {"step": step, "seed": int(config.seed)})
        checkpointing.wait(manager)
    finally:
        manager.close()
    if regressor is not None:
        path = os.path.join(workdir, REGRESSOR_FILE)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, weight=regressor)
        os.replace(path + ".tmp", path)
    config_lib.save_config(config, workdir)


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


def load_regressor(workdir: str) -> np.ndarray | None:
    """The converted release regressor `[2 K M, 2 T]` of a workdir, or None."""
    path = os.path.join(workdir, REGRESSOR_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path) as data:
        return np.asarray(data["weight"], np.float64)


# ----------------------------------------------------------------------------
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
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
