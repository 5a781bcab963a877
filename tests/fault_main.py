"""`python -m tusk_jax.main` with a fault injected, for the process-level fault tests.

  python tests/fault_main.py --config=... --workdir=...   (main's flags)

`TUSK_FAULT` names the fault (comma-separated, combinable); `TUSK_FAULT_MARK`
(a path) is created when the loop reaches step 1, so a test knows the first
step is running before it sends a signal:

- `stuck_writer`: after the first checkpoint save, a non-daemon thread blocks
  forever, as orbax's `async_save` thread does on a hung filesystem;
- `loop_error`: a RuntimeError in the training loop at step 3;
- `prefetch_error`: a RuntimeError in the prefetch thread while reading the
  batch of step 3;
- `slow_save`: each checkpoint save first sleeps 20 s (a slow disk);
- `sigterm_in_compile`: SIGTERM to itself 1 s into the first training step
  (its compilation).

Only the test harness patches: tusk_jax has no fault hooks of its own.
"""

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app  # noqa: E402

from tusk_jax import checkpointing, input_pipeline, main, step, train  # noqa: E402

FAULTS = set(filter(None, os.environ.get("TUSK_FAULT", "").split(",")))
MARK = os.environ.get("TUSK_FAULT_MARK")

if "stuck_writer" in FAULTS or "slow_save" in FAULTS:
    real_save = checkpointing.save

    def save(*args, **kwargs):
        if "slow_save" in FAULTS:
            time.sleep(20)
        out = real_save(*args, **kwargs)
        if "stuck_writer" in FAULTS:
            threading.Thread(target=threading.Event().wait, name="stuck_writer").start()
        return out

    checkpointing.save = save

real_every = train.every


def every(at_step, period, last_step, at_last):
    if at_step == 1 and MARK and not os.path.exists(MARK):
        open(MARK, "w").close()
    if at_step == 3 and "loop_error" in FAULTS:
        print(f"fault_main: error raised at {time.time():.3f}", file=sys.stderr, flush=True)
        raise RuntimeError("fault injected in the training loop")
    return real_every(at_step, period, last_step, at_last)


train.every = every

if "prefetch_error" in FAULTS:
    real_next = input_pipeline.TrainIterator.__next__

    def next_batch(self):
        if self.get_state()["step"] == 3:
            assert threading.current_thread().name == "tusk_jax-prefetch"
            print(f"fault_main: error raised at {time.time():.3f}", file=sys.stderr, flush=True)
            raise RuntimeError("fault injected in the prefetch thread")
        return real_next(self)

    input_pipeline.TrainIterator.__next__ = next_batch


def _sigterm():
    print(f"fault_main: SIGTERM sent at {time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


if "sigterm_in_compile" in FAULTS:
    real_make = step.make_p_train_step

    def make_p_train_step(*args, **kwargs):
        p_train_step = real_make(*args, **kwargs)
        calls = []

        def first_call_signals(*a, **k):
            if not calls:
                calls.append(1)
                threading.Timer(1.0, _sigterm).start()
            return p_train_step(*a, **k)

        return first_call_signals

    step.make_p_train_step = make_p_train_step

if __name__ == "__main__":
    app.run(main.main, flags_parser=main.parse_flags)
