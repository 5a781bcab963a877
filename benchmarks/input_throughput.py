r"""Command line: measure the input pipeline's throughput (examples per second).

  python benchmarks/input_throughput.py --dataset=tetrominoes --batch_size=76
  python benchmarks/input_throughput.py --dataset=mnist_hard --streamed

Times the train iterator
(`--steps` batches after the first, which includes loading) and one pass of
the eval iterator, with the same dataset flags as
`tusk_jax.datasets.prepare`. `--streamed` forces the array_record
data-source path instead of the in-memory one.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, ".")  # configs/ from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tusk_jax import input_pipeline  # noqa: E402
from tusk_jax.datasets import prepare  # noqa: E402

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global training batch (images).")
_STEPS = flags.DEFINE_integer("steps", 200, "Training batches timed.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 5000, "Eval examples timed (<= split).")
_STREAMED = flags.DEFINE_bool("streamed", False, "Read batches from the data source.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = prepare.config_from_flags()
    config.train.batch_size = _BATCH_SIZE.value
    config.dataset.num_eval_examples = _EVAL_EXAMPLES.value
    if _STREAMED.value:
        input_pipeline.IN_MEMORY_BYTES = 0
    name = config.dataset.name

    start = time.perf_counter()
    iterator = input_pipeline.create_train_iterator(config)
    first = next(iterator)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        next(iterator)
    elapsed = time.perf_counter() - start
    per_step = first.shape[0] * first.shape[1]
    print(
        f"{name} train: first batch {setup:.1f} s (incl. loading), then "
        f"{_STEPS.value * per_step / elapsed:,.0f} images/s ({1000 * elapsed / _STEPS.value:.1f} "
        f"ms per batch of {per_step}, shape {first.shape})"
    )
    start = time.perf_counter()
    count = 0
    for batch in itertools.islice(input_pipeline.create_eval_iterator(config, "test", 100), None):
        count += int(batch["valid"].sum())
    elapsed = time.perf_counter() - start
    print(f"{name} eval: {count / elapsed:,.0f} examples/s with ground truth ({count} examples)")


if __name__ == "__main__":
    app.run(main)
