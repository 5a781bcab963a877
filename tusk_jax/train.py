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
from flax import struct
from jax import lax
from jax.experimental import multihost_utils
from tqdm import tqdm

from tusk_jax import (
    checkpointing,
    config_lib,
    distributed,
    evaluate,
    inference,
    input_pipeline,
    losses,
    models,
    ops,
    perceptual,
    summaries,
)

AXIS = "batch"


@struct.dataclass
class TrainState:
    """Everything a run needs to continue; checkpointed as one pytree.

    Attributes:
      step: int32 scalar, iterations done.
      params: flax variables `{'params': {'encoder': ..., 'decoder': ...}}`.
      prototypes: `[M, C]` prototypes (L2-normalised wherever they are used).
      opt_state: Adam state of encoder + decoder.
      prototype_opt_state: Adam state of the prototypes.
      rng: base PRNG key (uint32 `[2]`); each step folds in its step number.
      tx, prototype_tx: the two optax transformations (not pytree leaves).
    """

    step: jax.Array
    params: Any
    prototypes: jax.Array
    opt_state: Any
    prototype_opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    prototype_tx: optax.GradientTransformation = struct.field(pytree_node=False)


def make_optimizers(
    config: ml_collections.ConfigDict, device_count: int | None = None
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """Adam for encoder + decoder and Adam(b1=0.5) for the prototypes (SPEC 3).

    The encoder/decoder learning rate follows `train.lr_schedule` (see
    `learning_rate_schedule`); the prototypes' is constant.
    """
    scale = 1.0
    if config.train.scale_lr_by_devices:
        scale = float(jax.device_count() if device_count is None else device_count)
    schedule, warmup_steps = config_lib.lr_schedule(config)
    return _optimizers(
        config.train.learning_rate * scale,
        schedule,
        int(warmup_steps),
        int(config.train.num_steps),
        config.train.prototype_learning_rate * scale,
        config.train.prototype_b1,
        config.train.prototype_b2,
    )


def learning_rate_schedule(
    peak: float, schedule: str, warmup_steps: int, num_steps: int
) -> float | optax.Schedule:
    """The encoder/decoder learning rate: a constant, or a function of the step.

    cosine: 0 -> `peak` linearly over `warmup_steps`, then a half cosine from
    `peak` to 0 at `num_steps` (optax counts the Adam updates, so a resumed
    run continues the same curve).
    """
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=num_steps
        )
    raise ValueError(f"unknown train.lr_schedule {schedule!r}; valid: {config_lib.LR_SCHEDULES}.")


def learning_rate_at(config: ml_collections.ConfigDict, update: int) -> float:
    """The encoder/decoder lr of 0-based Adam update `update`, before device scaling."""
    schedule, warmup_steps = config_lib.lr_schedule(config)
    lr = learning_rate_schedule(
        config.train.learning_rate, schedule, warmup_steps, config.train.num_steps
    )
    return float(lr(update) if callable(lr) else lr)


@functools.cache
def _optimizers(
    learning_rate,
    schedule,
    warmup_steps,
    num_steps,
    prototype_learning_rate,
    prototype_b1,
    prototype_b2,
):
    # Cached: the transformations are static fields of TrainState, hence part
    # of its tree structure; equal settings must give the very same objects or
    # every new state would compile the step again.
    lr = learning_rate_schedule(learning_rate, schedule, warmup_steps, num_steps)
    return optax.adam(lr), optax.adam(prototype_learning_rate, b1=prototype_b1, b2=prototype_b2)


def replicate(tree: Any, devices: list | None = None) -> Any:
    """Copies every leaf to each device, stacked on a leading axis, for `pmap`.

    The arrays get the sharding `pmap` gives its own outputs (a mesh axis
    named 'batch'), so feeding a replicated state and feeding the state a
    step returned run the same compiled program (flax's `replicate` uses
    another mesh axis name, which costs a second compilation).
    """
    devices = jax.local_devices() if devices is None else devices
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS)
    )
    return jax.tree.map(
        lambda x: jax.device_put(
            np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), sharding
        ),
        tree,
    )


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree, on the host (numpy)."""
    return jax.device_get(jax.tree.map(lambda x: x[0], tree))


def create_train_state(config: ml_collections.ConfigDict, model: models.TUSK) -> TrainState:
    """Initial state: network parameters, prototypes ~ N(0, 1), fresh optimizers."""
    rng = jax.random.PRNGKey(config.seed)
    key_params, key_prototypes, key_train = jax.random.split(rng, 3)
    size = config.dataset.image_size
    params = jax.jit(model.init)(key_params, jnp.zeros((1, size, size, 3), jnp.float32))
    prototypes = jax.random.normal(
        key_prototypes, (config.model.num_prototypes, config.model.feature_dim)
    )
    tx, prototype_tx = make_optimizers(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        prototypes=prototypes,
        opt_state=tx.init(params),
        prototype_opt_state=prototype_tx.init(prototypes),
        rng=key_train,
        tx=tx,
        prototype_tx=prototype_tx,
    )


def tps_arguments(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of `ops.make_training_pair` from `config.tps`."""
    t = config.tps
    return dict(
        scale=t.scale,
        scale_var=t.scale_var,
        tps=t.tps,
        off=t.off,
        rot=t.rot,
        padding=t.padding,
        cval=t.cval,
    )


