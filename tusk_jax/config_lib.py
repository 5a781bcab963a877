"""Config checks and the config saved beside a run's checkpoints.

`validate_config` rejects, at start-up, any value that would fail later (or
silently train the wrong thing), with a message naming the field.
`save_config` / `load_config` keep the resolved config of a run in
`<workdir>/config.json`, so evaluation and inference rebuild the very model
that was trained.
"""

import json
import os

import jax
import ml_collections

from tusk_jax import datasets, models, ops, perceptual

CONFIG_FILE = "config.json"
# What trains the prototypes (`train.prototype_objective`): the method's L_sw,
# or the k-means ablation of the paper's Table 6.
PROTOTYPE_OBJECTIVES = ("sliced_wasserstein", "kmeans")
# How the encoder/decoder learning rate moves over a run (`train.lr_schedule`).
LR_SCHEDULES = ("constant", "cosine")
# Which descriptors the prototype steps fit (`train.prototype_descriptors`).
PROTOTYPE_DESCRIPTORS = ("updated", "stale")
# Values of fields a run saved before they existed was trained with (what
# tusk_jax computed then); `load_config` fills them in so an old run is
# rebuilt as it was trained. "model.head_groups" is special: it was
# `model.num_groups`.
LEGACY_VALUES = {
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
}


def _fail(field: str, message: str) -> None:
    raise ValueError(f"config {field}: {message}")


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ValueError naming the first invalid field of a training config.

    Args:
      config: the whole config (configs/base.py layout).
      device_count: devices sharing the global batch; default `jax.device_count()`.
    """
    if config.dataset.name not in datasets.names():
        _fail(
            "dataset.name",
            f"unknown dataset {config.dataset.name!r}; valid: {', '.join(datasets.names())}.",
        )
    if config.dataset.source not in ("auto", "real", "procedural"):
        _fail("dataset.source", f"must be auto, real or procedural, got {config.dataset.source!r}.")
    models.check_model_config(config.model)
    models.check_image_size(
        config.dataset.image_size, config.dataset.image_size, config.model.depth
    )
    if not isinstance(config.model.num_prototypes, int) or config.model.num_prototypes < 1:
        _fail(
            "model.num_prototypes", f"must be a positive int, got {config.model.num_prototypes!r}."
        )
    for field in ("temperature", "splat_variance"):
        if config.model[field] <= 0:
            _fail(f"model.{field}", f"must be > 0, got {config.model[field]!r}.")
    if config.model.window > config.dataset.image_size:
        _fail("model.window", f"{config.model.window} exceeds dataset.image_size.")
    task = datasets.get_info(config.dataset.name).task
    if config.model.decoder_mode == "alpha" and task != "object_discovery":
        _fail(
            "model.decoder_mode",
            f"'alpha' is for object discovery datasets; {config.dataset.name} is a {task} "
            "dataset: use 'plain'.",
        )
    if config.loss.recon not in ("mse", "perceptual"):
        _fail("loss.recon", f"must be 'mse' or 'perceptual', got {config.loss.recon!r}.")
    if config.loss.recon == "perceptual" and not config.loss.vgg16_weights:
        _fail(
            "loss.vgg16_weights",
            "loss.recon='perceptual' needs a VGG16 .npz (see python -m tusk_jax.convert_vgg16).",
        )
    for field in ("recon_weight", "kmeans_weight", "eqv_score_weight", "eqv_feature_weight"):
        if config.loss[field] < 0:
            _fail(f"loss.{field}", f"must be >= 0, got {config.loss[field]!r}.")
    if config.loss.sw_num_projections < 1:
        _fail("loss.sw_num_projections", "must be >= 1.")
    if config.tps.padding not in ("reflect", "constant"):
        _fail("tps.padding", f"must be 'reflect' or 'constant', got {config.tps.padding!r}.")
    train = config.train
    device_count = jax.device_count() if device_count is None else device_count
    if train.batch_size < 1 or train.batch_size % device_count:
        _fail(
            "train.batch_size",
            f"{train.batch_size} must be a positive multiple of the {device_count} devices.",
        )
    if train.num_prototype_steps < 0:
        _fail("train.num_prototype_steps", "must be >= 0.")
    objective = prototype_objective(config)
    if objective not in PROTOTYPE_OBJECTIVES:
        _fail(
            "train.prototype_objective",
            f"must be one of {', '.join(PROTOTYPE_OBJECTIVES)}, got {objective!r}.",
        )
    if not train.alternate and train.num_prototype_steps:
        _fail(
            "train.num_prototype_steps",
            "must be 0 with train.alternate=False (the joint ablation has no prototype steps).",
        )
    for field in ("learning_rate", "prototype_learning_rate"):
        if train[field] <= 0:
            _fail(f"train.{field}", f"must be > 0, got {train[field]!r}.")
    rounding = sw_count_rounding(config)
    if rounding not in ops.COUNT_ROUNDINGS:
        _fail(
            "loss.sw_count_rounding",
            f"must be one of {', '.join(ops.COUNT_ROUNDINGS)}, got {rounding!r}.",
        )
    schedule, warmup_steps = lr_schedule(config)
    if schedule not in LR_SCHEDULES:
        _fail(
            "train.lr_schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}.",
        )
    if not 0 <= warmup_steps < train.num_steps:
        _fail(
            "train.warmup_steps",
            f"must be in [0, train.num_steps={train.num_steps}), got {warmup_steps!r}.",
        )
    for field in ("num_steps", "log_every", "image_every", "checkpoint_every", "max_to_keep"):
        if train[field] < 1:
            _fail(f"train.{field}", f"must be >= 1, got {train[field]!r}.")
    choices = {
        "train.prototype_descriptors": (train.prototype_descriptors, PROTOTYPE_DESCRIPTORS),
        "loss.sw_spread": (config.loss.sw_spread, ops.SPREADS),
        "loss.perceptual_reduction": (config.loss.perceptual_reduction, perceptual.REDUCTIONS),
    }
    for field, (value, valid) in choices.items():
        if value not in valid:
            _fail(field, f"must be one of {', '.join(valid)}, got {value!r}.")


def prototype_objective(config: ml_collections.ConfigDict) -> str:
    """`train.prototype_objective`; runs saved before the field existed used L_sw."""
    return config.train.get("prototype_objective", "sliced_wasserstein")


def sw_count_rounding(config: ml_collections.ConfigDict) -> str:
    """`loss.sw_count_rounding`; runs saved before it existed: the reference's "last"."""
    return config.loss.get("sw_count_rounding", "last")


def lr_schedule(config: ml_collections.ConfigDict) -> tuple[str, int]:
    """(`train.lr_schedule`, `train.warmup_steps`); runs saved before they existed: constant."""
    return config.train.get("lr_schedule", "constant"), config.train.get("warmup_steps", 0)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config to `<workdir>/config.json` (atomically)."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (see `save_config`)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a training workdir of tusk_jax.main."
        )
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    fill_legacy_values(config)
    return config


def fill_legacy_values(config: ml_collections.ConfigDict) -> None:
    """Adds, in place, the fields a run saved before they existed lacks (`LEGACY_VALUES`)."""
    if "head_groups" not in config.model:
        config.model.head_groups = config.model.num_groups
    for dotted, value in LEGACY_VALUES.items():
        section, field = dotted.split(".")
        if field not in config[section]:
            config[section][field] = value
