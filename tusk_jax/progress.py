"""Progress bars whose rate and ETA leave out the compilation (tqdm).

The first step of a run (or of a resumed run) compiles the training step: a
minute or more on a CPU. Counted as a step, it makes tqdm's rate and ETA read
hours for the rest of the run; `restart_clock` starts the clock after it.
"""

from tqdm import tqdm
from tqdm.std import EMA


def restart_clock(bar: tqdm, n: int) -> None:
    """Sets the bar to `n` steps done and measures the rate and ETA from now on.

    The steps up to `n` are left out of the rate: tqdm's start time, last
    print and moving averages restart here, as `tqdm.reset` does, but `n`
    is kept (and shown) and counted as the bar's `initial`.
    """
    bar.n = n
    if bar.disable:
        return
    bar.initial = bar.last_print_n = n
    bar.last_print_t = bar.start_t = bar._time()
    bar._ema_dn = EMA(bar.smoothing)
    bar._ema_dt = EMA(bar.smoothing)
    bar._ema_miniters = EMA(bar.smoothing)
    bar.refresh()
