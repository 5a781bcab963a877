"""`input_pipeline.DevicePrefetcher`: the batches, in order, on the devices, resumable.

The loop itself with prefetching is covered by tests/test_golden.py (the
training log is bitwise the one recorded before prefetching existed) and the
resume tests of tests/test_train.py. Its speed with a slow host iterator is
measured by benchmarks/prefetch.py, not here.
"""

import threading
import time

import jax
import numpy as np
import pytest

from tusk_jax.input_pipeline import DevicePrefetcher


class CountingIterator:
    """Batches `[2, 3, 4]` filled with their 1-based position; fails at `fail_at` if set."""

    def __init__(self, fail_at=None):
        self.position = 0
        self.fail_at = fail_at
        self.reader_threads = set()

    def __next__(self):
        self.reader_threads.add(threading.current_thread().name)
        if self.position + 1 == self.fail_at:
            raise OSError(f"unreadable record at batch {self.fail_at}")
        self.position += 1
        return np.full((2, 3, 4), self.position, np.float32)

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def wait_for(condition, seconds=30.0):
    """Waits until `condition()` holds (a state, not a duration, is what is tested)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_batches_in_order_sharded_over_the_local_devices():
    source = CountingIterator()
    prefetcher = DevicePrefetcher(source, size=2)
    try:
        for expected in (1, 2, 3, 4):
            batch = next(prefetcher)
            assert isinstance(batch, jax.Array)
            np.testing.assert_array_equal(np.asarray(batch), expected)
            assert batch.sharding.device_set == set(jax.local_devices())
            assert [shard.data.shape for shard in batch.addressable_shards] == [(1, 3, 4)] * 2
    finally:
        prefetcher.close()
    assert source.reader_threads == {"tusk_jax-prefetch"}


def test_state_is_that_of_the_last_batch_yielded_not_read():
    source = CountingIterator()
    prefetcher = DevicePrefetcher(source, size=3)
    try:
        next(prefetcher)
        next(prefetcher)
        wait_for(lambda: source.position == 2 + 3 + 1)  # 3 queued, one more waiting to be.
        assert prefetcher.get_state() == {"position": 2}
    finally:
        prefetcher.close()
    # Resuming from that state gives batch 3 next, as without prefetching.
    resumed = DevicePrefetcher(CountingIterator(), size=3)
    resumed.set_state(prefetcher.get_state())
    try:
        np.testing.assert_array_equal(np.asarray(next(resumed)), 3)
        with pytest.raises(RuntimeError, match="after iteration started"):
            resumed.set_state({"position": 0})
    finally:
        resumed.close()


def test_an_error_of_the_reader_arrives_with_its_batch():
    prefetcher = DevicePrefetcher(CountingIterator(fail_at=3), size=2)
    try:
        assert float(next(prefetcher)[0, 0, 0]) == 1
        assert float(next(prefetcher)[0, 0, 0]) == 2
        with pytest.raises(OSError, match="batch 3"):
            next(prefetcher)
        assert prefetcher.get_state() == {"position": 2}
    finally:
        prefetcher.close()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    source = CountingIterator()
    prefetcher = DevicePrefetcher(source, size=1)
    next(prefetcher)
    wait_for(lambda: source.position == 3)  # One queued, one blocked on the full queue.
    thread = prefetcher._thread
    prefetcher.close()
    assert not thread.is_alive()
    assert source.position == 3


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="prefetch size"):
        DevicePrefetcher(CountingIterator(), size=0)
