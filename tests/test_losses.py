"""Meaning of the loss terms' options (`tusk_jax.losses`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tetrominoes
from tusk_jax import losses, ops


def _maps(batch=2, size=10, channels=3):
    """Constant maps of ones for I1 and I2: any warp inside the canvas keeps them."""
    return jnp.ones((batch, size, size)), jnp.ones((batch, size, size, channels))


@pytest.mark.parametrize("outside", ops.WARP_OUTSIDES)
def test_equivariance_is_zero_for_the_identity_warp(outside):
    score, feature = _maps()
    canvas = jnp.broadcast_to(ops.identity_grid(14, 14), (2, 14, 14, 2))
    terms = losses.equivariance_losses(score, feature, score, feature, canvas, outside)
    np.testing.assert_allclose(terms, (0.0, 0.0), atol=1e-10)


def test_equivariance_outside_the_canvas():
    """Maps read from beyond the reflect-padded canvas: 0 with "zeros" (the release's
    grid_sample), the mirrored map with "padding"."""
    score, feature = _maps()
    # Every output pixel reads 11 columns to its right: all but the crop's
    # first column read beyond the 14-pixel canvas (see test_ops_warps).
    shifted = ops.identity_grid(14, 14) + jnp.array([22.0 / 14.0, 0.0])
    grids = jnp.broadcast_to(shifted, (2, 14, 14, 2))
    padding = losses.equivariance_losses(score, feature, score, feature, grids, "padding")
    np.testing.assert_allclose(padding, (0.0, 0.0), atol=1e-10)
    # 9 of 10 columns warped to 0 against maps of 1: mean squared error 0.9.
    zeros = losses.equivariance_losses(score, feature, score, feature, grids, "zeros")
    np.testing.assert_allclose(zeros, (0.9, 0.9), rtol=1e-6)


def test_loss_config_takes_the_warp_outside_from_tps():
    config = tetrominoes.get_config("test")
    assert losses.LossConfig.from_config(config).eqv_outside == config.tps.outside == "zeros"
    cpu = tetrominoes.get_config("cpu")
    assert losses.LossConfig.from_config(cpu).eqv_outside == "padding"
