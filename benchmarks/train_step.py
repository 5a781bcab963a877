"""Times the TUSK training iteration: compile time, ms/iteration, pairs/s, peak memory.

  python benchmarks/train_step.py --config=configs/mnist_hard.py --batch_size=4
  python benchmarks/train_step.py --config=configs/tetrominoes.py --batch_size=2

One iteration = TPS pair making + one encoder/decoder Adam step + its
`num_prototype_steps` prototype steps, exactly `tusk_jax.step.train_step`
over all local devices. A pair is the two images (I1, I2) made from one
input image; `--batch_size` counts pairs (global). Inputs are random images
already in memory: this measures the step, not the input pipeline
(`python benchmarks/input_throughput.py` does that). Prints one line per run.

`time_train_step(config, batch_size, iterations)` is the measurement itself,
imported by `benchmarks/run_all.py`.
"""

import os
import resource
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, ".")  # configs/ from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tusk_jax import models  # noqa: E402
from tusk_jax import state as state_lib  # noqa: E402
from tusk_jax import step as step_lib  # noqa: E402


def peak_memory_mb() -> float:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_setting(config: ml_collections.ConfigDict) -> str:
    """`"mnist_hard: 80x80 K=9 M=10 window=13 plain proto_steps=8 pairs=4 devices=1 cpu"`."""
    m = config.model
    size = config.dataset.image_size
    return (
        f"{config.dataset.name}: {size}x{size} K={m.num_keypoints} M={m.num_prototypes} "
        f"window={m.window} {m.decoder_mode} proto_steps={config.train.num_prototype_steps} "
        f"pairs={config.train.batch_size} devices={jax.local_device_count()} "
        f"{jax.default_backend()}"
    )


def time_train_step(
    config: ml_collections.ConfigDict, batch_size: int | None = None, iterations: int = 10
) -> dict:
    """Compiles and times `step.make_p_train_step(config, ...)` on random images.

    Args:
      config: a TUSK config (not modified).
      batch_size: global pairs per iteration (None: `config.train.batch_size`);
        must be a multiple of the local device count.
      iterations: timed iterations after the compiling one (>= 1).

    Returns:
      dict: `setting` (see `describe_setting`), `pairs` (int), `compile_seconds`
      (compile + first step, s), `seconds_per_iteration` (s), `pairs_per_second`.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if batch_size:
            config.train.batch_size = batch_size
    devices = jax.local_device_count()
    pairs = int(config.train.batch_size)
    if pairs % devices:
        raise ValueError(
            f"batch_size={pairs} pairs must be a multiple of the {devices} local devices."
        )
    model = models.create_model(config)
    state = state_lib.replicate(state_lib.create_train_state(config, model))
    step = step_lib.make_p_train_step(config, model)
    size = config.dataset.image_size
    rng = np.random.default_rng(0)
    batches = [
        rng.uniform(size=(devices, pairs // devices, size, size, 3)).astype(np.float32)
        for _ in range(2)
    ]
    start = time.perf_counter()
    state, metrics = step(state, batches[0], None)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(iterations):
        state, metrics = step(state, batches[i % 2], None)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / iterations
    return {
        "setting": describe_setting(config),
        "pairs": pairs,
        "compile_seconds": compile_seconds,
        "seconds_per_iteration": seconds,
        "pairs_per_second": pairs / seconds,
    }


def main(argv):
    del argv
    fv = flags.FLAGS
    result = time_train_step(fv.config, fv.batch_size, fv.iterations)
    seconds = result["seconds_per_iteration"]
    print(
        f"{result['setting']} | "
        f"compile+first {result['compile_seconds']:.1f} s | {1000 * seconds:.0f} ms/iteration | "
        f"{result['pairs_per_second']:.2f} pairs/s | peak {peak_memory_mb():.0f} MB"
    )


if __name__ == "__main__":
    # Flags only for the command line: importing this module defines none.
    config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/mnist_hard.py).")
    flags.DEFINE_integer("batch_size", None, "Global pairs per iteration (default: the config's).")
    flags.DEFINE_integer("iterations", 10, "Timed iterations after the compiling one.")
    app.run(main)
