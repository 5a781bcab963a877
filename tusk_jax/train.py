"""The training loop: `fit(config, workdir)` trains or resumes a run.

Used by `python -m tusk_jax.main`, the tests and the notebooks. The step
itself is `tusk_jax.step`; the state `tusk_jax.state`. Resources (checkpoint
manager, input iterator, summary writer, signal handlers) close in one
`ExitStack`; `every` decides the log, image and checkpoint steps.
"""

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from tusk_jax import (
    checkpointing,
    config_lib,
    distributed,
    inference,
    input_pipeline,
    models,
    perceptual,
    process_exit,
    progress,
    run_identity,
    stop_request,
    summaries,
    visualization,
    workdir_lock,
)
from tusk_jax import state as state_lib
from tusk_jax import step as step_lib


class NonFiniteError(FloatingPointError):
    """A loss term or gradient norm became NaN or infinite."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
    """Raises `NonFiniteError` naming the step and the first non-finite term."""
    # Loss terms first: a NaN loss is the cause, NaN gradients its consequence.
    for name in sorted(metrics, key=lambda n: (not n.startswith("loss/"), n)):
        value = metrics[name]
        if not np.isfinite(value):
            raise NonFiniteError(
                f"Non-finite value at step {step}: {name} = {value}. "
                "Lower the learning rates or check the input data; the last good "
                "checkpoint is kept in the workdir."
            )


def check_finite_arrays(step: int, tree: Any) -> None:
    """Raises `NonFiniteError` naming the first NaN/Inf array of `tree` after `step`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        if not np.all(np.isfinite(leaf)):
            raise NonFiniteError(
                f"Non-finite value after step {step}: {jax.tree_util.keystr(path)} holds NaN "
                "or Inf. Lower the learning rates or check the input data; the last good "
                "checkpoint is kept in the workdir."
            )


def fit(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool = False,
    adopt_checkpoint: bool = False,
    command_line: bool = False,
) -> state_lib.TrainState:
    """Trains (or resumes) a TUSK run in `workdir`; returns the final host state.

    Restores the newest intact checkpoint and the input position when
    `workdir` has one (corrupt newer steps are set aside, see
    `checkpointing.restore_newest_intact`); writes metrics (`metrics.jsonl`,
    TensorBoard), image summaries and checkpoints; stops cleanly with a
    checkpoint on SIGTERM / SIGINT (also during start-up). A resumed run's
    config is compared with its `config.json` first
    (`config_lib.check_resume_config`; changes of meaning need
    `allow_config_change` and are recorded in `config_changes.jsonl`).

    One writer per workdir: the run holds `<workdir>/.tusk_jax.lock`
    (`workdir_lock`, process 0) from before anything is written. Each saved
    step carries the run's identity (`run_identity`); a step of another run
    is refused unless `adopt_checkpoint` (recorded in config.json).
    `command_line=True` (`python -m tusk_jax.main` only: it may end the
    process) makes signals act at once where there is nothing to save
    (`stop_request.StopRequest`) and an error end the process within
    `process_exit.EXIT_GRACE_S` whatever its background threads do.

    Raises:
      config_lib.ConfigError: an invalid config, or a refused config change.
      checkpointing.CheckpointError: the workdir is not writable, a save
        failed (disk full, read-only), or no checkpoint is intact.
      NonFiniteError: a loss, gradient norm or parameter went NaN/Inf (names
        the step and the term).
      workdir_lock.WorkdirBusyError: another live run holds the workdir.
      run_identity.ForeignCheckpointError: the newest step belongs to another run.
    """
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop_request.StopRequest(hard_exit=command_line))
        try:
            run = _start(config, workdir, allow_config_change, adopt_checkpoint, stack)
            return _loop(run, stop)
        except BaseException:
            if command_line:  # Clean-up and the threads' joins get EXIT_GRACE_S, no more.
                process_exit.exit_within(1)
            raise


train_and_evaluate = fit  # The former name (it never evaluated); main and notebooks used it.


def every(step: int, period: int, last_step: int, at_last: bool) -> bool:
    """Whether periodic work runs after `step`: multiples of `period`; at `last_step`, `at_last`."""
    if step == last_step:
        return at_last
    return step % period == 0


