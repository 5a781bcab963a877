"""The training objectives of SPEC section 3: unweighted terms and their weighted sum.

Each loss returns one unweighted scalar term; `weighted_total` sums
`weights[name] * term` over the terms given, in their order. `WEIGHT_FIELDS`
is the one list of terms and the `config.loss` field of each weight, so a new
loss is one function and one weight.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tusk_jax import ops, perceptual

# Term name -> the `config.loss` field of its weight.
WEIGHT_FIELDS = {
    "recon": "recon_weight",
    "kmeans": "kmeans_weight",
    "eqv_score": "eqv_score_weight",
    "eqv_feature": "eqv_feature_weight",
    "sw": "sw_weight",
}
# What trains the prototypes (`train.prototype_objective`) -> the term it minimises.
PROTOTYPE_OBJECTIVES = {"sliced_wasserstein": "sw", "kmeans": "kmeans"}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The fields the losses read (tusk_jax/configs/base.py documents each under `loss`)."""

    weights: Mapping[str, float]  # Term name -> weight (`WEIGHT_FIELDS`).
    recon: str = "mse"
    perceptual_reduction: str = "sum"
    kmeans_temperature: float = 20.0
    sw_num_projections: int = 100
    sw_noise_std: float = 0.02
    sw_count_rounding: str = "last"
    sw_spread: str = "channel_mean"
    compute_dtype: str = "float32"  # `model.dtype`: VGG16 of the perceptual loss computes in it.
    # `tps.outside`: what L_eqv's warps of the maps read beyond the padded canvas.
    eqv_outside: str = "zeros"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
        loss = config.loss
        fields = [f.name for f in dataclasses.fields(cls) if f.name in loss]
        return cls(
            weights={name: loss[field] for name, field in WEIGHT_FIELDS.items()},
            compute_dtype=config.model.dtype,
            eqv_outside=config.tps.outside,
            **{name: loss[name] for name in fields},
        )


def weighted_total(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
    """`sum(weights[name] * term)` over `terms`, in their order."""
    names = list(terms)
    total = weights[names[0]] * terms[names[0]]
    for name in names[1:]:
        total = total + weights[name] * terms[name]
    return total


def reconstruction_loss(
    cfg: LossConfig, images: jax.Array, reconstruction: jax.Array, vgg_params: Any = None
) -> jax.Array:
    """L_recon between `[B, H, W, 3]` images and reconstructions.

    `cfg.recon` 'mse': mean squared error over pixels and channels;
    'perceptual': `tusk_jax.perceptual.perceptual_loss` with `vgg_params`.
    """
    if cfg.recon == "mse":
        return jnp.mean((images - reconstruction) ** 2)
    if vgg_params is None:
        raise ValueError("loss.recon='perceptual' needs VGG16 parameters (loss.vgg16_weights).")
    return perceptual.perceptual_loss(
        vgg_params,
        images,
        reconstruction,
        reduction=cfg.perceptual_reduction,
        dtype=cfg.compute_dtype,
    )


def equivariance_losses(
    score_1: jax.Array,
    feature_1: jax.Array,
    score_2: jax.Array,
    feature_2: jax.Array,
    grids: jax.Array,
    outside: str = "zeros",
) -> tuple[jax.Array, jax.Array]:
    """The two parts of L_eqv: (score-map MSE, feature-map MSE).

    The maps of I1 are warped by the pair's warp T (`grids`, on the padded
    canvas, as `ops.make_training_pair` returns them; the maps are padded by
    H / 5 with reflection first) and compared with the maps of I2.

    Args:
      score_1, score_2: `[B, H, W]` score maps of I1 and I2.
      feature_1, feature_2: `[B, H, W, C]` feature maps of I1 and I2.
      grids: `[B, H + 2p, W + 2p, 2]` normalised sampling grids of T.
      outside: what the warps read beyond the padded canvas (`ops.WARP_OUTSIDES`):
        "zeros" (the release's grid_sample) or "padding" (the reflection continued).
    """
    warp = jax.vmap(functools.partial(ops.warp_padded, padding="reflect", outside=outside))
    warped_score = warp(score_1[..., None], grids)[..., 0]
    warped_feature = warp(feature_1, grids)
    return (
        jnp.mean((warped_score - score_2) ** 2),
        jnp.mean((warped_feature - feature_2) ** 2),
    )


def cluster_loss(cfg: LossConfig, descriptors: jax.Array, prototypes: jax.Array) -> jax.Array:
    """L_km of `[..., C]` descriptors against `[M, C]` prototypes."""
    flat = descriptors.reshape(-1, descriptors.shape[-1])
    return ops.kmeans_loss(flat, prototypes, cfg.kmeans_temperature)


def prototype_loss(
    cfg: LossConfig, key: jax.Array, descriptors: jax.Array, prototypes: jax.Array
) -> jax.Array:
    """L_sw of `[N, C]` descriptors (the global batch) against `[M, C]` prototypes."""
    return ops.sliced_wasserstein_loss(
        key,
        descriptors,
        prototypes,
        cfg.sw_num_projections,
        cfg.sw_noise_std,
        cfg.sw_count_rounding,
        cfg.sw_spread,
    )


def network_terms(
    cfg: LossConfig,
    images: jax.Array,
    grids: jax.Array,
    out: dict[str, jax.Array],
    prototypes: jax.Array,
    vgg_params: Any = None,
) -> dict[str, jax.Array]:
    """The encoder/decoder terms of one batch of pairs: recon, kmeans, eqv_score, eqv_feature.

    Args:
      images: `[2b, H, W, 3]`, the b first images I1 then their warps I2.
      grids: `[b, ...]` the pairs' warps (see `equivariance_losses`).
      out: the model's outputs on `images`.
      prototypes: `[M, C]`.
    """
    b = grids.shape[0]
    terms = {
        "recon": reconstruction_loss(cfg, images, out["reconstruction"], vgg_params),
        "kmeans": cluster_loss(cfg, out["descriptors"], prototypes),
    }
    terms["eqv_score"], terms["eqv_feature"] = equivariance_losses(
        out["score_map"][:b],
        out["feature_map"][:b],
        out["score_map"][b:],
        out["feature_map"][b:],
        grids,
        cfg.eqv_outside,
    )
    return terms


def prototype_objective(cfg: LossConfig, kind: str) -> tuple[str, Callable]:
    """`(term name, f(key, descriptors [N, C], prototypes) -> (weighted, unweighted))`.

    `kind`: 'sliced_wasserstein' (L_sw, the method) or 'kmeans' (L_km, the
    paper's Table 6 ablation).
    """
    name = PROTOTYPE_OBJECTIVES[kind]
    weight = cfg.weights[name]

    def objective(key, descriptors, prototypes):
        if name == "kmeans":
            term = cluster_loss(cfg, descriptors, prototypes)
        else:
            term = prototype_loss(cfg, key, descriptors, prototypes)
        return weight * term, term

    return name, objective
