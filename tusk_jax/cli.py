"""What every command line of tusk_jax shares: logging, the config it reports, its last line.

Each `main(argv)` (`tusk_jax.main`, `evaluate`, `detect`, `export`,
`learning_curve`, `convert_release`, ...) calls `start(argv)` first; absl's
`app.run` stays the entry. The console then shows tusk_jax's own lines and
the warnings of other libraries, each identical library warning once; the
INFO lines of the libraries (orbax, JAX, tfds, ...) appear with absl's
`--verbosity=1`, which also turns the filters below off; their DEBUG lines
(thousands per command) only with `--verbosity=2`.

Importing this module imports no JAX array code (`tusk_jax.main` imports it
before `jax.distributed` starts).
"""

import logging as python_logging
import os
import shlex
import sys
import threading
from collections.abc import Sequence

import ml_collections
from absl import app, flags, logging

from tusk_jax.checkpoint_integrity import WRITE_ERRNOS

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_project_line(record: python_logging.LogRecord) -> bool:
    return record.pathname.startswith(_PACKAGE_DIR)


class _ProjectInfoOnly(python_logging.Filter):
    """Lets through tusk_jax's lines and the warnings of other libraries.

    Orbax's own error reports are left out too: tusk_jax turns a failed save
    into one `CheckpointWriteError` (they are shown with --verbosity=1).
    """

    def filter(self, record: python_logging.LogRecord) -> bool:
        if _is_project_line(record):
            return True
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return record.levelno >= python_logging.CRITICAL
        return record.levelno >= python_logging.WARNING


class _LibraryLinesOnce(python_logging.Filter):
    """Drops a library's line identical (level and text) to one it already showed.

    tusk_jax's own lines always pass: a repeated one says something happened again.
    """

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[int, str]] = set()

    def filter(self, record: python_logging.LogRecord) -> bool:
        if _is_project_line(record):
            return True
        key = (record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class _NoLibraryDebug(python_logging.Filter):
    """`--verbosity=1`: the libraries' INFO lines but not their DEBUG lines.

    absl maps verbosity 1 to Python's DEBUG level for every logger; the
    libraries' DEBUG lines are left for `--verbosity=2`.
    """

    def filter(self, record: python_logging.LogRecord) -> bool:
        return _is_project_line(record) or record.levelno >= python_logging.INFO


def _is_write_error(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno in WRITE_ERRNOS


def setup_logging(verbosity: int | None = None) -> None:
    """Hides the INFO lines of orbax, JAX and other libraries (shown with --verbosity=1).

    Their DEBUG lines are shown with --verbosity=2 only.

    Also shows each identical library line once, and keeps the background
    threads of the writers (TensorBoard, orbax) from printing a traceback each
    for a full or read-only disk: the main thread reports that once. Call it
    once per process, after the flags are parsed.

    Args:
      verbosity: absl's verbosity; default: the parsed `--verbosity` flag.
    """
    if verbosity is None:
        verbosity = flags.FLAGS.verbosity
    if verbosity >= 2:
        return
    handler = logging.get_absl_handler()
    if verbosity == 1:
        handler.addFilter(_NoLibraryDebug())
        return
    handler.addFilter(_ProjectInfoOnly())
    handler.addFilter(_LibraryLinesOnce())
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def quiet_thread_hook(args):
        if _is_write_error(args.exc_value):
            logging.debug("Write error in thread %s: %s", args.thread, args.exc_value)
        else:
            thread_hook(args)

    def quiet_unraisable_hook(args):
        value = args.exc_value
        # Also the callbacks of tensorstore reads/writes still pending when a
        # failed save or restore closed orbax's event loop: one traceback each.
        if _is_write_error(value) or (
            isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        ):
            logging.debug("Ignored in %s: %s", args.object, value)
        else:
            unraisable_hook(args)

    threading.excepthook = quiet_thread_hook
    sys.unraisablehook = quiet_unraisable_hook


def start(argv: Sequence[str]) -> None:
    """What each command's `main(argv)` does first: refuses stray arguments, sets up logging."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
    setup_logging()


def config_summary(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The fields of `config` that differ from the base defaults, and where the full config is.

    Returns:
      A header line and one line per field, `  model.window: 11 (default 27)`
      (values as `config.json` stores them), e.g. for `tusk_jax.main` to log.
    """
    # Imported here: config_lib imports the ops (JAX arrays), which must wait
    # for jax.distributed in tusk_jax.main.
    from tusk_jax import config_lib

    path = os.path.join(workdir, config_lib.CONFIG_FILE)
    defaults = config_lib.base_defaults()
    if defaults is None:
        return f"Config: the full config is written to {path}."
    changes = config_lib.config_changes(defaults, config)
    lines = [
        f"  {field}: {new!r}" + ("" if old == "<missing>" else f" (default {old!r})")
        for field, old, new, _ in changes
    ]
    return "\n".join(
        [
            f"Config: {len(changes)} fields differ from the base defaults "
            f"(the full config: {path}):",
            *lines,
        ]
    )


def finished_line(workdir: str, step: int) -> str:
    """The last line of a finished training run: the workdir, the step and what to run next."""
    quoted = shlex.quote(workdir)
    return (
        f"done: {workdir} at step {step}; next: "
        f"python -m tusk_jax.evaluate --workdir={quoted} | "
        f"python -m tusk_jax.detect --workdir={quoted} --input='IMAGES/*.png' "
        "--output=DETECTIONS | "
        f"python -m tusk_jax.export --workdir={quoted} --output=EXPORTED"
    )
