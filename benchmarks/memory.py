r"""Device memory of the compiled training step, from XLA, and the largest batch that fits.

  python benchmarks/memory.py                          # every paper config, markdown table
  python benchmarks/memory.py --configs=tetrominoes,clevr6 --json_out=/tmp/memory.json
  python benchmarks/memory.py --variant=test --configs=tetrominoes   # a smoke run

For each paper config (`configs/<name>.py`, no variant) the training step
(`tusk_jax.step.train_step` under `pmap` on one device: TPS pairs, the
encoder/decoder step, the prototype steps) is lowered and compiled for two
per-device batches, without running it, and XLA's `compiled.memory_analysis()`
gives its buffers: arguments (state, images), outputs, aliased (donated)
bytes and temporaries. The peak is arguments + outputs - aliased +
temporaries, in GB (10^9 bytes). Memory grows linearly with the batch
(activations), so two compiles give the fixed part (parameters, optimizer
state, constants) and the bytes per pair; from them, the peak at the release's
per-device batch (`RELEASE_DEVICES`: the release trained on 2 GPUs, MNIST on
one) and the largest per-device batch that fits in 16, 40 and 80 GB.

On a CPU the analysis is XLA:CPU's buffer assignment; a GPU or TPU compile of
the same program assigns buffers in its own way (fusion, layouts, cuDNN
workspaces), so treat the figures as estimates until `benchmarks/accelerator.sh`
measures them on the device. The perceptual loss (CelebA) needs VGG16 weights:
random ones of the right shapes are used (memory does not depend on values).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from tusk_jax import models, perceptual  # noqa: E402
from tusk_jax import state as state_lib  # noqa: E402
from tusk_jax import step as step_lib  # noqa: E402

PAPER_CONFIGS = ("mnist_hard", "tetrominoes", "clevr6", "celeba", "h36m")
# Data-parallel workers of the release's runs: the paper config's global batch
# divided by this is the per-device batch it trained with.
RELEASE_DEVICES = {"mnist_hard": 1, "tetrominoes": 2, "clevr6": 2, "celeba": 2, "h36m": 2}
BUDGETS_GB = (16, 40, 80)
PROBE_BATCHES = (2, 4)  # Per-device pairs compiled to fit the linear model.


def step_memory_bytes(config: ml_collections.ConfigDict, per_device_batch: int) -> dict:
    """XLA's buffer sizes (bytes) of the training step compiled for one device.

    Args:
      config: a TUSK config (not modified).
      per_device_batch: pairs on the device.

    Returns:
      dict with `argument`, `output`, `alias`, `temp` and `peak` bytes.
    """
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.batch_size = per_device_batch
    model = models.create_model(config)
    state = jax.eval_shape(lambda: state_lib.create_train_state(config, model))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), state)
    size = int(config.dataset.image_size)
    images = jax.ShapeDtypeStruct((1, per_device_batch, size, size, 3), np.float32)
    vgg = None
    if config.loss.recon == "perceptual":
        vgg = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((1, *np.shape(x)), np.asarray(x).dtype),
            perceptual.init_vgg16_params(jax.random.PRNGKey(0)),
        )
    step = step_lib.make_p_train_step(config, model)
    analysis = step.lower(state, images, vgg).compile().memory_analysis()
    sizes = {
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
    }
    sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return sizes


def largest_batch(fixed: float, per_pair: float, budget: float) -> int:
    """The largest integer b with fixed + b per_pair <= budget (0 if none fits)."""
    if per_pair <= 0:
        raise ValueError(f"per_pair must be > 0, got {per_pair}.")
    return max(0, math.floor((budget - fixed) / per_pair))


def config_memory(
    name: str, variant: str | None = None, probes: tuple[int, int] = PROBE_BATCHES
) -> dict:
    """The memory figures of `configs/<name>.py` (the paper's settings unless `variant`).

    Returns:
      dict: `config`, `setting`, `per_device_batch` (the release's), `fixed_gb`,
      `per_pair_mb`, `peak_gb` at that batch, `max_batch` {budget GB: pairs},
      `probes` {batch: peak bytes}.
    """
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    low, high = probes
    peaks = {b: step_memory_bytes(config, b)["peak"] for b in probes}
    per_pair = (peaks[high] - peaks[low]) / (high - low)
    fixed = peaks[low] - low * per_pair
    per_device = max(1, int(config.train.batch_size) // RELEASE_DEVICES[name])
    m = config.model
    size = int(config.dataset.image_size)
    return {
        "config": name,
        "setting": (
            f"{size}x{size} K={m.num_keypoints} M={m.num_prototypes} width={m.base_width} "
            f"{m.decoder_mode} {config.loss.recon}"
        ),
        "per_device_batch": per_device,
        "fixed_gb": fixed / 1e9,
        "per_pair_mb": per_pair / 1e6,
        "peak_gb": (fixed + per_device * per_pair) / 1e9,
        "max_batch": {str(gb): largest_batch(fixed, per_pair, gb * 1e9) for gb in BUDGETS_GB},
        "probes": {str(b): int(p) for b, p in peaks.items()},
        "backend": jax.default_backend(),
    }


def markdown_table(rows: list[dict]) -> str:
    """The figures as a markdown table (one row per config)."""
    budgets = " | ".join(f"max pairs/device in {gb} GB" for gb in BUDGETS_GB)
    lines = [
        f"| config | setting | release's pairs/device | peak at it (GB) | fixed (GB) | "
        f"per pair (MB) | {budgets} |",
        "|" + "---|" * (6 + len(BUDGETS_GB)),
    ]
    for r in rows:
        fits = " | ".join(str(r["max_batch"][str(gb)]) for gb in BUDGETS_GB)
        lines.append(
            f"| `configs/{r['config']}.py` | {r['setting']} | {r['per_device_batch']} | "
            f"{r['peak_gb']:.3g} | {r['fixed_gb']:.3g} | {r['per_pair_mb']:.3g} | {fits} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    names = flags.FLAGS.configs
    unknown = sorted(set(names) - set(PAPER_CONFIGS))
    if unknown:
        raise app.UsageError(f"--configs: unknown {unknown}; valid: {', '.join(PAPER_CONFIGS)}.")
    rows = [config_memory(name, flags.FLAGS.variant or None) for name in names]
    print(markdown_table(rows))
    if flags.FLAGS.json_out:
        with open(flags.FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    # Flags only for the command line: importing this module defines none.
    flags.DEFINE_list("configs", list(PAPER_CONFIGS), "Paper configs to analyse.")
    flags.DEFINE_string("json_out", None, "Also write the figures as JSON to this file.")
    flags.DEFINE_string("variant", "", "Config variant ('' = the paper's settings, cpu, test).")
    app.run(main)