@dataclasses.dataclass
class _Run:
    """What the loop needs, made by `_start` (closed by its `ExitStack`)."""

    config: ml_collections.ConfigDict
    manager: Any
    train_iter: Any
    writer: summaries.SummaryWriter
    p_train_step: Callable
    vgg_params: Any
    replicated: state_lib.TrainState
    start_step: int
    identity: dict  # Saved with every step (`run_identity.step_metadata`).


def _prepare_workdir(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> list:
    """Checks the config against a run to resume, then that the folders are writable."""
    changes = []
    if checkpointing.saved_steps(workdir):
        changes = config_lib.check_resume_config(config, workdir, allow_config_change)
    if jax.process_index() == 0:
        checkpointing.check_writable(workdir, checkpointing.checkpoint_dir(workdir))
    return changes


def _lock_workdir(workdir: str, stack: contextlib.ExitStack) -> None:
    """Process 0 takes the workdir's lock (held until `stack` closes); all learn the outcome."""
    error = None
    if jax.process_index() == 0:
        try:
            stack.enter_context(workdir_lock.WorkdirLock(workdir))
        except Exception as exc:  # noqa: BLE001 - busy or unwritable: every process stops
            error = exc
    if jax.process_count() > 1:
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = workdir_lock.WorkdirBusyError(
                f"process 0 could not lock {workdir} (see its message); nothing was written."
            )
    if error is not None:
        raise error


def _start(
    config, workdir, allow_config_change, adopt_checkpoint, stack: contextlib.ExitStack
) -> _Run:
    """Validates, restores (or initialises) the run and opens what the loop writes to."""
    config_lib.validate_config(config)
    if not workdir or not str(workdir).strip():
        raise config_lib.ConfigError("--workdir is empty: name the run's folder.")
    _lock_workdir(workdir, stack)  # Before anything is written to the workdir.
    changes = _prepare_workdir(config, workdir, allow_config_change)
    workdir = os.path.abspath(workdir)
    identity = run_identity.for_run(workdir)
    model = models.create_model(config)
    state = state_lib.create_train_state(config, model)
    manager = checkpointing.create_manager(workdir, config.train.max_to_keep)
    stack.enter_context(_finishing_saves(manager))
    train_iter = input_pipeline.create_train_iterator(config)
    stack.callback(train_iter.close)

    def check_step(step):
        return run_identity.check_step(manager, step, identity, config, adopt_checkpoint)

    state, restored = _restore(
        manager, train_iter, state, workdir, check_step, allow_config_change or adopt_checkpoint
    )
    if config.train.prefetch_to_device:
        train_iter = input_pipeline.DevicePrefetcher(train_iter, config.train.prefetch_to_device)
        stack.callback(train_iter.close)
    if jax.process_index() == 0:
        # Written only now: a refused config or an unreadable run leaves the old one.
        config_lib.save_config(config, workdir, identity=identity)
        if restored and changes:
            config_lib.record_config_changes(workdir, int(state.step), changes)
            logging.warning(
                "Resuming at step %d with a changed config (recorded in %s): %s",
                int(state.step),
                config_lib.CHANGES_FILE,
                ", ".join(f"{f} {a!r} -> {b!r}" for f, a, b, _ in changes),
            )
    vgg_params = None
    if config.loss.recon == "perceptual":
        vgg_params = state_lib.replicate(perceptual.load_vgg16_params(config.loss.vgg16_weights))
    return _Run(
        config=config,
        manager=manager,
        train_iter=train_iter,
        writer=stack.enter_context(_closing(summaries.SummaryWriter(workdir))),
        p_train_step=step_lib.make_p_train_step(config, model),
        vgg_params=vgg_params,
        replicated=state_lib.replicate(state),
        start_step=int(state.step),
        identity=run_identity.step_metadata(identity, config),
    )


def _restore(
    manager, train_iter, state, workdir: str, check_step=None, allow_new_data_order=False
) -> tuple[state_lib.TrainState, bool]:
    """`state` with the newest intact checkpoint's arrays (and the input position) if any.

    A data position saved with another seed or split size (a changed config
    allowed by `allow_new_data_order`, or an adopted step) continues at the
    same step in this config's data order; otherwise it is a `ConfigError`.
    """
    restored, corrupt = checkpointing.restore_newest_intact(
        manager, jax.device_get(state), workdir, check_step
    )
    if corrupt:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tusk_jax: corrupt checkpoints read")
        checkpointing.set_aside(manager, workdir, corrupt, move=jax.process_index() == 0)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tusk_jax: corrupt checkpoints moved")
            manager.reload()
    if restored is None:
        return state, False
    host_state, data_state, restored_step = restored
    state = state.replace(**{f: getattr(host_state, f) for f in _PYTREE_FIELDS})
    try:
        train_iter.set_state(data_state)
    except ValueError as error:
        if not allow_new_data_order:
            raise config_lib.ConfigError(
                f"checkpoint step {restored_step} in {workdir} was saved with another data "
                f"order ({error}): it comes from another run or config. Move it away, or pass "
                "--adopt_checkpoint to go on from it with this config's data order."
            ) from None
        logging.warning(
            "The data position of step %d does not fit this config (%s): the input goes on "
            "at that step in this config's data order.",
            restored_step,
            error,
        )
        train_iter.set_state({"step": int(data_state.get("step", restored_step))})
    logging.info("Resumed from the checkpoint of step %d in %s.", restored_step, workdir)
    return state, True


def _loop(run: _Run, stop: stop_request.StopRequest) -> state_lib.TrainState:
    """Steps until `train.num_steps` or a stop request; logs, draws and checkpoints on cadence."""
    train = run.config.train
    num_steps, replicated, pending = train.num_steps, run.replicated, None
    write_images = _ImageSummaries(run.config, run.writer)
    with tqdm(
        total=num_steps,
        initial=run.start_step,
        desc="train",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=2.0,
    ) as bar:
        log = _MetricLog(run.config, run.writer, bar)
        step = run.start_step
        vote = distributed.StopVote()  # every process stops after the same step
        # One process: a signal during start-up (data, compilation) stops before the loop.
        stopping = jax.process_count() == 1 and stop.signal_name is not None
        while step < num_steps and not stopping:
            batch = next(run.train_iter)
            replicated, device_metrics = run.p_train_step(replicated, batch, run.vgg_params)
            stop.stepped = True  # From now on a signal saves this step before stopping.
            step += 1
            if pending is not None:  # fetched one step late, not to stall dispatch
                log.add(*pending)
            pending = (step, device_metrics)
            if step == run.start_step + 1:  # It compiled: left out of the rate and ETA.
                progress.restart_clock(bar, step)
            else:
                bar.update(1)
            # A NaN is reported before the figures read the step or a checkpoint keeps it.
            if every(step, train.image_every, num_steps, True):
                log.add(*pending)
                pending = None
                _write_image_summaries(write_images, step, replicated, batch)
            if every(step, train.checkpoint_every, num_steps, False):
                if pending is not None:
                    log.add(*pending)
                    pending = None
                _save(run, replicated, step)
            vote.cast(stop.signal_name is not None)
            stopping = vote.decided()
        if pending is not None:
            log.add(*pending)
        if stopping:
            logging.warning(
                "%s received: %s.",
                stop.signal_name or "Stop request of another process",
                f"saving step {step} and stopping"
                if step > run.start_step
                else f"stopping before the first step (step {step} is already saved or untrained)",
            )
        if step > run.start_step and run.manager.latest_step() != step:
            _save(run, replicated, step, force=True)
    return state_lib.unreplicate(replicated)


def _save(run: _Run, replicated, step: int, force: bool = False) -> None:
    host_state = state_lib.unreplicate(replicated)
    data_state = run.train_iter.get_state()
    checkpointing.save(run.manager, step, host_state, data_state, force, run.identity)


class _MetricLog:
    """Checks every step's metrics (NaN/Inf) and writes their means at the log cadence."""

    def __init__(self, config: ml_collections.ConfigDict, writer, bar):
        self.config, self.writer, self.bar = config, writer, bar
        self.accumulated: list[dict[str, float]] = []
        self.last_time = time.time()

    def add(self, step: int, device_metrics) -> None:
        host = {k: float(v) for k, v in state_lib.unreplicate(device_metrics).items()}
        check_finite(step, host)
        self.accumulated.append(host)
        train = self.config.train
        if not every(step, train.log_every, train.num_steps, True):
            return
        means = {k: float(np.mean([m[k] for m in self.accumulated])) for k in self.accumulated[0]}
        now = time.time()
        means["steps_per_second"] = len(self.accumulated) / max(now - self.last_time, 1e-9)
        means["learning_rate"] = state_lib.learning_rate_at(self.config, step - 1)
        self.last_time = now
        self.writer.write_scalars(step, means)
        self.accumulated.clear()
        self.bar.set_postfix(
            recon=f"{means['loss/recon']:.4f}",
            sw=f"{means.get('loss/sw', float('nan')):.3f}",
            protos=int(means["prototypes_in_use"]),
        )


@contextlib.contextmanager
def _finishing_saves(manager):
    """Waits for the last asynchronous save and closes the manager; after an error, only waits.

    After an error (a NaN, an exception in the loop or the input thread) the
    save in flight completes (at interpreter exit it would not: Python's
    thread pools refuse new work then); on the command line this wait is
    bounded by `process_exit.EXIT_GRACE_S`. After a write error (disk full)
    nothing is waited for: the first error is the one to report.
    """
    try:
        yield manager
    except BaseException as error:
        # Not after a write error, nor a second Ctrl-C in a notebook (KeyboardInterrupt).
        if isinstance(error, Exception) and not isinstance(
            error, checkpointing.CheckpointWriteError | OSError
        ):
            try:
                checkpointing.wait(manager)  # The last good checkpoint completes.
            except Exception as wait_error:  # noqa: BLE001 - the first error is reported
                logging.debug("Waiting for the last save after an error failed: %s", wait_error)
        raise
    checkpointing.wait(manager)
    manager.close()


@contextlib.contextmanager
def _closing(writer):
    """Closes the summary writer; on an error path ignoring its own write errors."""
    try:
        yield writer
    except BaseException:
        try:
            writer.close()
        except OSError as error:
            logging.debug("Closing the summary writer failed: %s", error)
        raise
    writer.close()


def _write_image_summaries(write_images, step: int, replicated, batch) -> None:
    """Image summaries never stop training: a failure is logged and the run goes on."""
    try:
        write_images(step, replicated, batch)
    except NonFiniteError:
        raise
    except Exception as error:  # noqa: BLE001 - any figure failure (t-SNE, plotting, ...)
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        logging.warning("Image summaries of step %d failed (training goes on): %s", step, message)


_PYTREE_FIELDS = ("step", "params", "prototypes", "opt_state", "prototype_opt_state", "rng")


class _ImageSummaries:
    """Writes the evaluation figures (`visualization.make_figures`) of a few training images.

    Detections coloured by prototype, reconstructions, alpha layers (alpha
    mode), each prototype rendered alone and a t-SNE of the descriptors. One
    `inference.Detector` is kept and given the current weights each time, so
    its functions compile once per run.
    """

    def __init__(self, config: ml_collections.ConfigDict, writer, count: int = 4):
        self.config, self.writer, self.count = config, writer, count
        self.detector = None

    def __call__(self, step: int, replicated: state_lib.TrainState, batch: np.ndarray) -> None:
        if not self.writer.enabled:
            return
        params = state_lib.unreplicate(replicated.params)
        prototypes = state_lib.unreplicate(replicated.prototypes)
        check_finite_arrays(step, {"params": params, "prototypes": prototypes})
        if self.detector is None:
            self.detector = inference.Detector(self.config, params, prototypes, step=step)
        else:
            self.detector.update(params, prototypes, step=step)
        images = np.asarray(batch[0, : self.count])
        first = {"image": images, **self.detector.apply(images)}
        descriptors = first["descriptors"].reshape(-1, first["descriptors"].shape[-1])
        renders = self.detector.render_prototypes(size=images.shape[1])["reconstruction"]
        figures = visualization.make_figures(first, self.detector.prototypes, renders, descriptors)
        self.writer.write_images(step, figures)
