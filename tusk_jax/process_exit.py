"""Ending the training process at once, whatever its background threads are doing.

Used only where tusk_jax owns the process (`python -m tusk_jax.main`, i.e.
`train.fit(..., command_line=True)`), never in a notebook or a test process:

- `exit_now(code, line)`: prints `line`, flushes stdout / stderr, releases
  the workdir lock (`workdir_lock.release_all`) and calls `os._exit(code)`.
  Nothing else runs: no Python finalisation (whose teardown, with XLA's
  threads still running, is where a KeyboardInterrupt raised inside JAX
  ended in a segmentation fault), no join of a stuck writer thread. It is
  as safe as SIGKILL, which every moment of a run survives (checkpoints are
  written to a temporary folder and renamed; tests/test_faults_kill.py).
- `exit_within(code, seconds)`: arms a daemon thread that calls `exit_now`
  if the process is still alive `seconds` later. Armed when an error starts
  to unwind the run, so neither the clean-up nor the interpreter's join of
  non-daemon threads (orbax's `async_save`, a thread pool) can keep a
  crashed run alive: it exits non-zero within `EXIT_GRACE_S`.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tusk_jax import workdir_lock

# Seconds an erroring run gets to clean up (a save in flight, summaries)
# before it is ended regardless.
EXIT_GRACE_S = 10.0


def exit_now(code: int, line: str | None = None) -> None:
    """Prints `line` (stderr), flushes, releases the workdir lock and `os._exit(code)`."""
    try:
        if line:
            sys.stderr.write(line.rstrip("\n") + "\n")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        workdir_lock.release_all()
    finally:
        os._exit(code)


def exit_within(code: int, seconds: float = EXIT_GRACE_S) -> None:
    """Ends the process with `code` after `seconds` unless it has exited by then."""

    def watchdog():
        time.sleep(seconds)
        others = sorted(
            t.name
            for t in threading.enumerate()
            if not t.daemon and t is not threading.main_thread()
        )
        exit_now(
            code,
            f"tusk_jax.main: still running {seconds:.0f} s after the error "
            f"(threads: {', '.join(others) or 'main'}); exiting without waiting for them.",
        )

    threading.Thread(target=watchdog, name="tusk_jax-exit-watchdog", daemon=True).start()
