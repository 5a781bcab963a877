"""The training objectives of SPEC section 3, on batched model outputs.

Each function takes the batched arrays the model produces and returns a
scalar; the weights are applied by the caller (`tusk_jax.train`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from tusk_jax import config_lib, ops, perceptual


def reconstruction_loss(
    config: ml_collections.ConfigDict,
    images: jax.Array,
    reconstruction: jax.Array,
    vgg_params=None,
) -> jax.Array:
    """L_recon between `[B, H, W, 3]` images and reconstructions.

    `config.loss.recon` 'mse': mean squared error over pixels and channels;
    'perceptual': `tusk_jax.perceptual.perceptual_loss` with `vgg_params`.
    """
    if config.loss.recon == "mse":
        return jnp.mean((images - reconstruction) ** 2)
    if vgg_params is None:
        raise ValueError("loss.recon='perceptual' needs VGG16 parameters (loss.vgg16_weights).")
    return perceptual.perceptual_loss(
        vgg_params, images, reconstruction, reduction=config.loss.perceptual_reduction
    )


def equivariance_losses(
    config: ml_collections.ConfigDict,
    score_1: jax.Array,
    feature_1: jax.Array,
    score_2: jax.Array,
    feature_2: jax.Array,
    grids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The two parts of L_eqv: (score-map MSE, feature-map MSE).

    The maps of I1 are warped by the pair's warp T (`grids`, on the padded
    canvas, as `ops.make_training_pair` returns them; the maps are padded by
    H / 5 with reflection first) and compared with the maps of I2.

    Args:
      score_1, score_2: `[B, H, W]` score maps of I1 and I2.
      feature_1, feature_2: `[B, H, W, C]` feature maps of I1 and I2.
      grids: `[B, H + 2p, W + 2p, 2]` normalised sampling grids of T.
    """
    del config  # The maps are always reflection-padded (SPEC 3).
    warp = jax.vmap(functools.partial(ops.warp_padded, padding="reflect"))
    warped_score = warp(score_1[..., None], grids)[..., 0]
    warped_feature = warp(feature_1, grids)
    return (
        jnp.mean((warped_score - score_2) ** 2),
        jnp.mean((warped_feature - feature_2) ** 2),
    )


def cluster_loss(
    config: ml_collections.ConfigDict, descriptors: jax.Array, prototypes: jax.Array
) -> jax.Array:
    """L_km of `[B, K, C]` descriptors against `[M, C]` prototypes."""
    flat = descriptors.reshape(-1, descriptors.shape[-1])
    return ops.kmeans_loss(flat, prototypes, config.loss.kmeans_temperature)


def prototype_loss(
    config: ml_collections.ConfigDict, key: jax.Array, descriptors: jax.Array, prototypes: jax.Array
) -> jax.Array:
    """L_sw of `[N, C]` descriptors (the global batch) against `[M, C]` prototypes."""
    return ops.sliced_wasserstein_loss(
        key,
        descriptors,
        prototypes,
        config.loss.sw_num_projections,
        config.loss.sw_noise_std,
        config_lib.sw_count_rounding(config),
        config.loss.sw_spread,
    )
