"""Trains TUSK: `python -m tusk_jax.main --config=configs/tetrominoes.py --workdir=DIR`.

Flags only; the work is `tusk_jax.train.train_and_evaluate`.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tusk_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tetrominoes.py:cpu.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and summaries go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.info(
        "JAX process %d/%d, local devices %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
    )
    logging.info("Config:\n%s", FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
