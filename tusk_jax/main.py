"""Trains TUSK: `python -m tusk_jax.main --config=configs/tetrominoes.py --workdir=DIR`.

Flags only; the work is `tusk_jax.train.train_and_evaluate`. The same command
runs as one process on all local devices, or as one of N processes (see
`launch/README.md`):

  python -m tusk_jax.main --config=... --workdir=SHARED_DIR \\
      --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

or with no extra flag inside a multi-task SLURM step / Open MPI job, or with
`--distributed=cluster` on every Cloud TPU VM worker (JAX reads the cluster
from the environment). `tusk_jax.distributed` owns that start-up.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tusk_jax import distributed

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        distributed.initialize(
            FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
        distributed.check_batch_split(FLAGS.config.train.batch_size)
    except ValueError as error:
        sys.exit(f"tusk_jax.main: {error}")
    if jax.process_index() != 0:
        # Logs from process 0 only (warnings and errors from every process).
        logging.set_verbosity(logging.WARNING)
    logging.info("JAX %s", distributed.describe())
    logging.info("Config:\n%s", FLAGS.config)
    # Imported after the runtime started: importing the ops creates JAX arrays,
    # which starts a single-process backend that jax.distributed cannot join.
    from tusk_jax import train

    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
