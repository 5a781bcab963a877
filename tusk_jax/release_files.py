"""The authors' release files as tusk_jax arrays: model state dicts and landmark regressors.

The release's `train.py` saves `torch.save({'model': state_dict, 'prototype': P})`
as `<name>_models`; `evaluate_celeba_h36m.py` saves the landmark regressor as
`LinearProjection_model` (`{'model': {'mlp.weight': [2T, 2KM]}}`). Both are read
with `tusk_jax.torch_files` (no PyTorch, nothing in the file is executed).
`tusk_jax.convert_release` writes workdirs from them; `tusk_jax.evaluate`
reads the converted regressor (`regressor_weights`).

A state dict is checked against the model of a config: each tensor that
model needs must be in the file with the shape that config gives, and nothing
else may be (but the soft-argmax's fixed kernels, checked against
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

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from tusk_jax import datasets, models, torch_files

REGRESSOR_FILE = "release_regressor.npz"
# Landmark regressors `evaluate --regressor` can use: the authors' (a workdir
# of `--linear_projection`) or one fitted on the `regressor_train` split.
REGRESSORS = ("release", "fit")
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
            level = int(stage.removeprefix("down").removeprefix("up")) + 1
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
def load_regressor(workdir: str) -> np.ndarray | None:
    """The converted release regressor `[2 K M, 2 T]` of a workdir, or None."""
    path = os.path.join(workdir, REGRESSOR_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path) as data:
        return np.asarray(data["weight"], np.float64)


def regressor_weights(
    workdir: str, info: datasets.common.DatasetInfo, regressor: str | None
) -> np.ndarray | None:
    """The authors' regressor to evaluate a run with, or None (fit one), as `regressor` says.

    Args:
      workdir: the run.
      info: the evaluated dataset.
      regressor: one of `REGRESSORS`, or None: "release" where the workdir has
        one (landmark datasets), else "fit".

    Raises:
      ValueError: an unknown choice, or a choice for a dataset without landmarks.
      FileNotFoundError: "release" for a workdir without `REGRESSOR_FILE`.
    """
    if regressor is not None and regressor not in REGRESSORS:
        raise ValueError(f"regressor must be one of {REGRESSORS}, got {regressor!r}.")
    if regressor is not None and info.task != "landmarks":
        raise ValueError(
            f"--regressor is for landmark datasets; {info.name!r} is a {info.task} dataset."
        )
    if info.task != "landmarks" or regressor == "fit":
        return None
    weights = load_regressor(workdir)
    if weights is None and regressor == "release":
        raise FileNotFoundError(
            f"--regressor=release: {workdir} has no {REGRESSOR_FILE}; convert the authors' "
            "LinearProjection_model with python -m tusk_jax.convert_release "
            "--linear_projection=..., or use --regressor=fit."
        )
    return weights


# ----------------------------------------------------------------------------
