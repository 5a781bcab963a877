"""Config checks and the config saved beside a run's checkpoints.

`validate_config` rejects, at start-up, any value that would fail later (or
silently train the wrong thing), with a message naming the field.
`save_config` / `load_config` keep the resolved config of a run in
`<workdir>/config.json`, so evaluation and inference rebuild the very model
that was trained. `check_resume_config` compares the config of a resumed run
with that file before anything is written (`RESUME_CHANGES` classifies every
field), and `record_config_changes` keeps the accepted changes in
`<workdir>/config_changes.jsonl`.
"""

import json
import math
import os
import time

import jax
import ml_collections

from tusk_jax import datasets, distributed, models, ops, perceptual
from tusk_jax.configs import base

CONFIG_FILE = "config.json"
# config.json's key for the run's identity (`tusk_jax.run_identity`); not a config field.
RUN_KEY = "run_identity"
# What trains the prototypes (`train.prototype_objective`): the method's L_sw,
# or the k-means ablation of the paper's Table 6.
PROTOTYPE_OBJECTIVES = ("sliced_wasserstein", "kmeans")
# How the encoder/decoder learning rate moves over a run (`train.lr_schedule`).
LR_SCHEDULES = ("constant", "cosine")
# Which descriptors the prototype steps fit (`train.prototype_descriptors`).
PROTOTYPE_DESCRIPTORS = ("updated", "stale")
# Fields with a fixed set of values (checked by `validate_config`).
CHOICES = {
    "loss.recon": ("mse", "perceptual"),
    "tps.padding": ("reflect", "constant"),
    "tps.grid": ops.TPS_GRIDS,
    "tps.outside": ops.WARP_OUTSIDES,
    "train.prototype_objective": PROTOTYPE_OBJECTIVES,
    "loss.sw_count_rounding": ops.COUNT_ROUNDINGS,
    "train.lr_schedule": LR_SCHEDULES,
    "train.prototype_descriptors": PROTOTYPE_DESCRIPTORS,
    "loss.sw_spread": ops.SPREADS,
    "loss.perceptual_reduction": perceptual.REDUCTIONS,
}
# Values of fields a run saved before they existed was trained with (what
# tusk_jax computed then); `load_config` fills them in so an old run is
# rebuilt as it was trained. "model.head_groups" is special: it was
# `model.num_groups`.
LEGACY_VALUES = {
    "model.dtype": "float32",
    "model.init": "lecun",
    "model.upsample_align_corners": False,
    "model.soft_argmax_border": "inside",
    "model.descriptor_sampling": "bilinear",
    "loss.sw_spread": "channel_sum",
    "loss.perceptual_reduction": "mean",
    "loss.sw_count_rounding": "last",
    "train.prototype_descriptors": "stale",
    "train.prototype_objective": "sliced_wasserstein",
    "train.lr_schedule": "constant",
    "train.warmup_steps": 0,
    "train.prefetch_to_device": 0,
    "tps.grid": "pixel_centres",
    "tps.outside": "padding",
}


CHANGES_FILE = "config_changes.jsonl"

# What changing a field does to a run resumed from its checkpoints (the
# config given vs. the run's config.json). Every field not listed here is
# MEANING. SHAPE: the checkpoint cannot hold another value (array shapes or the
# optimizer state's structure depend on it): always refused. MEANING: the run
# would go on training something else than it started (window, K, image size,
# losses and weights, data, TPS, learning rates, fidelity options): refused
# unless `allow_change` (`--allow_config_change`), then recorded in
# `config_changes.jsonl`. HARMLESS: how long, how often to log/save, where
# the files are: accepted (and recorded).
SHAPE, MEANING, HARMLESS = "shape", "meaning", "harmless"
RESUME_CHANGES = {
    "model.base_width": SHAPE,
    "model.depth": SHAPE,
    "model.feature_dim": SHAPE,
    "model.num_prototypes": SHAPE,
    "model.decoder_mode": SHAPE,  # alpha: RGBA decoder output, plain: RGB.
    "train.lr_schedule": SHAPE,  # A schedule adds a step count to the optimizer state.
    "train.num_steps": HARMLESS,
    "train.log_every": HARMLESS,
    "train.image_every": HARMLESS,
    "train.checkpoint_every": HARMLESS,
    "train.max_to_keep": HARMLESS,
    "train.prefetch_to_device": HARMLESS,  # Same batches, read ahead or not.
    "dataset.data_dir": HARMLESS,
    "dataset.manual_dir": HARMLESS,
    "dataset.eval_split": HARMLESS,
    "dataset.num_eval_examples": HARMLESS,
    "loss.vgg16_weights": HARMLESS,  # The path; the weights are fixed ImageNet ones.
    "variant": HARMLESS,  # A label; the fields it sets are compared one by one.
}


