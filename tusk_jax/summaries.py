"""Metric and image summaries of a run: JSON lines and TensorBoard event files.

Only process 0 writes (`jax.process_index() == 0`); other processes get a
writer that does nothing, so callers never branch on the process.
TensorBoard files are written with tensorboardX (no TensorFlow).
"""

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


class SummaryWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and scalars + images to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter as TensorBoardWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One JSON line `{"step": step, name: value, ...}` and one TB scalar per name."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(name, value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each `[H, W, 3]` uint8 image as a TensorBoard image summary."""
        if not self.enabled:
            return
        for name, image in images.items():
            self._tb.add_image(name, np.asarray(image), int(step), dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`, in order (for notebooks and tests)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
