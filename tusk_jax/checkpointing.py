"""Checkpoints of a run: save, restore, and the config a run is rebuilt with.

An orbax `CheckpointManager` in `<workdir>/checkpoints` holds, per step, two
items: `state` (the whole `tusk_jax.state.TrainState` pytree) and `data` (the
train iterator's position, JSON). Orbax writes each step to a temporary
folder and renames it when complete; saves are asynchronous. `resolve_config`
gives the config to rebuild a run with and `restore_state` checks the
checkpoint's array shapes against that config's model before restoring, so a
checkpoint of another config fails with a message naming the fields.

Integrity: `save` writes `<checkpoints>/<step>.sha256.json` beside the step,
a SHA-256 of the state's arrays and of the data position computed from the
values handed to orbax; `restore` recomputes it from the restored values and
raises `CorruptCheckpointError` when they differ or the files cannot be read.
`restore_newest_intact` (training) then falls back to the newest intact step,
and `set_aside` moves the corrupt ones to `<workdir>/corrupt_checkpoints/`.
Write failures (disk full, read-only folder) become one `CheckpointWriteError`
naming the folder and the OS cause; `check_writable` tests the folders first.
"""

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from tusk_jax import config_lib, models
from tusk_jax import state as state_lib
from tusk_jax.checkpoint_integrity import (  # noqa: F401  (part of this module's API)
    CHECKSUM_SUFFIX,
    WRITE_ERRNOS,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    check_writable,
    checksum_path,
    prune_checksums,
    raise_write_error,
    read_checksum,
    state_digest,
)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


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


def saved_steps(workdir: str) -> list[int]:
    """The complete steps in `<workdir>/checkpoints` (folder names), without orbax."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------


def wait(manager) -> None:
    """Waits for the pending asynchronous save; its write errors as `CheckpointWriteError`."""
    try:
        manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - orbax raises what its threads raised
        directory = str(manager.directory)
        pending = sorted(
            name.split(".")[0]
            for name in os.listdir(directory)
            if name.endswith(".orbax-checkpoint-tmp") and name.split(".")[0].isdigit()
        )
        what = f"the checkpoint of step {pending[-1]}" if pending else "a checkpoint"
        raise_write_error(error, directory, what)
        raise


def save(
    manager,
    step: int,
    state: Any,
    data_state: dict | None,
    force: bool = False,
    identity: dict | None = None,
) -> bool:
    """Saves a host (unreplicated) state and the data position at `step`, with its checksum.

    `identity` (`{"run_id", "config_sha256"}`, see `tusk_jax.run_identity`)
    goes into the step's orbax metadata, so a copied step folder still says
    which run it belongs to.

    The previous asynchronous save is waited for first, so its errors surface
    here. The checksum file is written (atomically, by process 0) before orbax
    starts; a step that never completes leaves only a stale checksum, removed
    by a later save.

    Raises:
      CheckpointWriteError: the folder is full or not writable.
    """
    directory = str(manager.directory)
    wait(manager)
    try:
        if jax.process_index() == 0:  # One writer of the shared folder.
            prune_checksums(manager)
            path = checksum_path(directory, step)
            with open(path + ".tmp", "w") as f:
                json.dump({"step": int(step), **state_digest(state, data_state)}, f)
            os.replace(path + ".tmp", path)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )
        return manager.save(int(step), args=args, force=force, custom_metadata=identity)
    except Exception as error:  # noqa: BLE001
        raise_write_error(error, directory, f"the checkpoint of step {step}")
        raise


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


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


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def check_state_matches(manager, step: int, template: Any, workdir: str) -> None:
    """Raises ValueError if the saved state's arrays differ from `template`'s.

    Orbax restores a numpy template's arrays with the *checkpoint's* shapes
    without complaint, and fails with an unrelated message on a different tree
    structure, so the stored metadata is compared first.

    Args:
      manager: the run's orbax `CheckpointManager`.
      step: the step to check.
      template: a host `TrainState` of the expected structure, shapes, dtypes.
      workdir: named in the message.

    Raises:
      CorruptCheckpointError: the step's metadata cannot be read.
      CheckpointMismatchError (a ValueError): the arrays differ (another config's run).
    """
    item = epath.Path(manager.directory) / str(step) / "state"
    try:
        if item.exists():
            metadata = ocp.StandardCheckpointHandler().metadata(item)
        else:  # A step folder named otherwise: ask the manager.
            metadata = manager.item_metadata(step)["state"]
        stored = _leaf_specs(getattr(metadata, "tree", metadata))
    except Exception as error:  # noqa: BLE001 - whatever unreadable metadata raises
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {item.parent} cannot be read: {_one_line(error)}"
        ) from None
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
        raise CheckpointMismatchError(
            f"The checkpoint of step {step} in {workdir!r} does not fit the model built "
            f"from the config (checkpoint from another config?):\n  " + "\n  ".join(shown)
        )


def restore(manager, template: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
    """Restores `(state, data_state, step)` at `step` (default: latest), or None if empty.

    `template` is a host state of the right structure, shapes and dtypes
    (e.g. a freshly initialised one, `jax.device_get`); the restored arrays
    are numpy arrays like it, and its non-pytree fields are kept. The values
    are checked against the step's checksum file when it has one.

    Raises:
      CorruptCheckpointError: the step cannot be read or fails its checksum.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {manager.directory}; "
            f"available: {sorted(manager.all_steps())}."
        )
    location = os.path.join(str(manager.directory), str(step))
    expected = read_checksum(str(manager.directory), step)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.device_get(template)),
                data=ocp.args.JsonRestore(),
            ),
        )
    except Exception as error:  # noqa: BLE001 - tensorstore / JSON / OS errors alike
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {location} cannot be read: {_one_line(error)}"
        ) from None
    state, data_state = restored.state, dict(restored.data or {})
    if expected is None:
        logging.warning(
            "Checkpoint step %d in %s has no checksum (saved before checksums existed, or "
            "killed right after the save): restored unverified.",
            step,
            location,
        )
    else:
        found = state_digest(state, data_state)
        for key in ("state_sha256", "data_sha256"):
            if found[key] != expected.get(key):
                what = "arrays" if key == "state_sha256" else "data position"
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {location} is corrupt: its {what} do not "
                    f"match the checksum saved with it ({checksum_path(manager.directory, step)})."
                )
    return state, data_state, step


