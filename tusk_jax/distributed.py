"""Multi-process runs: starting JAX's multi-controller runtime and agreeing to stop.

The same `python -m tusk_jax.main` runs as N processes over M hosts (GPU
clusters under SLURM, Cloud TPU VM slices, or N processes on one machine for
testing, see `launch/`). Every process runs the same program on its local
devices; `pmap`'s collectives span all processes' devices (the global batch
must split over them: `config_lib.check_batch_split`).

- `initialize(mode, coordinator_address, num_processes, process_id)` calls
  `jax.distributed.initialize` when the run is multi-process: explicit
  flags, or a cluster environment that JAX detects (SLURM, Open MPI; Cloud
  TPU with `mode='cluster'`);
- `StopVote` lets all processes agree on the step at which to stop after a
  SIGTERM / SIGINT reached any of them, without stalling the device queue.

What the training code relies on (verified by tests/test_multiprocess.py):
`pmap`'s global axis orders devices by process (process 0's local devices
first), so `lax.axis_index('batch')` is global and process p's input slice
(`tusk_jax.input_pipeline`) lines up with its devices; a run of P processes
x D devices equals a run of 1 process x P*D devices with the same global
batch and seed.
"""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import logging
from jax import lax

MODES = ("auto", "cluster", "off")

# Environment variables by which JAX's own cluster detection recognises a
# multi-task job (jax/_src/clusters): SLURM inside `srun`, Open MPI's `mpirun`.
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_OMPI_VARS = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


def cluster_launcher(environ: dict[str, str] | None = None) -> str | None:
    """The multi-task launcher this process runs under, or None.

    Returns 'slurm' inside a SLURM job step of more than one task (the tasks
    `srun` starts: SLURM_STEP_NUM_TASKS when set, else SLURM_NTASKS),
    'openmpi' under `mpirun -np N` with N > 1, else None. These are the
    environments `jax.distributed.initialize()` configures itself from
    (coordinator, process count and id; under SLURM also one GPU per task,
    GPU number = SLURM_LOCALID). Cloud TPU VMs are not detected here (JAX
    reads them from the VM's metadata server): launch with
    `--distributed=cluster` (launch/tpu_vm.sh does).
    """
    env = os.environ if environ is None else environ
    if all(v in env for v in _SLURM_VARS):
        # The tasks of this srun step (`srun -n 1` inside a bigger allocation: one process).
        if _int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])) > 1:
            return "slurm"
    if all(v in env for v in _OMPI_VARS) and _int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "openmpi"
    return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's distributed runtime when the run is multi-process.

    Must run before anything touches a JAX device.

    Args:
      mode: 'auto': initialize when any explicit argument is given or
        `cluster_launcher()` finds a multi-task SLURM / Open MPI job, else run
        as one process. 'cluster': always call `jax.distributed.initialize`,
        which takes the arguments not given from the cluster JAX detects
        (Cloud TPU VM, SLURM, Open MPI, Kubernetes) and fails if none. 'off':
        one process, whatever the environment says.
      coordinator_address: 'host:port' of process 0, reachable by every
        process (e.g. '127.0.0.1:12345' on one machine).
      num_processes: number of processes N.
      process_id: this process's index in [0, N).

    Returns:
      True if `jax.distributed.initialize` was called.

    Raises:
      ValueError: unknown mode; explicit arguments with mode 'off'; an
        incomplete or inconsistent set of explicit arguments outside a
        detected cluster.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}.")
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if mode == "off":
        if given:
            raise ValueError(
                f"--distributed=off contradicts the explicit {', '.join(sorted(given))}."
            )
        return False
    cluster = cluster_launcher()
    if mode == "auto" and not given and cluster is None:
        return False
    if mode == "auto" and cluster is None:
        missing = sorted(set(explicit) - set(given))
        if missing:
            raise ValueError(
                f"multi-process run without a detected cluster: give all of "
                f"--coordinator_address, --num_processes and --process_id (missing: "
                f"{', '.join(missing)})."
            )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
    if jax.distributed.is_initialized():
        logging.info("JAX distributed runtime already initialized.")
        return True
    logging.info(
        "Starting JAX's distributed runtime (%s): %s",
        cluster or ("cluster environment" if mode == "cluster" else "explicit flags"),
        ", ".join(f"{k}={v}" for k, v in given.items()) or "arguments from the environment",
    )
    jax.distributed.initialize(**given)
    devices_per_process()
    handshake()
    return True


def handshake() -> int:
    """One tiny collective over every device of every process; returns the device count.

    Run right after `jax.distributed.initialize`, while the processes are in
    step: the first collective over a set of devices sets up their
    communicator, and on CPU (gloo) that set-up fails when a process arrives
    more than 30 s after the others (measured: a process that found its
    programs in the compilation cache raced ahead of one that compiled them).
    Later collectives over the same devices wait as long as needed.
    """
    count = jax.pmap(lambda x: lax.psum(x, "all"), axis_name="all")(
        np.ones((jax.local_device_count(),), np.int32)
    )
    return int(np.asarray(count)[0])


def device_layout() -> dict[int, int]:
    """Process index -> number of its devices (all processes, from `jax.devices()`)."""
    return dict(sorted(collections.Counter(d.process_index for d in jax.devices()).items()))


def describe() -> str:
    """One line: this process, the process count and the devices."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices "
        f"({jax.devices()[0].platform}): {jax.local_devices()}"
    )


def devices_per_process() -> int:
    """The number of devices of each process.

    Raises:
      ValueError: processes with different device counts (`pmap` needs the
        same on each), naming each process's count.
    """
    layout = device_layout()
    counts = set(layout.values())
    if len(counts) > 1:
        raise ValueError(
            "every process must drive the same number of devices; devices per process: "
            + ", ".join(f"process {p}: {n}" for p, n in layout.items())
        )
    return counts.pop()


class StopVote:
    """All processes agree to stop at the same step when any of them asks to.

    Each process casts its local wish (e.g. "SIGTERM received") after every
    step with `cast(wish)`, a tiny `pmap`ped sum over all devices that is
    queued behind the training step; `decided()` reads the vote cast one call
    earlier, which is ready when that step's metrics are. Every process reads
    the same vote at the same loop iteration, so all stop after the same step
    (one or two steps after the signal) and no process waits forever in a
    collective the others have left. With one process the local wish is
    returned directly.
    """

    AXIS = "processes"

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._votes: collections.deque = collections.deque()
        self._last_wish = False
        self._sum = None
        if self.multi_process:
            self._sum = jax.pmap(lambda x: lax.psum(x, self.AXIS), axis_name=self.AXIS)

    def cast(self, wish: bool) -> None:
        """Records this process's wish; call once per step on every process."""
        self._last_wish = bool(wish)
        if self.multi_process:
            local = np.full((jax.local_device_count(),), int(self._last_wish), np.int32)
            self._votes.append(self._sum(local))

    def decided(self) -> bool:
        """True when the processes agree to stop now.

        One process: its last wish. Several: whether any process wished to
        stop in the vote before the last one (one behind, so the host never
        waits for the step it just dispatched).
        """
        if not self.multi_process:
            return self._last_wish
        if len(self._votes) < 2:
            return False
        return int(np.asarray(self._votes.popleft())[0]) > 0
