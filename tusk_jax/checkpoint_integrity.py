"""Checkpoint integrity: errors, write-error reporting, writability and SHA-256 checksums.

`tusk_jax.checkpointing` re-exports these names; it is the module to use.
"""

import errno
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

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


def prune_checksums(manager) -> None:
    """Removes the checksum files of steps orbax no longer keeps (or never finished)."""
    directory = str(manager.directory)
    kept = set(manager.all_steps())
    for name in os.listdir(directory):
        if name.endswith(CHECKSUM_SUFFIX) and name[: -len(CHECKSUM_SUFFIX)].isdigit():
            if int(name[: -len(CHECKSUM_SUFFIX)]) not in kept:
                os.remove(os.path.join(directory, name))
