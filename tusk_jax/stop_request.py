"""SIGTERM and Ctrl-C during training: `StopRequest`, the flag the loop checks.

Owned here so that the loop (`tusk_jax.train`) stays about the loop; the
process-ending helpers are `tusk_jax.process_exit`'s.
"""

import os
import signal
import threading

import jax

from tusk_jax import process_exit


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks (preemption: save, then stop).

    In a notebook or a test (`hard_exit=False`) a second Ctrl-C raises
    KeyboardInterrupt. On the command line (`hard_exit=True`) the signals are
    read by a thread that the C-level handler wakes (`signal.set_wakeup_fd`),
    so they act even while the main thread is inside a compilation or a save
    (Python runs its own handlers only between the main thread's bytecodes):

    - a first SIGTERM / SIGINT before this process completed a step (one
      process): nothing to save, the process ends at once, exit status 0;
    - after that, the loop saves the step it is at and stops (exit status 0);
    - a second Ctrl-C ends the process at once without saving, exit status
      130 (`process_exit.exit_now`: no KeyboardInterrupt raised inside JAX,
      no interpreter teardown).
    """

    BEFORE_FIRST_STEP = (
        "tusk_jax.main: {name} received before the first step: nothing to save; stopped."
    )
    SECOND_CTRL_C = (
        "tusk_jax.main: interrupted twice: stopped at once without saving this step; "
        "the checkpoints saved are kept."
    )

    def __init__(self, hard_exit: bool = False):
        self.signal_name = None
        self.stepped = False  # Set by the loop once this process dispatched a step.
        self._hard_exit = hard_exit
        self._single_process = True
        self._previous = {}
        self._wakeup = None
        self._lock = threading.Lock()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        handler = self._handle
        if self._hard_exit:
            self._single_process = jax.process_count() == 1
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._wakeup = (signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False), write_fd)
            threading.Thread(
                target=self._watch, args=(read_fd,), name="tusk_jax-signals", daemon=True
            ).start()
            handler = self._ignore  # The watcher acts; the Python-level handler only wakes it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, handler)
        return self

    @staticmethod
    def _ignore(signum, frame):
        del signum, frame

    def _handle(self, signum, frame):
        del frame
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C: stop now, without a checkpoint.
        self.signal_name = signal.Signals(signum).name

    def _watch(self, read_fd: int) -> None:
        """The command line's signal thread: reads signal numbers from the wake-up pipe."""
        try:
            while data := os.read(read_fd, 64):
                for signum in data:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        self._react(signum)
        finally:
            os.close(read_fd)

    def _react(self, signum: int) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            first = self.signal_name is None
            if first:
                self.signal_name = name
        if first and not self.stepped and self._single_process:
            process_exit.exit_now(0, self.BEFORE_FIRST_STEP.format(name=name))
        if not first and signum == signal.SIGINT:
            process_exit.exit_now(130, self.SECOND_CTRL_C)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            previous, write_fd = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_fd)  # The watcher reads end-of-file and stops.
        return False
