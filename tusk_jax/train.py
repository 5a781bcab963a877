"""Training: the state, the alternating train step and the loop (SPEC sections 3-4).

`train_and_evaluate(config, workdir)` is the one entry point used by
`python -m tusk_jax.main`, the tests and the notebooks.

One iteration (`train_step`, `pmap`ped over the devices, axis 'batch'):
  1. every image of the batch becomes a TPS pair (I1, I2) on device;
  2. one Adam step of encoder + decoder on
     L_recon + L_km + L_eqv with the prototypes frozen, gradients averaged
     across devices;
  3. the descriptors of the updated encoder (one more encoder pass, as the
     reference; `train.prototype_descriptors='stale'` reuses those of step
     2's forward pass) are all-gathered across devices and
     `num_prototype_steps` Adam steps of the prototypes on L_sw run in a
     `lax.scan`.
Every device computes the same prototype update from the same gathered
descriptors and the same key, so the prototypes stay identical everywhere
without communication. Ablations (the paper's Tables 4 and 6):
`train.alternate=False` trains the prototypes jointly in the single step;
`train.prototype_objective='kmeans'` trains them with L_km instead of L_sw.
"""

import dataclasses
import functools
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.experimental import multihost_utils
from tqdm import tqdm

from tusk_jax import (
    checkpointing,
    config_lib,
    distributed,
    inference,
    input_pipeline,
    losses,
    models,
    ops,
    perceptual,
    summaries,
    visualization,
)
from tusk_jax import state as state_lib

AXIS = state_lib.AXIS


