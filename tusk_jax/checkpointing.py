"""Checkpoints of a run: the `TrainState` and the input pipeline's position.

An orbax `CheckpointManager` in `<workdir>/checkpoints` holds, per step, two
items: `state` (the whole `tusk_jax.train.TrainState` pytree) and `data` (the
train iterator's position, JSON). Orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save restores the
previous complete step; saves are asynchronous (training goes on while the
files are written).

Integrity: `save` writes `<checkpoints>/<step>.sha256.json` beside the step,
a SHA-256 of the state's arrays and of the data position computed from the
values handed to orbax; `restore` recomputes it from the restored values and
raises `CorruptCheckpointError` when they differ or the files cannot be read.
`restore_newest_intact` (training) then falls back to the newest intact step,
and `set_aside` moves the corrupt ones to `<workdir>/corrupt_checkpoints/`.
Write failures (disk full, read-only folder) become one `CheckpointWriteError`
naming the folder and the OS cause; `check_writable` tests the folders first.
"""

import errno
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CHECKSUM_SUFFIX = ".sha256.json"
# OS errors that mean "this folder cannot take the checkpoint": reported as such.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no intact one can be read; says where and why."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint (or testing the folder) failed: disk full, read-only, ..."""


class CorruptCheckpointError(CheckpointError):
    """A saved step cannot be read, or its values do not match its checksum."""


class CheckpointMismatchError(ValueError):
    """A saved step's arrays do not fit the model of the config (another config's run)."""


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


def _os_cause(error: BaseException) -> tuple[str, str | None] | None:
    """(OS cause, file) of the first write-type OSError in an exception's chain."""
    seen = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            name = errno.errorcode.get(current.errno, str(current.errno))
            return f"{current.strerror or os.strerror(current.errno)} ({name})", current.filename
        # tensorstore reports OS errors as text.
        for code in WRITE_ERRNOS:
            if os.strerror(code) in str(current):
                return f"{os.strerror(code)} ({errno.errorcode[code]})", None
        stack.extend([current.__cause__, current.__context__])
        stack.extend(getattr(current, "exceptions", ()))
    return None


def raise_write_error(error: BaseException, directory: str, what: str) -> None:
    """Re-raises a disk-full / permission error as one `CheckpointWriteError`; else nothing."""
    cause = _os_cause(error)
    if cause is None:
        return
    message, filename = cause
    where = f" ({filename})" if filename and str(filename) != str(directory) else ""
    raise CheckpointWriteError(
        f"cannot write {what} to {directory}{where}: {message}. The earlier checkpoints "
        "are intact; free space or fix the permissions, then run the same command again."
    ) from error


def check_writable(*directories: str) -> None:
    """Creates each folder and a probe file in it; `CheckpointWriteError` if it cannot."""
    for directory in directories:
        probe = os.path.join(directory, f".tusk_write_test.{os.getpid()}")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
                f.flush()
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as error:
            if error.errno not in WRITE_ERRNOS:
                raise
            raise CheckpointWriteError(
                f"cannot write to {directory}: {error.strerror} "
                f"({errno.errorcode.get(error.errno, error.errno)}); give a --workdir this "
                "process can write to."
            ) from None


def state_digest(state: Any, data_state: dict | None) -> dict:
    """SHA-256 of a host state's arrays (paths, dtypes, shapes, bytes) and of the data position."""
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    for path, leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    data = json.dumps(data_state or {}, sort_keys=True).encode()
    return {
        "state_sha256": digest.hexdigest(),
        "data_sha256": hashlib.sha256(data).hexdigest(),
        "arrays": len(leaves),
    }


def checksum_path(directory: str, step: int) -> str:
    return os.path.join(str(directory), f"{int(step)}{CHECKSUM_SUFFIX}")


def read_checksum(directory: str, step: int) -> dict | None:
    """The checksum saved with `step`, or None (runs saved before checksums existed)."""
    path = checksum_path(directory, step)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"checkpoint step {step}: its checksum file {path} cannot be read ({error})."
        ) from None


def _prune_checksums(manager) -> None:
    """Removes the checksum files of steps orbax no longer keeps (or never finished)."""
    directory = str(manager.directory)
    kept = set(manager.all_steps())
    for name in os.listdir(directory):
        if name.endswith(CHECKSUM_SUFFIX) and name[: -len(CHECKSUM_SUFFIX)].isdigit():
            if int(name[: -len(CHECKSUM_SUFFIX)]) not in kept:
                os.remove(os.path.join(directory, name))


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


def save(manager, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves a host (unreplicated) state and the data position at `step`, with its checksum.

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
            _prune_checksums(manager)
            path = checksum_path(directory, step)
            with open(path + ".tmp", "w") as f:
                json.dump({"step": int(step), **state_digest(state, data_state)}, f)
            os.replace(path + ".tmp", path)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )
        return manager.save(int(step), args=args, force=force)
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


def restore_newest_intact(manager, template: Any, workdir: str) -> tuple[tuple | None, list]:
    """Restores the newest step that reads back intact (see `restore`).

    Each corrupt step is logged (path and cause) and skipped; a step whose
    arrays do not fit `template` stops the search (`check_state_matches`).

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
