"""The training loop: `fit(config, workdir)` trains or resumes a run.

Used by `python -m tusk_jax.main`, the tests and the notebooks. The step
itself is `tusk_jax.step`; the state `tusk_jax.state`. Resources (checkpoint
manager, input iterator, summary writer, signal handlers) close in one
`ExitStack`; `every` decides the log, image and checkpoint steps.
"""

import contextlib
import dataclasses
import os
import signal
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
    progress,
    summaries,
    visualization,
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


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks (preemption)."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C: stop now, without a checkpoint.
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def fit(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
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

    Raises:
      config_lib.ConfigError: an invalid config, or a refused config change.
      checkpointing.CheckpointError: the workdir is not writable, a save
        failed (disk full, read-only), or no checkpoint is intact.
      NonFiniteError: a loss, gradient norm or parameter went NaN/Inf (names
        the step and the term).
    """
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(_StopRequest())
        run = _start(config, workdir, allow_config_change, stack)
        return _loop(run, stop)


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


def _prepare_workdir(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> list:
    """Checks the config against a run to resume, then that the folders are writable."""
    if not workdir or not str(workdir).strip():
        raise config_lib.ConfigError("--workdir is empty: name the run's folder.")
    changes = []
    if checkpointing.saved_steps(workdir):
        changes = config_lib.check_resume_config(config, workdir, allow_config_change)
    if jax.process_index() == 0:
        checkpointing.check_writable(workdir, checkpointing.checkpoint_dir(workdir))
    return changes


def _start(config, workdir, allow_config_change, stack: contextlib.ExitStack) -> _Run:
    """Validates, restores (or initialises) the run and opens what the loop writes to."""
    config_lib.validate_config(config)
    changes = _prepare_workdir(config, workdir, allow_config_change)
    workdir = os.path.abspath(workdir)
    model = models.create_model(config)
    state = state_lib.create_train_state(config, model)
    manager = checkpointing.create_manager(workdir, config.train.max_to_keep)
    stack.enter_context(_finishing_saves(manager))
    train_iter = input_pipeline.create_train_iterator(config)
    stack.callback(train_iter.close)
    state, restored = _restore(manager, train_iter, state, workdir)
    if config.train.prefetch_to_device:
        train_iter = input_pipeline.DevicePrefetcher(train_iter, config.train.prefetch_to_device)
        stack.callback(train_iter.close)
    if jax.process_index() == 0:
        # Written only now: a refused config or an unreadable run leaves the old one.
        config_lib.save_config(config, workdir)
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
    )


def _restore(manager, train_iter, state, workdir: str) -> tuple[state_lib.TrainState, bool]:
    """`state` with the newest intact checkpoint's arrays (and the input position) if any."""
    restored, corrupt = checkpointing.restore_newest_intact(manager, jax.device_get(state), workdir)
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
    train_iter.set_state(data_state)
    logging.info("Resumed from the checkpoint of step %d in %s.", restored_step, workdir)
    return state, True


def _loop(run: _Run, stop: "_StopRequest") -> state_lib.TrainState:
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
    checkpointing.save(run.manager, step, host_state, run.train_iter.get_state(), force=force)


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
    """Waits for the last asynchronous save and closes the manager; after a NaN, only waits.

    After a write error (disk full) nothing is waited for: the first error is
    the one to report.
    """
    try:
        yield manager
    except NonFiniteError:
        checkpointing.wait(manager)  # The last good checkpoint completes.
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
