r"""Step time of the real training loop with a slow host iterator, with and without prefetching.

  python benchmarks/prefetch.py                                   # Tetrominoes :cpu, 400 ms delay
  python benchmarks/prefetch.py --config=configs/mnist_hard.py:cpu --delay_ms=1500
  python benchmarks/prefetch.py --config=configs/tetrominoes.py:test --steps=20 --delay_ms=20

`tusk_jax.train.fit` runs three times on the config, each in a fresh
workdir, with the input pipeline replaced by in-memory random batches of the
config's shape whose `next()` first sleeps (the host's decode or read time):

- `no delay`: the step time of the loop itself;
- `delay, train.prefetch_to_device=0`: each batch is read in the loop's
  thread, so a step costs about step + delay;
- `delay, train.prefetch_to_device=2` (the default): a background thread
  reads and copies ahead, so the step time stays that of `no delay` as long
  as the delay is below it.

The figure is the median of the loop's own `steps_per_second` over the
log intervals after the first (which holds the compile), as
`metrics.jsonl` records it. A sleeping thread costs no CPU, so on a CPU
"device" the overlap is the same as on a GPU or TPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from tusk_jax import config_lib, input_pipeline, summaries, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tetrominoes.py:cpu", "Config file[:variant]; --config.x=y overrides."
)
_DELAY_MS = flags.DEFINE_float("delay_ms", 400.0, "Host time per batch (sleep), ms.")
_STEPS = flags.DEFINE_integer(
    "steps", 40, "Training steps per run (the first interval is dropped)."
)
_LOG_EVERY = flags.DEFINE_integer("log_every", 5, "Steps per timed interval.")


class SlowIterator:
    """Random batches of the config's shape; `next()` sleeps `delay_s` first (host work)."""

    def __init__(self, config, delay_s: float):
        import jax

        devices = jax.local_device_count()
        per_device = config_lib.check_batch_split(config.train.batch_size)
        size = config.dataset.image_size
        rng = np.random.default_rng(0)
        self._batches = [
            rng.uniform(size=(devices, per_device, size, size, 3)).astype(np.float32)
            for _ in range(4)
        ]
        self._delay_s = delay_s
        self._position = 0

    def __next__(self) -> np.ndarray:
        time.sleep(self._delay_s)
        self._position += 1
        return self._batches[self._position % len(self._batches)].copy()

    def get_state(self) -> dict:
        return {"position": self._position}

    def set_state(self, state: dict) -> None:
        self._position = int(state["position"])

    def close(self) -> None:
        pass


def loop_step_ms(config, delay_s: float, prefetch: int) -> float:
    """Median ms per step of `train.fit` on `SlowIterator(delay_s)` with `prefetch`."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.num_steps = _STEPS.value
        config.train.log_every = _LOG_EVERY.value
        config.train.image_every = 10**9
        config.train.checkpoint_every = 10**9
        config.train.prefetch_to_device = prefetch
    original = input_pipeline.create_train_iterator
    input_pipeline.create_train_iterator = lambda cfg: SlowIterator(cfg, delay_s)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            train.fit(config, workdir)
            records = summaries.read_metrics(workdir)
    finally:
        input_pipeline.create_train_iterator = original
    rates = [r["steps_per_second"] for r in records[1:] if "steps_per_second" in r]
    if not rates:
        raise ValueError(f"--steps={_STEPS.value} gives no timed interval after the first")
    return 1000.0 / float(np.median(rates))


def run(argv):
    del argv
    config = _CONFIG.value
    name = flags.FLAGS["config"].config_filename
    delay = _DELAY_MS.value / 1000.0
    rows = [
        ("no delay", 0.0, 0),
        (f"{_DELAY_MS.value:.0f} ms delay, train.prefetch_to_device=0", delay, 0),
        (f"{_DELAY_MS.value:.0f} ms delay, train.prefetch_to_device=2", delay, 2),
    ]
    print(f"{name}: train.fit, {_STEPS.value} steps, median over {_LOG_EVERY.value}-step intervals")
    print("| host iterator | ms per step |\n|---|---|")
    for name, delay_s, prefetch in rows:
        print(f"| {name} | {loop_step_ms(config, delay_s, prefetch):.0f} |", flush=True)


if __name__ == "__main__":
    app.run(run)
