"""One writer per workdir: the lock a training run holds on its `--workdir`.

`WorkdirLock(workdir)` (a context manager) takes an exclusive `fcntl.flock`
on `<workdir>/.tusk_jax.lock` without waiting, and writes the holder (host,
pid, start time) into the file as JSON for the message another run gets:

    tusk_jax.main: /runs/t is in use by another training run (host h1, pid 4242, started
    2025-01-01 12:00:00); one run writes to a workdir at a time: wait for it to end, stop it, or
    use another --workdir.

The operating system releases a flock when its process dies however it dies
(SIGKILL included), so a lock never outlives its run: a record left in the
file by a run that ended without releasing it (killed, `os._exit`) is stale,
reported with a warning and taken over. A clean release empties the record;
the file itself stays (removing it would let two runs lock two different
files). Where the filesystem has no flock (`ENOLCK`, `EOPNOTSUPP`), the
record alone decides: a holder on this host whose pid is no longer alive is
stale, any other holder is refused.

Only training takes the lock (`tusk_jax.train.fit`, on process 0 of a
multi-process run); evaluate, detect, export and learning_curve only read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from absl import logging

from tusk_jax import checkpoint_integrity

LOCK_FILE = ".tusk_jax.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
# Locks this process holds, released (record emptied) by `release_all` before a hard exit.
_HELD: list[WorkdirLock] = []


class WorkdirBusyError(RuntimeError):
    """Another live training run holds the workdir's lock; names the holder."""


def lock_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _describe(record: dict) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {when}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, another user's.
        return True
    return True


class WorkdirLock:
    """Exclusive, non-blocking lock of a training workdir (see the module docstring).

    `acquire()` creates the workdir if needed (after `check_writable`, so an
    unwritable folder gets that one-line error) and raises
    `WorkdirBusyError` when a live run holds it. `release()` empties the
    record and drops the lock; both are idempotent.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = lock_path(workdir)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def _busy(self, record: dict) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.workdir} is in use by another training run ({_describe(record)}); one run "
            "writes to a workdir at a time: wait for it to end, stop it, or use another --workdir."
        )

    def acquire(self) -> None:
        checkpoint_integrity.check_writable(self.workdir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            record = _read_record(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(record) from None
            except OSError as error:
                if error.errno not in _NO_FLOCK:
                    raise
                logging.warning(
                    "%s: this filesystem has no file locks (%s); the lock relies on its record.",
                    self.path,
                    os.strerror(error.errno),
                )
                if record and not _stale_without_flock(record):
                    raise self._busy(record) from None
            record = _read_record(fd)  # Re-read under the lock: the holder may just have left.
            if record:
                logging.warning(
                    "Taking over the lock of %s left by a run that ended without releasing it "
                    "(%s; no longer running).",
                    self.workdir,
                    _describe(record),
                )
            mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(mine).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.append(self)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError as error:  # A full or read-only disk: the flock still goes with the fd.
            logging.debug("Emptying %s failed: %s", self.path, error)
        os.close(fd)
        if self in _HELD:
            _HELD.remove(self)


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _stale_without_flock(record: dict) -> bool:
    """Without flock: stale only when the holder ran on this host and its pid is gone."""
    if record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid)


def release_all() -> None:
    """Releases every lock this process holds (before `os._exit`, which skips cleanup)."""
    for lock in list(_HELD):
        lock.release()
