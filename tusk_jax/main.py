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
cannot be written, a workdir another run is writing to, a checkpoint of
another run, no intact checkpoint, a NaN) end the process with one line
`tusk_jax.main: ...` and exit status 1, not a traceback; any other error
exits with status 1 within `process_exit.EXIT_GRACE_S` s, whatever its
background threads do. Exit status 0: finished, or stopped by SIGTERM /
Ctrl-C (step saved, or nothing to save before the first step); 130: a second
Ctrl-C (stopped at once without saving). The console shows the
progress bar and tusk_jax's messages; the INFO lines of the libraries (orbax,
JAX, ...) appear with `--verbosity=1`.
"""

import errno
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tusk_jax import cli, config_files, distributed

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
flags.DEFINE_bool(
    "adopt_checkpoint",
    False,
    "Resume from a checkpoint step saved by another run (a copied step folder, refused "
    "otherwise); the adoption is recorded in <workdir>/config.json.",
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (config file, unknown field, flag)."""
    return config_files.parse_flags("tusk_jax.main", argv, FLAGS)


def main(argv):
    try:
        _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the run's own signal handling started.
        print("tusk_jax.main: interrupted; the checkpoints saved are kept.", file=sys.stderr)
        sys.exit(130)
    from tusk_jax import process_exit

    process_exit.exit_within(0)  # A writer thread that never ends cannot keep the process.


def _main(argv):
    cli.start(argv)
    if not FLAGS.workdir.strip():
        sys.exit("tusk_jax.main: --workdir is empty: name the run's folder (created if needed).")
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
    logging.info("%s", cli.config_summary(FLAGS.config, FLAGS.workdir))
    from tusk_jax import checkpointing, datasets, train, workdir_lock

    try:
        state = train.fit(
            FLAGS.config,
            FLAGS.workdir,
            FLAGS.allow_config_change,
            adopt_checkpoint=FLAGS.adopt_checkpoint,
            command_line=True,
        )
    except (
        config_lib.ConfigError,
        checkpointing.CheckpointError,
        checkpointing.CheckpointMismatchError,
        datasets.DataFileError,
        train.NonFiniteError,
        workdir_lock.WorkdirBusyError,
    ) as error:
        sys.exit(f"tusk_jax.main: {error}")
    except OSError as error:
        if error.errno not in checkpointing.WRITE_ERRNOS:
            raise
        sys.exit(
            f"tusk_jax.main: cannot write {error.filename or FLAGS.workdir}: {error.strerror} "
            f"({errno.errorcode.get(error.errno, error.errno)})."
        )
    if jax.process_index() == 0 and int(state.step) >= FLAGS.config.train.num_steps:
        print(cli.finished_line(FLAGS.workdir, int(state.step)))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