def train_step(
    state: TrainState,
    images: jax.Array,
    vgg_params: Any,
    *,
    model: models.TUSK,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One TUSK iteration on one device's share of the batch (run under `pmap`).

    Args:
      state: the replicated `TrainState`.
      images: `[b, H, W, 3]` float in [0, 1], this device's images; each
        becomes one pair.
      vgg_params: frozen VGG16 parameters for the perceptual loss, or None.
      model, config: static, bound with `functools.partial`.

    Returns:
      `(new_state, metrics)`; metrics are averaged over devices.
    """
    local_batch = images.shape[0]
    step_key = jax.random.fold_in(state.rng, state.step)
    pair_key, prototype_key = jax.random.split(step_key)
    # Per-example keys from the *global* example index: the pairs do not
    # depend on how the global batch is split over devices or processes.
    first_example = lax.axis_index(AXIS) * local_batch
    example_keys = jax.vmap(lambda i: jax.random.fold_in(pair_key, first_example + i))(
        jnp.arange(local_batch)
    )
    i1, i2, grids = jax.vmap(functools.partial(ops.make_training_pair, **tps_arguments(config)))(
        example_keys, images
    )
    both = jnp.concatenate([i1, i2], axis=0)
    weights = config.loss
    joint = not config.train.alternate
    kmeans_prototypes = config_lib.prototype_objective(config) == "kmeans"

    def prototype_objective(key, descriptors, prototypes):
        """What the prototypes minimise: weighted L_sw, or L_km in the k-means ablation."""
        if kmeans_prototypes:
            return weights.kmeans_weight * losses.cluster_loss(config, descriptors, prototypes)
        return weights.sw_weight * losses.prototype_loss(config, key, descriptors, prototypes)

    def loss_fn(params, prototypes):
        if not joint:
            prototypes = lax.stop_gradient(prototypes)
        out = model.apply(params, both)
        terms = {
            "recon": losses.reconstruction_loss(config, both, out["reconstruction"], vgg_params),
            "kmeans": losses.cluster_loss(config, out["descriptors"], prototypes),
        }
        terms["eqv_score"], terms["eqv_feature"] = losses.equivariance_losses(
            config,
            out["score_map"][:local_batch],
            out["feature_map"][:local_batch],
            out["score_map"][local_batch:],
            out["feature_map"][local_batch:],
            grids,
        )
        total = (
            weights.recon_weight * terms["recon"]
            + weights.kmeans_weight * terms["kmeans"]
            + weights.eqv_score_weight * terms["eqv_score"]
            + weights.eqv_feature_weight * terms["eqv_feature"]
        )
        if joint and not kmeans_prototypes:
            # (With k-means prototypes, the L_km term above already trains them.)
            descriptors = _gather_descriptors(out["descriptors"])
            terms["sw"] = losses.prototype_loss(config, prototype_key, descriptors, prototypes)
            total = total + weights.sw_weight * terms["sw"]
        return total, (terms, out)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (total, (terms, out)), (grads, prototype_grads) = grad_fn(state.params, state.prototypes)
    grads = lax.pmean(grads, AXIS)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    if config.train.prototype_descriptors == "updated":
        # The reference fits the prototypes to the descriptors of the updated
        # encoder (one more forward pass; fixed during the prototype steps).
        fitted = model.apply(params, both, method=models.TUSK.keypoints)["descriptors"]
    else:
        fitted = out["descriptors"]  # From before the update: no extra pass.
    descriptors = _gather_descriptors(lax.stop_gradient(fitted))
    prototypes, prototype_opt_state = state.prototypes, state.prototype_opt_state
    metrics = {}
    if joint:
        prototype_grads = lax.pmean(prototype_grads, AXIS)
        prototype_updates, prototype_opt_state = state.prototype_tx.update(
            prototype_grads, prototype_opt_state, prototypes
        )
        prototypes = optax.apply_updates(prototypes, prototype_updates)
        metrics["prototype_grad_norm"] = optax.tree.norm(prototype_grads)
    elif config.train.num_prototype_steps > 0:

        def prototype_step(carry, index):
            prototypes, opt_state = carry
            loss, grad = jax.value_and_grad(
                lambda p: prototype_objective(
                    jax.random.fold_in(prototype_key, index), descriptors, p
                )
            )(prototypes)
            updates, opt_state = state.prototype_tx.update(grad, opt_state, prototypes)
            return (optax.apply_updates(prototypes, updates), opt_state), (
                loss,
                optax.tree.norm(grad),
            )

        (prototypes, prototype_opt_state), (sw_losses, sw_grad_norms) = lax.scan(
            prototype_step,
            (prototypes, prototype_opt_state),
            jnp.arange(config.train.num_prototype_steps),
        )
        if not kmeans_prototypes:
            terms["sw"] = sw_losses[0] / weights.sw_weight if weights.sw_weight else sw_losses[0]
        metrics["prototype_loss_first"] = sw_losses[0]
        metrics["prototype_loss_last"] = sw_losses[-1]
        metrics["prototype_grad_norm"] = sw_grad_norms[0]

    nearest = ops.nearest_prototype(descriptors, prototypes)
    metrics.update({f"loss/{name}": value for name, value in terms.items()})
    metrics["loss/total"] = total
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["confidence"] = jnp.mean(out["confidence"])
    metrics = lax.pmean(metrics, AXIS)
    # Identical on every device (computed from the gathered descriptors).
    metrics["prototypes_in_use"] = jnp.sum(
        jnp.bincount(nearest, length=config.model.num_prototypes) > 0
    )
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
    """`train_step` with its static arguments bound, `pmap`ped over local devices."""
    return jax.pmap(
        functools.partial(train_step, model=model, config=config),
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
) -> TrainState:
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


def _train_and_evaluate(config, workdir, allow_config_change, stop) -> TrainState:
    config_lib.validate_config(config)
    changes = _prepare_workdir(config, workdir, allow_config_change)
    workdir = os.path.abspath(workdir)
    is_primary = jax.process_index() == 0

    model = models.TUSK(config.model)
    state = create_train_state(config, model)
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
        vgg_params = replicate(perceptual.load_vgg16_params(config.loss.vgg16_weights))
    p_train_step = make_p_train_step(config, model)
    replicated = replicate(state)
    writer = summaries.SummaryWriter(workdir)
    write_images = _ImageSummaries(config, writer)
    num_steps = config.train.num_steps
    pending = None  # (step, device metrics): fetched one step late, not to stall dispatch
    accumulated: list[dict[str, float]] = []
    last_log_time = time.time()

    def consume(step, device_metrics):
        nonlocal last_log_time
        host = {k: float(v) for k, v in unreplicate(device_metrics).items()}
        check_finite(step, host)
        accumulated.append(host)
        if step % config.train.log_every == 0 or step == num_steps:
            means = {k: float(np.mean([m[k] for m in accumulated])) for k in accumulated[0]}
            now = time.time()
            means["steps_per_second"] = len(accumulated) / max(now - last_log_time, 1e-9)
            means["learning_rate"] = learning_rate_at(config, step - 1)
            last_log_time = now
            writer.write_scalars(step, means)
            accumulated.clear()
            bar.set_postfix(
                recon=f"{means['loss/recon']:.4f}",
                sw=f"{means.get('loss/sw', float('nan')):.3f}",
                protos=int(means["prototypes_in_use"]),
            )

    def save(step, force=False):
        host_state = unreplicate(replicated)
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
                    # A NaN is reported before the figures read the step.
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    _write_image_summaries(write_images, step, replicated, batch)
                if step % config.train.checkpoint_every == 0 and step < num_steps:
                    # Never checkpoint a state whose losses were not checked.
                    if pending is not None:
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
                "%s received: %s.",
                stop.signal_name or "Stop request of another process",
                f"saving step {step} and stopping"
                if step > start_step
                else f"stopping before the first step (step {step} is already saved or untrained)",
            )
        if step > start_step and manager.latest_step() != step:
            save(step, force=True)
    checkpointing.wait(manager)
    manager.close()
    writer.close()
    return unreplicate(replicated)


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
    """Writes the evaluation figures (`evaluate.make_figures`) of a few training images.

    Detections coloured by prototype, reconstructions, alpha layers (alpha
    mode), each prototype rendered alone and a t-SNE of the descriptors. One
    `inference.Detector` is kept and given the current weights each time, so
    its functions compile once per run.
    """

    def __init__(self, config: ml_collections.ConfigDict, writer, count: int = 4):
        self.config, self.writer, self.count = config, writer, count
        self.detector = None

    def __call__(self, step: int, replicated: TrainState, batch: np.ndarray) -> None:
        if not self.writer.enabled:
            return
        params = unreplicate(replicated.params)
        prototypes = unreplicate(replicated.prototypes)
        check_finite_arrays(step, {"params": params, "prototypes": prototypes})
        if self.detector is None:
            self.detector = inference.Detector(self.config, params, prototypes, step=step)
        else:
            self.detector.update(params, prototypes, step=step)
        images = np.asarray(batch[0, : self.count])
        first = {"image": images, **self.detector.apply(images)}
        descriptors = first["descriptors"].reshape(-1, first["descriptors"].shape[-1])
        figures = evaluate.make_figures(self.detector, first, descriptors)
        self.writer.write_images(step, figures)
