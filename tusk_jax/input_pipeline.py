"""Input pipeline: training batches of images and evaluation batches with ground truth.

This module owns how stored examples (`tusk_jax.datasets`) become arrays for
the training step and the metrics:

- `create_train_iterator(config)`: an endless, shuffled, deterministic
  stream of `float32 [local_devices, per_device_batch, H, W, 3]` images in
  [0, 1]. `config.train.batch_size` is the GLOBAL number of images per step.
  The order is a function of `config.seed` only: epoch e visits the split in
  the permutation `default_rng([seed, ORDER_TAG, e])`, epochs are chained,
  and global batch s is positions [s * G, (s + 1) * G) of that stream.
  Process p keeps the slice [p * L, (p + 1) * L) (L = local devices x
  per-device batch), so processes read only their own examples and the union
  over processes is the single-process batch in the same device order. The
  state is just the step: `get_state()` / `set_state()` resume exactly.
- `DevicePrefetcher(iterator, size)`: the training loop's view of that
  stream: a background thread reads the host batches and puts them on the
  local devices `size` batches ahead (`train.prefetch_to_device`), so
  neither the host's batch making nor the copy to the devices waits in the
  loop; resumable like the iterator it wraps.
- `create_eval_iterator(config, split)`: a finite pass in dataset order with
  every ground-truth field the metrics need (see the per-dataset
  `preprocess` functions), the last batch padded, `valid` False on padding.

Loader choice (measured, see tusk_jax/datasets/README.md): when a training
split's stored images fit in IN_MEMORY_BYTES and there is one process, they
are read once into a numpy array and batches are gathered from memory;
otherwise each batch is read from the array_record data source by index
with a background thread one batch ahead. Both give identical batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from tusk_jax import config_lib, datasets

ORDER_TAG = 0x7D5E  # Separates the data-order random stream from other uses of config.seed.
IN_MEMORY_BYTES = 2 << 30  # Stored training images up to this size are kept in memory.
PREFETCH = 2  # Batches read ahead by the background thread (data-source path).


def get_num_examples(config: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples of `split` of `config.dataset.name` (prepares it if needed)."""
    return len(datasets.data_source(config, split))


def _stack(examples: list[dict[str, np.ndarray]], keys=None) -> dict[str, np.ndarray]:
    keys = keys or examples[0].keys()
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in keys}


def _read(source, indices: np.ndarray, keys=None) -> dict[str, np.ndarray]:
    """Stored examples at `indices` (any order, repeats allowed), stacked."""
    examples = source.__getitems__([int(i) for i in indices])
    return _stack(examples, keys)