class ConfigError(ValueError):
    """A config value is invalid, or does not fit the run being resumed; names the field."""


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config {field}: {message}")


def validate_config(
    config: ml_collections.ConfigDict, device_count: int | None = None, training: bool = True
) -> None:
    """Raises `ConfigError` naming the first invalid field of a training config.

    The one place of every check that spans fields (image size vs depth, window
    and K; decoder vs task; batch vs devices; ...).

    Args:
      config: the whole config (tusk_jax/configs/base.py layout).
      device_count: devices sharing the global batch; default: every process's.
      training: False: not trained here (`convert_release`); skips VGG16 file, device split.
    """
    _check_dataset(config)
    _check_model(config)
    _check_loss(config, training)
    _check_tps(config.tps)
    if training:
        check_batch_split(config.train.batch_size, device_count)
    _check_train(config)
    for field, valid in CHOICES.items():
        section, name = field.split(".")
        value = config[section][name]
        if value not in valid:
            _fail(field, f"must be one of {', '.join(valid)}, got {value!r}.")


def check_batch_split(batch_size: int, device_count: int | None = None) -> int:
    """The per-device batch; `ConfigError` unless the global batch splits over the devices.

    Args:
      batch_size: `train.batch_size` (pairs, global).
      device_count: the devices; None: every process's (they must be equal).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        _fail("train.batch_size", f"must be an int >= 1 (pairs per step), got {batch_size!r}.")
    num_processes = jax.process_count()
    if device_count is None:
        try:
            device_count = num_processes * distributed.devices_per_process()
        except ValueError as error:
            raise ConfigError(str(error)) from None
    per_process = device_count // num_processes
    if batch_size % device_count:
        valid = ", ".join(str(device_count * i) for i in range(1, 4))
        raise ConfigError(
            f"config train.batch_size={batch_size} does not split evenly over the "
            f"{device_count} devices ({num_processes} process(es) x {per_process} device(s)): "
            f"use a multiple of {device_count} (e.g. {valid})."
        )
    return batch_size // device_count


def _check_dataset(config: ml_collections.ConfigDict) -> None:
    dataset = config.dataset
    if dataset.name not in datasets.names():
        valid = ", ".join(datasets.names())
        _fail("dataset.name", f"unknown dataset {dataset.name!r}; valid: {valid}.")
    if dataset.source not in ("auto", "real", "procedural"):
        _fail("dataset.source", f"must be auto, real or procedural, got {dataset.source!r}.")
    if not isinstance(dataset.num_train, int) or dataset.num_train < 1:
        _fail("dataset.num_train", f"must be a positive int, got {dataset.num_train!r}.")
    if dataset.num_train < config.train.batch_size:
        _fail(
            "dataset.num_train",
            f"{dataset.num_train} training examples are fewer than one batch "
            f"(train.batch_size={config.train.batch_size}).",
        )


def _check_model(config: ml_collections.ConfigDict) -> None:
    model, size = config.model, config.dataset.image_size
    try:
        models.check_model_config(model)
        models.check_image_size(size, size, model.depth)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if model.num_keypoints > size * size:
        _fail(
            "model.num_keypoints",
            f"K = {model.num_keypoints} exceeds the {size * size} pixels of a "
            f"{size}x{size} image (dataset.image_size).",
        )
    if not isinstance(model.num_prototypes, int) or model.num_prototypes < 1:
        _fail("model.num_prototypes", f"must be a positive int, got {model.num_prototypes!r}.")
    for field in ("temperature", "splat_variance"):
        if model[field] <= 0:
            _fail(f"model.{field}", f"must be > 0, got {model[field]!r}.")
    if model.window > size:
        _fail("model.window", f"{model.window} exceeds dataset.image_size.")
    task = datasets.get_info(config.dataset.name).task
    if model.decoder_mode == "alpha" and task != "object_discovery":
        _fail(
            "model.decoder_mode",
            f"'alpha' is for object discovery datasets; {config.dataset.name} is a {task} "
            "dataset: use 'plain'.",
        )


def _check_loss(config: ml_collections.ConfigDict, training: bool = True) -> None:
    loss = config.loss
    if training and loss.recon == "perceptual" and not loss.vgg16_weights:
        _fail(
            "loss.vgg16_weights",
            "loss.recon='perceptual' needs a VGG16 .npz (see python -m tusk_jax.convert_vgg16).",
        )
    for field in ("recon_weight", "kmeans_weight", "eqv_score_weight", "eqv_feature_weight"):
        if loss[field] < 0:
            _fail(f"loss.{field}", f"must be >= 0, got {loss[field]!r}.")
    if loss.sw_num_projections < 1:
        _fail("loss.sw_num_projections", "must be >= 1.")
    if not loss.kmeans_temperature > 0:
        _fail("loss.kmeans_temperature", f"must be > 0, got {loss.kmeans_temperature!r}.")
    if not loss.sw_noise_std >= 0:
        _fail("loss.sw_noise_std", f"must be >= 0, got {loss.sw_noise_std!r}.")


def _check_tps(tps: ml_collections.ConfigDict) -> None:
    if not tps.scale > 0:
        _fail("tps.scale", f"must be > 0 (a warp scale), got {tps.scale!r}.")
    for field in ("scale_var", "tps", "off", "rot"):
        if not tps[field] >= 0:
            _fail(f"tps.{field}", f"must be >= 0 (a half-range), got {tps[field]!r}.")
    if not tps.scale - tps.scale_var > 0:
        _fail(
            "tps.scale_var",
            f"tps.scale - tps.scale_var must be > 0 (the smallest scale), got "
            f"{tps.scale} - {tps.scale_var}.",
        )


def _check_train(config: ml_collections.ConfigDict) -> None:
    train = config.train
    if train.num_prototype_steps < 0:
        _fail("train.num_prototype_steps", "must be >= 0.")
    if not train.alternate and train.num_prototype_steps:
        _fail(
            "train.num_prototype_steps",
            "must be 0 with train.alternate=False (the joint ablation has no prototype steps).",
        )
    for field in ("learning_rate", "prototype_learning_rate"):
        if train[field] <= 0:
            _fail(f"train.{field}", f"must be > 0, got {train[field]!r}.")
    # Each field on its own first: a warm-up is only checked against a valid step count.
    for field in ("num_steps", "log_every", "image_every", "checkpoint_every", "max_to_keep"):
        if train[field] < 1:
            _fail(f"train.{field}", f"must be >= 1, got {train[field]!r}.")
    if not 0 <= train.warmup_steps < train.num_steps:
        _fail(
            "train.warmup_steps",
            f"must be in [0, train.num_steps={train.num_steps}), got {train.warmup_steps!r}.",
        )
    if not isinstance(train.prefetch_to_device, int) or train.prefetch_to_device < 0:
        _fail("train.prefetch_to_device", f"must be an int >= 0, got {train.prefetch_to_device!r}.")


def save_config(
    config: ml_collections.ConfigDict, workdir: str, identity: dict | None = None
) -> None:
    """Writes the resolved config to `<workdir>/config.json` (atomically).

    The run's identity (`tusk_jax.run_identity`) is stored beside the config
    under `RUN_KEY`: `identity` when given, else the one the file already has.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if identity is None:
        identity = load_run_identity(workdir)
    data = json.loads(config.to_json_best_effort())
    if identity:
        data[RUN_KEY] = identity
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_run_identity(workdir: str) -> dict | None:
    """The run identity kept in `<workdir>/config.json` (`RUN_KEY`), or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            identity = json.load(f).get(RUN_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return identity if isinstance(identity, dict) else None


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (see `save_config`).

    Fields an old run's file lacks get the value it was trained with
    (`LEGACY_VALUES`), else the base default (`tusk_jax/configs/base.py`).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a training workdir of tusk_jax.main."
        )
    data = _read_config_json(path)
    data.pop(RUN_KEY, None)
    saved = ml_collections.ConfigDict(data)
    fill_legacy_values(saved)
    return ml_collections.ConfigDict(_merged(base_defaults().to_dict(), saved.to_dict()))


def _read_config_json(path: str) -> dict:
    """The dict in a run's `config.json`; `ConfigError` naming the file and the bad part.

    Refuses invalid JSON, a top level that is not an object, and a key
    ml_collections cannot hold (e.g. `__reduce__`, a dotted name).
    """
    fix = "restore the run's own config.json (tusk_jax.main writes it)"
    try:
        with open(path) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); {fix}.") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds a {type(saved).__name__}, not a config object; {fix}.")
    bad = _invalid_key(saved)
    if bad is not None:
        field, error = bad
        raise ConfigError(f"{path}: invalid config field {field!r} ({error}); {fix}.")
    return saved


def _invalid_key(tree: dict, prefix: str = "") -> tuple[str, str] | None:
    """`(dotted field, reason)` of the first key of `tree` a ConfigDict refuses, else None."""
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        try:
            ml_collections.ConfigDict({key: None})
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            return name, str(error).strip("\"'")
        if isinstance(value, dict):
            found = _invalid_key(value, name)
            if found is not None:
                return found
    return None


def base_defaults() -> ml_collections.ConfigDict:
    """The documented defaults, `tusk_jax/configs/base.py`'s `get_base_config()`.

    Read from the package itself, never from a `configs` folder of the
    working directory.
    """
    return base.get_base_config()


def _merged(defaults: dict, saved: dict) -> dict:
    """`saved` with the fields it lacks taken from `defaults` (nested dicts merged)."""
    out = dict(defaults)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def fill_legacy_values(config: ml_collections.ConfigDict) -> None:
    """Adds, in place, the fields a run saved before they existed lacks (`LEGACY_VALUES`)."""
    if "head_groups" not in config.model:
        config.model.head_groups = config.model.num_groups
    for dotted, value in LEGACY_VALUES.items():
        section, field = dotted.split(".")
        if field not in config[section]:
            config[section][field] = value


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def flat_json(config: ml_collections.ConfigDict) -> dict:
    """`{"section.field": value}` of the config as its JSON stores it."""
    return _flat(json.loads(config.to_json_best_effort()))


# Config fields that must agree between a given config and the run's saved one:
# they decide the parameter shapes, the keypoint extraction or the image size
# the network was trained at.
CHECKED_DATASET_FIELDS = ("image_size",)


def config_differences(
    config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict
) -> list[str]:
    """The `model.*` and `dataset.image_size` fields on which two configs differ.

    Returns:
      One line per differing field, `"model.window: 5 (given) vs 11 (saved)"`;
      empty when the configs build the same network.
    """
    given = _flat(config.model.to_dict(), "model")
    kept = _flat(saved.model.to_dict(), "model")
    for field in CHECKED_DATASET_FIELDS:
        given[f"dataset.{field}"] = config.dataset.get(field)
        kept[f"dataset.{field}"] = saved.dataset.get(field)
    lines = []
    for name in sorted(set(given) | set(kept)):
        a, b = given.get(name, "<missing>"), kept.get(name, "<missing>")
        if a != b:
            lines.append(f"{name}: {a!r} (given) vs {b!r} (saved)")
    return lines


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def config_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list:
    """The fields on which `config` differs from a run's `saved` config.

    Returns:
      `(field, saved value, new value, kind)` tuples sorted by field, kind
      from `RESUME_CHANGES` (MEANING when not listed); "<missing>" for a field
      one side lacks. Both configs are compared as their JSON would store them.
    """
    old, new = flat_json(saved), flat_json(config)
    missing = "<missing>"
    changes = []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field, missing), new.get(field, missing)
        if not _same(a, b):
            changes.append((field, a, b, RESUME_CHANGES.get(field, MEANING)))
    return changes


def _describe(changes: list) -> str:
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new, _ in changes)


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, allow_change: bool = False
) -> list:
    """Compares the config of a resumed run with its `config.json`; writes nothing.

    Called when `workdir` holds checkpoints. A SHAPE change is always refused;
    a MEANING change is refused unless `allow_change`; HARMLESS ones pass.

    Returns:
      The changes (see `config_changes`); empty for a new run or the same config.

    Raises:
      ConfigError: one line naming each refused field with both values.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return []
    changes = config_changes(load_config(workdir), config)
    shape = [c for c in changes if c[3] == SHAPE]
    if shape:
        raise ConfigError(
            f"cannot resume {workdir} with this config: {_describe(shape)} (its checkpoints "
            f"cannot hold another value); keep the values of {path} or use another --workdir."
        )
    meaning = [c for c in changes if c[3] == MEANING]
    if meaning and not allow_change:
        raise ConfigError(
            f"the run in {workdir} was trained with another config: {_describe(meaning)}; "
            "resuming would train something else. Pass --allow_config_change to go on with "
            f"the new values (recorded in {CHANGES_FILE}) or use another --workdir."
        )
    return changes


def record_config_changes(workdir: str, step: int, changes: list) -> None:
    """Appends one JSON line `{"step", "time", "changes": {field: {old, new, kind}}}`."""
    if not changes:
        return
    record = {
        "step": int(step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changes": {f: {"old": a, "new": b, "kind": kind} for f, a, b, kind in changes},
    }
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
