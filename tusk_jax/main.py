"""Trains TUSK: `python -m tusk_jax.main --config=configs/tetrominoes.py --workdir=DIR`.

Flags only; the work is `tusk_jax.train.fit`. The same command
runs as one process on all local devices, or as one of N processes (see
`launch/README.md`):

  python -m tusk_jax.main --config=... --workdir=SHARED_DIR \\
      --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

or with no extra flag inside a multi-task SLURM step / Open MPI job, or with
`--distributed=cluster` on every Cloud TPU VM worker (JAX reads the cluster
from the environment). `tusk_jax.distributed` owns that start-up.

Errors a user can fix (a config field, a refused config change, a folder that
cannot be written, no intact checkpoint, a NaN) end the process with one line
`tusk_jax.main: ...` and exit status 1, not a traceback. The console shows the
progress bar and tusk_jax's messages; the INFO lines of the libraries (orbax,
JAX, ...) appear with `--verbosity=1`.
"""

import errno
import logging as python_logging
import os
import sys
import threading

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tusk_jax import config_files, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tetrominoes.py:cpu.", lock_config=True
)
flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, metrics and summaries go (multi-host runs: a folder every host sees).",
)
flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
    "auto: multi-process when the three flags below are given or a multi-task SLURM / Open "
    "MPI job is detected; cluster: always jax.distributed.initialize() (Cloud TPU VMs); "
    "off: one process.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, e.g. 127.0.0.1:12345 (multi-process)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a run with config values that change what it trains (window, K, image size, "
    "losses, data, ...); the changes are recorded in <workdir>/config_changes.jsonl. "
    "Changes of array shapes are refused regardless.",
)
flags.mark_flags_as_required(["config", "workdir"])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _ProjectInfoOnly(python_logging.Filter):
    """Lets through tusk_jax's lines and the warnings of other libraries.

    Orbax's own error reports are left out too: tusk_jax turns a failed save
    into one `CheckpointWriteError` (they are shown with --verbosity=1).
    """

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE_DIR):
            return True
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return record.levelno >= python_logging.CRITICAL
        return record.levelno >= python_logging.WARNING


def _is_write_error(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno in (
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    )


def quiet_library_logs() -> None:
    """Hides the INFO lines of orbax, JAX and other libraries (shown with --verbosity=1).

    Also keeps the background threads of the writers (TensorBoard, orbax)
    from printing a traceback each for a full or read-only disk: the main
    thread reports that once.
    """
    if FLAGS.verbosity >= 1:
        return
    logging.get_absl_handler().addFilter(_ProjectInfoOnly())
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (config file, unknown field, flag)."""
    return config_files.parse_flags("tusk_jax.main", argv, FLAGS)


def main(argv):
    try:
        _main(argv)
    except KeyboardInterrupt:
        sys.exit("tusk_jax.main: interrupted; the checkpoints saved are kept.")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir.strip():
        sys.exit("tusk_jax.main: --workdir is empty: name the run's folder (created if needed).")
    quiet_library_logs()
    try:
        distributed.initialize(
            FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
        # Imported after the runtime started: importing the ops creates JAX arrays,
        # which starts a single-process backend that jax.distributed cannot join.
        from tusk_jax import config_lib

        config_lib.check_batch_split(FLAGS.config.train.batch_size)
    except ValueError as error:
        sys.exit(f"tusk_jax.main: {error}")
    if jax.process_index() != 0:
        # Logs from process 0 only (warnings and errors from every process).
        logging.set_verbosity(logging.WARNING)
    logging.info("JAX %s", distributed.describe())
    logging.info("Config:\n%s", FLAGS.config)
    from tusk_jax import checkpointing, datasets, train

    try:
        train.fit(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
    except (
        config_lib.ConfigError,
        checkpointing.CheckpointError,
        checkpointing.CheckpointMismatchError,
        datasets.DataFileError,
        train.NonFiniteError,
    ) as error:
        sys.exit(f"tusk_jax.main: {error}")
    except OSError as error:
        if error.errno not in checkpointing.WRITE_ERRNOS:
            raise
        sys.exit(
            f"tusk_jax.main: cannot write {error.filename or FLAGS.workdir}: {error.strerror} "
            f"({errno.errorcode.get(error.errno, error.errno)})."
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