class TrainIterator:
    """Endless iterator of training image batches; resumable with get_state/set_state.

    Yields float32 [local_devices, per_device_batch, H, W, 3] in [0, 1].
    """

    def __init__(self, config: ml_collections.ConfigDict):
        global_batch = int(config.train.batch_size)
        self._per_device = config_lib.check_batch_split(global_batch, jax.device_count())
        self._local_devices = jax.local_device_count()
        self._local_batch = self._per_device * self._local_devices
        self._global_batch = global_batch
        self._process_index = jax.process_index()
        self._seed = int(config.seed)
        self._image_size = int(config.dataset.image_size)
        self._module = datasets.get_module(config.dataset.name)
        self._source = datasets.data_source(config, "train", image_only=True)
        self._num_examples = len(self._source)
        if self._num_examples == 0:
            raise ValueError(f"dataset {config.dataset.name!r}: the train split is empty")
        self._images = None
        example = self._source[0]["image"]
        stored_bytes = example.nbytes * self._num_examples
        if jax.process_count() == 1 and stored_bytes <= IN_MEMORY_BYTES:
            logging.info(
                "Train iterator: loading %d images (%.0f MB) into memory.",
                self._num_examples,
                stored_bytes / 2**20,
            )
            self._images = np.empty((self._num_examples, *example.shape), example.dtype)
            chunk = 4096
            for start in range(0, self._num_examples, chunk):
                stop = min(start + chunk, self._num_examples)
                self._images[start:stop] = _read(
                    self._source, np.arange(start, stop), keys=["image"]
                )["image"]
        else:
            logging.info("Train iterator: reading batches from %s.", self._source)
        self._executor = None
        self._pending = collections.deque()
        self._step = 0

    # -- order ---------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, ORDER_TAG, epoch])
        return rng.permutation(self._num_examples)

    def _indices(self, step: int) -> np.ndarray:
        """Example indices of this process's part of global batch `step`."""
        start = step * self._global_batch + self._process_index * self._local_batch
        positions = np.arange(start, start + self._local_batch)
        epochs = positions // self._num_examples
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._epoch_order(int(epoch))[positions[sel] % self._num_examples]
        return out

    def _make_batch(self, step: int) -> np.ndarray:
        indices = self._indices(step)
        if self._images is not None:
            stored = {"image": self._images[indices]}
        else:
            stored = _read(self._source, indices, keys=["image"])
        images = self._module.preprocess(stored, self._image_size, with_labels=False)["image"]
        return images.reshape(self._local_devices, self._per_device, *images.shape[1:])

    # -- iteration -----------------------------------------------------------
    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> np.ndarray:
        if self._images is not None:
            batch = self._make_batch(self._step)
        else:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1)
            next_step = self._step + len(self._pending)
            while len(self._pending) < PREFETCH + 1:
                self._pending.append(self._executor.submit(self._make_batch, next_step))
                next_step += 1
            batch = self._pending.popleft().result()
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position: the next global step to be yielded."""
        return {"step": self._step, "seed": self._seed, "num_examples": self._num_examples}

    def set_state(self, state: dict) -> None:
        """Moves to `state` (from get_state); the following batches are those seen after it."""
        if int(state.get("seed", self._seed)) != self._seed:
            raise ValueError(f"iterator state has seed {state['seed']}, config.seed={self._seed}")
        if int(state.get("num_examples", self._num_examples)) != self._num_examples:
            raise ValueError(
                f"iterator state was for {state['num_examples']} examples, the split has "
                f"{self._num_examples}"
            )
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._step = int(state["step"])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class _Failure:
    """An exception of the reading thread, raised again in the consumer's thread."""

    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Batches put on the local devices ahead of the loop by a background thread.

    Wraps a resumable iterator of host arrays `[local_devices, per_device,
    ...]` (`TrainIterator`, or anything with `__next__`, `get_state` and
    `set_state`) and yields them as `jax.Array`s sharded over
    `jax.local_devices()` along axis 0, the layout `pmap` consumes. The
    thread reads and copies up to `size` batches ahead while the devices
    run earlier steps; `flax.jax_utils.prefetch_to_device` does the copy
    ahead but reads in the caller's thread, so a slow host iterator would
    still stall the loop.

    `get_state()` is the wrapped iterator's state after the last batch
    *yielded* (not read ahead), so a checkpoint resumes at the next unseen
    batch. `set_state()` works before the first `next()`. An exception of
    the wrapped iterator is raised by the `next()` that would have returned
    its batch. `close()` stops the thread; it does not close the wrapped
    iterator (its owner does).
    """

    def __init__(self, iterator: Any, size: int = 2, devices: list | None = None):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._iterator = iterator
        devices = list(devices or jax.local_devices())
        mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
        self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = iterator.get_state()

    def _read_ahead(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                state = self._iterator.get_state()
                if not self._put((jax.device_put(batch, self._sharding), state)):
                    return
        except BaseException as error:  # noqa: BLE001 - delivered to the consumer
            self._put(_Failure(error))

    def _put(self, item) -> bool:
        """Queues `item` unless `close()` is called while the queue is full."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> jax.Array:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._read_ahead, name="tusk_jax-prefetch", daemon=True
            )
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without a batch") from None
        if isinstance(item, _Failure):
            self._stop.set()
            raise item.error
        batch, self._state = item
        return batch

    def get_state(self) -> Any:
        """The wrapped iterator's state after the last batch yielded (JSON-serialisable)."""
        return self._state

    def set_state(self, state: Any) -> None:
        """Moves the wrapped iterator to `state`; only before the first `next()`."""
        if self._thread is not None:
            raise RuntimeError("DevicePrefetcher.set_state after iteration started")
        self._iterator.set_state(state)
        self._state = self._iterator.get_state()

    def close(self, timeout: float = 60.0) -> None:
        """Stops the reading thread (waiting up to `timeout` s for a read in progress)."""
        self._stop.set()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # Frees a slot, so a thread blocked on a full queue sees the stop.
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        if self._thread.is_alive():
            logging.warning(
                "The prefetch thread is still reading after %.0f s; left behind.", timeout
            )
        self._thread = None


def create_train_iterator(config: ml_collections.ConfigDict) -> TrainIterator:
    """Training batches float32 [local_devices, batch_size // device_count, H, W, 3] in [0, 1].

    Prepares the dataset on first use. Raises ValueError naming
    `train.batch_size` if it is not divisible by the number of devices, and
    listing the valid datasets if `config.dataset.name` is unknown.
    """
    return TrainIterator(config)


def create_eval_iterator(
    config: ml_collections.ConfigDict, split: str = "test", batch_size: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Finite pass over `split` in dataset order, batches of B examples.

    Each batch: `image` float32 [B, H, W, 3] in [0, 1] at
    `config.dataset.image_size`, `valid` bool [B] (False on the padding of
    the last batch, which repeats the last example) and the ground truth of
    the dataset (object discovery: `mask`, `shape`, `color`, `visibility`
    (+ clevr `size`, `material`); mnist_hard: `centers`, `labels`, `boxes`;
    landmark datasets: `landmarks` (+ h36m `back_facing`)). At most
    `config.dataset.num_eval_examples` examples when that is > 0.
    """
    name = config.dataset.name
    datasets.check_split(name, split)
    batch_size = int(batch_size or config.train.batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    source = datasets.data_source(config, split)
    module = datasets.get_module(name)
    image_size = int(config.dataset.image_size)
    total = len(source)
    limit = int(config.dataset.get("num_eval_examples", -1))
    if limit > 0:
        total = min(total, limit)

    def generate():
        for start in range(0, total, batch_size):
            indices = np.arange(start, min(start + batch_size, total))
            valid = np.ones(batch_size, bool)
            valid[len(indices) :] = False
            indices = np.concatenate(
                [indices, np.full(batch_size - len(indices), indices[-1], indices.dtype)]
            )
            batch = module.preprocess(_read(source, indices), image_size, with_labels=True)
            batch["valid"] = valid
            yield batch

    return generate()