TPS_FIELDS = ("scale", "scale_var", "tps", "off", "rot", "padding", "cval")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What one training step needs besides the state, fixed when the step is built.

    Attributes:
      model: the `models.TUSK` network.
      loss: the losses' fields and weights.
      tps: keyword arguments of `ops.make_training_pair` (`config.tps`).
      joint: the ablation without alternation: the prototypes move in the
        network step (`train.alternate=False`).
      prototype_term: the term the prototypes minimise ('sw', or 'kmeans' in
        the ablation); `prototype_objective` computes it (weighted, unweighted).
      num_prototype_steps: prototype Adam steps per iteration (alternating).
      updated_descriptors: the prototype steps fit the updated encoder's
        descriptors (one more encoder pass) instead of the step's own.
      num_prototypes: M.
    """

    model: models.TUSK
    loss: losses.LossConfig
    tps: dict[str, Any]
    joint: bool
    prototype_term: str
    prototype_objective: Callable
    num_prototype_steps: int
    updated_descriptors: bool
    num_prototypes: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, model: models.TUSK) -> "StepConfig":
        loss = losses.LossConfig.from_config(config)
        term, objective = losses.prototype_objective(loss, config.train.prototype_objective)
        return cls(
            model=model,
            loss=loss,
            tps={name: config.tps[name] for name in TPS_FIELDS},
            joint=not config.train.alternate,
            prototype_term=term,
            prototype_objective=objective,
            num_prototype_steps=int(config.train.num_prototype_steps),
            updated_descriptors=config.train.prototype_descriptors == "updated",
            num_prototypes=int(config.model.num_prototypes),
        )


def network_update(
    state: state_lib.TrainState,
    images: jax.Array,
    grids: jax.Array,
    key: jax.Array,
    vgg_params: Any,
    cfg: StepConfig,
) -> tuple[Any, Any, dict[str, Any]]:
    """One Adam step of encoder + decoder on the weighted sum of the network terms.

    Args:
      state: the device's `TrainState`.
      images: `[2b, H, W, 3]` the pairs (I1 then I2); `grids` their warps.
      key: the L_sw key of the joint ablation.
      vgg_params: frozen VGG16 parameters of the perceptual loss, or None.
      cfg: the step's `StepConfig`; with `cfg.joint` the prototypes get
        gradients too (and L_sw is a term, unless they minimise L_km).

    Returns:
      `(params, opt_state, aux)`: aux holds `total`, `terms`, `out` (the
      model's outputs), `grads` and `prototype_grads` (device-averaged).
    """

    def loss_fn(params, prototypes):
        if not cfg.joint:
            prototypes = lax.stop_gradient(prototypes)
        out = cfg.model.apply(params, images)
        terms = losses.network_terms(cfg.loss, images, grids, out, prototypes, vgg_params)
        if cfg.joint and cfg.prototype_term == "sw":
            # (With k-means prototypes, the L_km term already trains them.)
            descriptors = _gather_descriptors(out["descriptors"])
            terms["sw"] = losses.prototype_loss(cfg.loss, key, descriptors, prototypes)
        return losses.weighted_total(terms, cfg.loss.weights), (terms, out)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (total, (terms, out)), (grads, prototype_grads) = grad_fn(state.params, state.prototypes)
    grads = lax.pmean(grads, AXIS)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = {"total": total, "terms": terms, "out": out, "grads": grads}
    aux["prototype_grads"] = lax.pmean(prototype_grads, AXIS) if cfg.joint else None
    return params, opt_state, aux


def prototype_update(
    prototypes: jax.Array,
    opt_state: Any,
    descriptors: jax.Array,
    key: jax.Array,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
) -> tuple[jax.Array, Any, tuple[jax.Array, jax.Array, jax.Array]]:
    """`cfg.num_prototype_steps` Adam steps of the prototypes on their objective (`lax.scan`).

    Args:
      prototypes: `[M, C]`; `opt_state` their Adam state.
      descriptors: `[N, C]` the global batch's descriptors (fixed).
      key: step s uses `fold_in(key, s)`.

    Returns:
      `(prototypes, opt_state, (weighted losses [S], unweighted terms [S],
      gradient norms [S]))`.
    """

    def one_step(carry, index):
        prototypes, opt_state = carry
        (loss, term), grad = jax.value_and_grad(
            lambda p: cfg.prototype_objective(jax.random.fold_in(key, index), descriptors, p),
            has_aux=True,
        )(prototypes)
        updates, opt_state = tx.update(grad, opt_state, prototypes)
        new = (optax.apply_updates(prototypes, updates), opt_state)
        return new, (loss, term, optax.tree.norm(grad))

    (prototypes, opt_state), history = lax.scan(
        one_step, (prototypes, opt_state), jnp.arange(cfg.num_prototype_steps)
    )
    return prototypes, opt_state, history


def train_step(
    state: state_lib.TrainState, images: jax.Array, vgg_params: Any, *, cfg: StepConfig
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    """One TUSK iteration on one device's share of the batch (run under `pmap`).

    Makes a TPS pair of each image, runs `network_update`, then moves the
    prototypes: with the step's gradients (joint ablation) or by
    `prototype_update` on the gathered descriptors. Every device computes the
    same prototype update from the same descriptors and key.

    Args:
      state: the replicated `TrainState`.
      images: `[b, H, W, 3]` float in [0, 1], this device's images.
      vgg_params: frozen VGG16 parameters for the perceptual loss, or None.
      cfg: static, bound with `functools.partial`.

    Returns:
      `(new_state, metrics)`; metrics are averaged over devices.
    """
    local_batch = images.shape[0]
    pair_key, prototype_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    # Per-example keys from the *global* example index: the pairs do not
    # depend on how the global batch is split over devices or processes.
    first_example = lax.axis_index(AXIS) * local_batch
    example_keys = jax.vmap(lambda i: jax.random.fold_in(pair_key, first_example + i))(
        jnp.arange(local_batch)
    )
    make_pair = functools.partial(ops.make_training_pair, **cfg.tps)
    i1, i2, grids = jax.vmap(make_pair)(example_keys, images)
    both = jnp.concatenate([i1, i2], axis=0)
    params, opt_state, aux = network_update(state, both, grids, prototype_key, vgg_params, cfg)
    terms, out = aux["terms"], aux["out"]
    if cfg.updated_descriptors:
        fitted = cfg.model.apply(params, both, method=models.TUSK.keypoints)["descriptors"]
    else:
        fitted = out["descriptors"]  # From before the update: no extra pass.
    descriptors = _gather_descriptors(lax.stop_gradient(fitted))
    prototypes, prototype_opt_state = state.prototypes, state.prototype_opt_state
    metrics = {}
    if cfg.joint:
        prototype_updates, prototype_opt_state = state.prototype_tx.update(
            aux["prototype_grads"], prototype_opt_state, prototypes
        )
        prototypes = optax.apply_updates(prototypes, prototype_updates)
        metrics["prototype_grad_norm"] = optax.tree.norm(aux["prototype_grads"])
    elif cfg.num_prototype_steps > 0:
        prototypes, prototype_opt_state, (weighted, unweighted, grad_norms) = prototype_update(
            prototypes, prototype_opt_state, descriptors, prototype_key, state.prototype_tx, cfg
        )
        if cfg.prototype_term == "sw":
            terms["sw"] = unweighted[0]
        metrics["prototype_loss_first"] = weighted[0]
        metrics["prototype_loss_last"] = weighted[-1]
        metrics["prototype_grad_norm"] = grad_norms[0]
    nearest = ops.nearest_prototype(descriptors, prototypes)
    metrics.update({f"loss/{name}": value for name, value in terms.items()})
    metrics["loss/total"] = aux["total"]
    metrics["grad_norm"] = optax.tree.norm(aux["grads"])
    metrics["confidence"] = jnp.mean(out["confidence"])
    metrics = lax.pmean(metrics, AXIS)
    # Identical on every device (computed from the gathered descriptors).
    metrics["prototypes_in_use"] = jnp.sum(jnp.bincount(nearest, length=cfg.num_prototypes) > 0)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        prototypes=prototypes,
        opt_state=opt_state,
        prototype_opt_state=prototype_opt_state,
    )
    return new_state, metrics


def _gather_descriptors(descriptors: jax.Array) -> jax.Array:
    """`[b, K, C]` per device -> `[N, C]` descriptors of the global batch."""
    flat = descriptors.reshape(-1, descriptors.shape[-1])
    return lax.all_gather(flat, AXIS, tiled=True)


def make_p_train_step(config: ml_collections.ConfigDict, model: models.TUSK) -> Callable:
    """`train_step` with its `StepConfig` bound, `pmap`ped over local devices."""
    return jax.pmap(
        functools.partial(train_step, cfg=StepConfig.from_config(config, model)),
        axis_name=AXIS,
        donate_argnums=(0,),
    )


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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> state_lib.TrainState:
    """Trains (or resumes) a TUSK model in `workdir`; returns the final host state.

    Restores the newest intact checkpoint and the input position when
    `workdir` has one (corrupt newer steps are reported and set aside, see
    `checkpointing.restore_newest_intact`); writes metrics (`metrics.jsonl`,
    TensorBoard), image summaries and checkpoints; stops cleanly with a
    checkpoint on SIGTERM / SIGINT (also during start-up); raises
    `NonFiniteError` naming the step and the term when a loss goes NaN/Inf.

    Resuming with another config: `config_lib.check_resume_config` compares
    it with the run's `config.json` before anything is written; changes of
    meaning need `allow_config_change` and are recorded in
    `config_changes.jsonl`.

    Raises:
      config_lib.ConfigError: an invalid config, or a refused config change.
      checkpointing.CheckpointError: the workdir is not writable, a save
        failed (disk full, read-only), or no checkpoint is intact.
    """
    with _StopRequest() as stop:
        return _train_and_evaluate(config, workdir, allow_config_change, stop)


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


def _train_and_evaluate(config, workdir, allow_config_change, stop) -> state_lib.TrainState:
    config_lib.validate_config(config)
    changes = _prepare_workdir(config, workdir, allow_config_change)
    workdir = os.path.abspath(workdir)
    is_primary = jax.process_index() == 0

    model = models.create_model(config)
    state = state_lib.create_train_state(config, model)
    manager = checkpointing.create_manager(workdir, config.train.max_to_keep)
    train_iter = input_pipeline.create_train_iterator(config)
    restored, corrupt = checkpointing.restore_newest_intact(manager, jax.device_get(state), workdir)
    if corrupt:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tusk_jax: corrupt checkpoints read")
        checkpointing.set_aside(manager, workdir, corrupt, move=is_primary)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tusk_jax: corrupt checkpoints moved")
            manager.reload()
    if restored is not None:
        host_state, data_state, restored_step = restored
        state = state.replace(**{f: getattr(host_state, f) for f in _PYTREE_FIELDS})
        train_iter.set_state(data_state)
        logging.info("Resumed from the checkpoint of step %d in %s.", restored_step, workdir)
    start_step = int(state.step)
    if is_primary:
        # Written only now: a refused config or an unreadable run leaves the old one.
        config_lib.save_config(config, workdir)
        if restored is not None and changes:
            config_lib.record_config_changes(workdir, start_step, changes)
            logging.warning(
                "Resuming at step %d with a changed config (recorded in %s): %s",
                start_step,
                config_lib.CHANGES_FILE,
                ", ".join(f"{f} {a!r} -> {b!r}" for f, a, b, _ in changes),
            )

    vgg_params = None
    if config.loss.recon == "perceptual":
        vgg_params = state_lib.replicate(perceptual.load_vgg16_params(config.loss.vgg16_weights))
    p_train_step = make_p_train_step(config, model)
    replicated = state_lib.replicate(state)
    writer = summaries.SummaryWriter(workdir)
    write_images = _ImageSummaries(config, writer)
    num_steps = config.train.num_steps
    pending = None  # (step, device metrics): fetched one step late, not to stall dispatch
    accumulated: list[dict[str, float]] = []
    last_log_time = time.time()

    def consume(step, device_metrics):
        nonlocal last_log_time
        host = {k: float(v) for k, v in state_lib.unreplicate(device_metrics).items()}
        check_finite(step, host)
        accumulated.append(host)
        if step % config.train.log_every == 0 or step == num_steps:
            means = {k: float(np.mean([m[k] for m in accumulated])) for k in accumulated[0]}
            now = time.time()
            means["steps_per_second"] = len(accumulated) / max(now - last_log_time, 1e-9)
            means["learning_rate"] = state_lib.learning_rate_at(config, step - 1)
            last_log_time = now
            writer.write_scalars(step, means)
            accumulated.clear()
            bar.set_postfix(
                recon=f"{means['loss/recon']:.4f}",
                sw=f"{means.get('loss/sw', float('nan')):.3f}",
                protos=int(means["prototypes_in_use"]),
            )

    def save(step, force=False):
        host_state = state_lib.unreplicate(replicated)
        checkpointing.save(manager, step, host_state, train_iter.get_state(), force=force)

    with tqdm(
        total=num_steps,
        initial=start_step,
        desc="train",
        disable=not is_primary,
        dynamic_ncols=True,
        mininterval=2.0,
    ) as bar:
        step = start_step
        vote = distributed.StopVote()  # every process stops after the same step
        # One process: a signal during start-up (data, compilation) stops before the loop.
        stopping = jax.process_count() == 1 and stop.signal_name is not None
        try:
            while step < num_steps and not stopping:
                batch = next(train_iter)
                replicated, device_metrics = p_train_step(replicated, batch, vgg_params)
                step += 1
                if pending is not None:
                    consume(*pending)
                pending = (step, device_metrics)
                bar.update(1)
                if step % config.train.image_every == 0 or step == num_steps:
                    if pending is not None:  # a NaN is reported before the figures read the step
                        consume(*pending)
                        pending = None
                    _write_image_summaries(write_images, step, replicated, batch)
                if step % config.train.checkpoint_every == 0 and step < num_steps:
                    if (
                        pending is not None
                    ):  # never checkpoint a state whose losses were not checked
                        consume(*pending)
                        pending = None
                    save(step)
                vote.cast(stop.signal_name is not None)
                stopping = vote.decided()
            if pending is not None:
                consume(*pending)
                pending = None
        except NonFiniteError:
            checkpointing.wait(manager)
            _close_quietly(writer)
            raise
        except (checkpointing.CheckpointError, OSError):
            _close_quietly(writer)  # the disk may be full: the first error is the one to report
            raise
        if stopping:
            logging.warning(
                "%s received: saving step %d and stopping.",
                stop.signal_name or "Stop request of another process",
                step,
            )
        if step > start_step and manager.latest_step() != step:
            save(step, force=True)
    checkpointing.wait(manager)
    manager.close()
    writer.close()
    return state_lib.unreplicate(replicated)


def _close_quietly(writer) -> None:
    """Closes the summary writer on an error path, ignoring its own write errors."""
    try:
        writer.close()
    except OSError as error:
        logging.debug("Closing the summary writer failed: %s", error)


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
