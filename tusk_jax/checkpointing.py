"""Checkpoints of a run: save, restore, and the config a run is rebuilt with.

An orbax `CheckpointManager` in `<workdir>/checkpoints` holds, per step, two
items: `state` (the whole `tusk_jax.state.TrainState` pytree) and `data` (the
train iterator's position, JSON). Orbax writes each step to a temporary
folder and renames it when complete; saves are asynchronous. `resolve_config`
gives the config to rebuild a run with and `restore_state` checks the
checkpoint's array shapes against that config's model before restoring, so a
checkpoint of another config fails with a message naming the fields.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from tusk_jax import config_lib, models
from tusk_jax import state as state_lib

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(workdir: str, max_to_keep: int = 3, use_async: bool = True):
    """An orbax `CheckpointManager` for `<workdir>/checkpoints`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=use_async, create=True
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "data")
    )


def save(manager, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves a host (unreplicated) state and the data position at `step`."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
    )
    return manager.save(int(step), args=args, force=force)


def restore(manager, template: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
    """Restores `(state, data_state, step)` at `step` (default: latest), or None if empty.

    `template` is a host state of the right structure, shapes and dtypes
    (e.g. a freshly initialised one, `jax.device_get`); the restored arrays
    are numpy arrays like it, and its non-pytree fields are kept.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {manager.directory}; "
            f"available: {sorted(manager.all_steps())}."
        )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.device_get(template)), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.data or {}), step


# Config fields that must agree between a given config and the run's saved one:
# they decide the parameter shapes, the keypoint extraction or the image size
# the network was trained at.
CHECKED_DATASET_FIELDS = ("image_size",)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def config_differences(
    config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict
) -> list[str]:
    """The `model.*` and `dataset.image_size` fields on which two configs differ.

    Returns:
      One line per differing field, `"model.window: 5 (given) vs 11 (saved)"`;
      empty when the configs build the same network.
    """
    given = _flatten(config.model.to_dict(), "model")
    kept = _flatten(saved.model.to_dict(), "model")
    for field in CHECKED_DATASET_FIELDS:
        given[f"dataset.{field}"] = config.dataset.get(field)
        kept[f"dataset.{field}"] = saved.dataset.get(field)
    lines = []
    for name in sorted(set(given) | set(kept)):
        a, b = given.get(name, "<missing>"), kept.get(name, "<missing>")
        if a != b:
            lines.append(f"{name}: {a!r} (given) vs {b!r} (saved)")
    return lines


def resolve_config(
    workdir: str, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config to rebuild a run with: the saved one, or `config` checked against it.

    Args:
      workdir: a training workdir (holds `config.json`, see
        `config_lib.save_config`).
      config: optional config (e.g. from `--config`); its `model` fields and
        `dataset.image_size` must equal the saved ones (other fields, such as
        the data paths, are taken from it).

    Returns:
      An unlocked copy of the config to use.

    Raises:
      FileNotFoundError: `workdir` has no `config.json`.
      ValueError: `config` differs from the saved config in a model field
        ("checkpoint from another config").
    """
    saved = config_lib.load_config(workdir)
    if config is None:
        return ml_collections.ConfigDict(saved.to_dict())
    differences = config_differences(config, saved)
    if differences:
        raise ValueError(
            f"The checkpoint in {workdir!r} comes from another config: the given config "
            f"differs from {os.path.join(workdir, config_lib.CONFIG_FILE)} in\n  "
            + "\n  ".join(differences)
            + "\nEvaluate with the config the run was trained with (or omit --config)."
        )
    return ml_collections.ConfigDict(config.to_dict())


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        _path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves
    }


def check_checkpoint_matches(manager, step: int, template: Any, workdir: str) -> None:
    """Raises ValueError if the saved state's arrays differ from `template`'s.

    Orbax restores a numpy template's arrays with the *checkpoint's* shapes
    without complaint, and fails with an unrelated message on a different tree
    structure, so the stored metadata is compared first.

    Args:
      manager: the run's orbax `CheckpointManager`.
      step: the step to check.
      template: a host `TrainState` of the expected structure, shapes, dtypes.
      workdir: named in the message.
    """
    item = epath.Path(manager.directory) / str(step) / "state"
    if item.exists():
        metadata = ocp.StandardCheckpointHandler().metadata(item)
    else:  # A step folder named otherwise: ask the manager.
        metadata = manager.item_metadata(step)["state"]
    stored = _leaf_specs(getattr(metadata, "tree", metadata))
    expected = _leaf_specs(template)
    problems = []
    # Network parameters first: they name the layer that differs.
    for name in sorted(set(stored) | set(expected), key=lambda n: (not n.startswith("params"), n)):
        if name not in stored:
            problems.append(f"{name}: missing from the checkpoint")
        elif name not in expected:
            problems.append(f"{name}: in the checkpoint but not in the model")
        elif stored[name][0] != expected[name][0]:
            problems.append(
                f"{name}: shape {stored[name][0]} in the checkpoint vs {expected[name][0]} "
                "from the config"
            )
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ValueError(
            f"The checkpoint of step {step} in {workdir!r} does not fit the model built "
            f"from the config (checkpoint from another config?):\n  " + "\n  ".join(shown)
        )


def state_template(config: ml_collections.ConfigDict):
    """A host `TrainState` of zeros with the shapes `config` builds (no compilation)."""
    model = models.create_model(config)
    abstract = jax.eval_shape(lambda: state_lib.create_train_state(config, model))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def restore_state(
    workdir: str, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[Any, int]:
    """Restores the `TrainState` of `step` (default: the latest) of a run.

    Args:
      workdir: the training workdir.
      config: the run's config (see `resolve_config`).
      step: checkpoint step; None: the latest.

    Returns:
      `(state, step)`: the host `TrainState` (numpy leaves) and its step.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`, or none at `step`.
      ValueError: the checkpoint's arrays do not fit the model of `config`.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoint in {workdir!r}: {directory} does not exist. Train first with "
            f"python -m tusk_jax.main --config=... --workdir={workdir}."
        )
    manager = create_manager(workdir, use_async=False)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint in {workdir!r}: {directory} holds no complete step."
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {workdir!r}; available steps: {steps}."
            )
        template = state_template(config)
        check_checkpoint_matches(manager, step, template, workdir)
        restored = restore(manager, template, step)
    finally:
        manager.close()
    state, _, step = restored
    logging.info("Restored step %d from %s.", step, directory)
    return state, int(step)