def restore_newest_intact(
    manager, template: Any, workdir: str, check_step: Any = None
) -> tuple[tuple | None, list]:
    """Restores the newest step that reads back intact (see `restore`).

    Each corrupt step is logged (path and cause) and skipped; a step whose
    arrays do not fit `template` stops the search (`check_state_matches`),
    and so does an error of `check_step(step)` (called before the step is
    read, e.g. `run_identity.check_step`: a step of another run).

    Returns:
      `(restored, corrupt)`: `restore`'s tuple (None when there is no step)
      and the corrupt steps skipped, newest first.

    Raises:
      CorruptCheckpointError: every step is corrupt.
      ValueError: the newest readable step is of another config.
    """
    corrupt = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            check_state_matches(manager, step, template, workdir)
            if check_step is not None:
                check_step(step)
            restored = restore(manager, template, step)
        except CorruptCheckpointError as error:
            logging.warning("%s", error)
            corrupt.append(step)
            continue
        if corrupt:
            logging.warning(
                "Falling back to step %d, the newest intact checkpoint (corrupt: %s, moved to %s).",
                step,
                ", ".join(map(str, corrupt)),
                os.path.join(workdir, CORRUPT_DIR),
            )
        return restored, corrupt
    if corrupt:
        raise CorruptCheckpointError(
            f"no intact checkpoint in {manager.directory}: steps "
            f"{', '.join(map(str, corrupt))} are corrupt (see above). Move them away to "
            "start the run again from scratch."
        )
    return None, []


