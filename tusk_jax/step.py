"""One training iteration (SPEC sections 3-4), `pmap`ped over the devices (axis 'batch').

`train_step` makes a TPS pair (I1, I2) of every image, runs `network_update`
(one Adam step of encoder + decoder on the weighted terms, the prototypes
frozen, gradients averaged across devices), then `prototype_update`:
`num_prototype_steps` Adam steps of the prototypes on the all-gathered
descriptors (of the updated encoder by default) in a `lax.scan`. Every device
computes the same prototype update from the same descriptors and key, so the
prototypes stay identical without communication. Ablations (the paper's
Tables 4 and 6): `train.alternate=False` moves the prototypes in the network
step; `train.prototype_objective='kmeans'` fits them with L_km.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from tusk_jax import losses, models, ops
from tusk_jax import state as state_lib

AXIS = state_lib.AXIS

TPS_FIELDS = ("scale", "scale_var", "tps", "off", "rot", "padding", "cval", "grid", "outside")


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
