"""The training state: `TrainState`, its creation, the optimizers and device replication.

The loop and the step are in `tusk_jax.train`; restoring a saved state is
`tusk_jax.checkpointing`'s job.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from tusk_jax import config_lib, models

AXIS = "batch"  # The `pmap` axis of the devices.


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
    schedule, warmup_steps = config.train.lr_schedule, config.train.warmup_steps
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
    schedule, warmup_steps = config.train.lr_schedule, config.train.warmup_steps
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