def set_aside(manager, workdir: str, steps: list, move: bool = True) -> None:
    """Moves corrupt steps (and their checksums) to `<workdir>/corrupt_checkpoints/`.

    The run can then save those steps again; nothing is deleted. `move=False`
    (processes other than the first) only re-reads the step list.
    """
    if not steps:
        return
    if not move:
        manager.reload()
        return
    directory = str(manager.directory)
    target = os.path.join(os.path.abspath(workdir), CORRUPT_DIR)
    os.makedirs(target, exist_ok=True)
    for step in steps:
        for name in (str(step), f"{step}{CHECKSUM_SUFFIX}"):
            source = os.path.join(directory, name)
            if not os.path.exists(source):
                continue
            destination, n = os.path.join(target, name), 1
            while os.path.exists(destination):
                destination, n = os.path.join(target, f"{name}.{n}"), n + 1
            shutil.move(source, destination)
    manager.reload()


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
    differences = config_lib.config_differences(config, saved)
    if differences:
        raise ValueError(
            f"The checkpoint in {workdir!r} comes from another config: the given config "
            f"differs from {os.path.join(workdir, config_lib.CONFIG_FILE)} in\n  "
            + "\n  ".join(differences)
            + "\nEvaluate with the config the run was trained with (or omit --config)."
        )
    return ml_collections.ConfigDict(config.to_dict())


def state_template(config: ml_collections.ConfigDict):
    """A host `TrainState` of zeros with the shapes `config` builds (no compilation)."""
    model = models.create_model(config)
    abstract = jax.eval_shape(lambda: state_lib.create_train_state(config, model))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def _restore_listed(manager, config, workdir: str, step: int, steps: list) -> tuple:
    """`restore` of a listed `step`; a corrupt step's message names the run's others."""
    template = state_template(config)
    check_state_matches(manager, step, template, workdir)
    try:
        return restore(manager, template, step)
    except CorruptCheckpointError as error:
        # Not a silent fall-back as in training: metrics or detections of
        # another step than the one asked for would be mislabelled.
        others = [s for s in steps if s != step]
        hint = (
            f" Pick another step with --step (this run's others: {others}); "
            "resuming training falls back to the newest intact one by itself."
            if others
            else " It is the run's only step."
        )
        raise CorruptCheckpointError(f"{error}{hint}") from None


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
      CorruptCheckpointError: the step fails its checksum or cannot be read (the
        message lists the run's other steps).
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoint in {workdir!r}: {directory} does not exist. Train first with "
            f"python -m tusk_jax.main --config=... --workdir={workdir}."
        )
    manager = create_manager(workdir, use_async=False)
    vanished = []  # Listed, then removed while read (a trainer pruning old steps).
    try:
        while True:
            steps = sorted(set(manager.all_steps()) - set(vanished))
            if not steps:
                raise FileNotFoundError(
                    f"No checkpoint in {workdir!r}: {directory} holds no complete step"
                    + (f" (step(s) {vanished} were removed while read)." if vanished else ".")
                )
            if step is not None and step not in steps:
                raise FileNotFoundError(
                    f"No checkpoint of step {step} in {workdir!r}; available steps: {steps}."
                )
            chosen = steps[-1] if step is None else step
            try:
                restored = _restore_listed(manager, config, workdir, chosen, steps)
                break
            except (CorruptCheckpointError, FileNotFoundError):
                if os.path.isdir(os.path.join(directory, str(chosen))):
                    raise
            # Not corrupt: gone. The step asked for is an error; the latest moves on.
            vanished.append(chosen)
            if step is not None:
                raise FileNotFoundError(
                    f"Checkpoint step {step} in {workdir!r} was removed while it was read "
                    "(by a trainer keeping its newest train.max_to_keep steps?); "
                    f"steps left: {[s for s in steps if s != step]}."
                )
            manager.reload()
    finally:
        manager.close()
    if vanished:
        logging.warning(
            "Checkpoint step(s) %s in %s were removed while being read (by a trainer keeping "
            "its newest train.max_to_keep steps?); using step %d, the newest complete one.",
            ", ".join(map(str, vanished)),
            directory,
            restored[2],
        )
    state, _, step = restored
    logging.info("Restored step %d from %s.", step, directory)
    return state, int(step)
