"""Times the TUSK training iteration: compile time, ms/iteration, pairs/s, peak memory.

  python benchmarks/train_step.py --config=configs/mnist_hard.py --batch_size=4
  python benchmarks/train_step.py --config=configs/tetrominoes.py --batch_size=2

One iteration = TPS pair making + one encoder/decoder Adam step + its
`num_prototype_steps` prototype steps, exactly `tusk_jax.train.train_step`
over all local devices. A pair is the two images (I1, I2) made from one
input image; `--batch_size` counts pairs (global). Inputs are random images
already in memory: this measures the step, not the input pipeline
(`python -m tusk_jax.datasets.benchmark` does that). Prints one line per run.
"""

import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, ".")  # configs/ from the repository root

from tusk_jax import models, train  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/mnist_hard.py).")
flags.DEFINE_integer("batch_size", None, "Global pairs per iteration (default: the config's).")
flags.DEFINE_integer("iterations", 10, "Timed iterations after the compiling one.")
FLAGS = flags.FLAGS


def peak_memory_mb() -> float:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
    del argv
    config = FLAGS.config
    with config.unlocked():
        if FLAGS.batch_size:
            config.train.batch_size = FLAGS.batch_size
    train_config = config
    model = models.TUSK(train_config.model)
    state = train.replicate(train.create_train_state(train_config, model))
    step = train.make_p_train_step(train_config, model)
    devices = jax.local_device_count()
    size = train_config.dataset.image_size
    rng = np.random.default_rng(0)
    batches = [
        rng.uniform(size=(devices, train_config.train.batch_size // devices, size, size, 3)).astype(
            np.float32
        )
        for _ in range(2)
    ]
    start = time.perf_counter()
    state, metrics = step(state, batches[0], None)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(FLAGS.iterations):
        state, metrics = step(state, batches[i % 2], None)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / FLAGS.iterations
    m = train_config.model
    print(
        f"{train_config.dataset.name}: {size}x{size} K={m.num_keypoints} M={m.num_prototypes} "
        f"window={m.window} {m.decoder_mode} proto_steps={train_config.train.num_prototype_steps} "
        f"pairs={train_config.train.batch_size} devices={devices} {jax.default_backend()} | "
        f"compile+first {compile_seconds:.1f} s | {1000 * seconds:.0f} ms/iteration | "
        f"{train_config.train.batch_size / seconds:.2f} pairs/s | peak {peak_memory_mb():.0f} MB"
    )


if __name__ == "__main__":
    app.run(main)
