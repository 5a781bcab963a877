"""Meaning of bilinear sampling and Gaussian splatting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tusk_jax import ops


def ramp_map(height=5, width=6, channels=2):
    """values[y, x] = (x + 10 y, -x) so interpolation results are known."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return jnp.asarray(np.stack([xx + 10 * yy, -xx], axis=-1)[..., :channels])


def test_integer_points_return_pixel_values():
    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.normal(size=(5, 6, 3)).astype(np.float32))
    xy = jnp.array([[0, 0], [5, 4], [2, 3], [5, 0]], jnp.float32)
    out = ops.bilinear_sample(values, xy)
    expected = np.asarray(values)[[0, 4, 3, 0], [0, 5, 2, 5]]
    np.testing.assert_array_equal(out, expected)


def test_interpolates_linearly_between_pixels():
    values = ramp_map()
    xy = jnp.array([[1.25, 2.5], [3.5, 0.75]])
    out = np.asarray(ops.bilinear_sample(values, xy))
    np.testing.assert_allclose(out[:, 0], [1.25 + 25.0, 3.5 + 7.5], rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], [-1.25, -3.5], rtol=1e-6)


def test_border_values_repeat_outside():
    values = ramp_map()
    xy = jnp.array([[-3.0, 2.0], [9.0, 1.0], [2.0, -0.4], [1.0, 7.5]])
    out = np.asarray(ops.bilinear_sample(values, xy))
    np.testing.assert_allclose(out[:, 0], [0 + 20, 5 + 10, 2 + 0, 1 + 40])


def test_bilinear_gradient_wrt_location():
    values = ramp_map()
    grad = jax.grad(lambda xy: jnp.sum(ops.bilinear_sample(values, xy)[:, 0]))(
        jnp.array([[2.3, 1.6]])
    )
    np.testing.assert_allclose(grad, [[1.0, 10.0]], rtol=1e-5)


def test_splat_sums_to_one_and_peaks_at_keypoint():
    xy = jnp.array([[3.0, 2.0], [0.0, 6.0], [7.2, 4.6], [-5.0, 20.0]])
    maps = np.asarray(ops.gaussian_splat(xy, 8, 9))
    assert maps.shape == (4, 8, 9)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
    assert peaks[:3] == [(2, 3), (6, 0), (5, 7)]  # (row, col) of the nearest pixel
    assert peaks[3] == (7, 0)  # off the image: the nearest border pixel
    assert np.all(np.isfinite(maps))


def test_splat_wide_variance_is_gaussian_shaped():
    maps = np.asarray(ops.gaussian_splat(jnp.array([[4.0, 4.0]]), 9, 9, variance=2.0))[0]
    ratio = maps[4, 5] / maps[4, 4]
    np.testing.assert_allclose(ratio, np.exp(-1 / 4.0), rtol=1e-5)
    np.testing.assert_allclose(maps, maps.T, rtol=1e-6)


def test_splat_gradient_finite_and_nonzero():
    grad = jax.grad(lambda xy: ops.gaussian_splat(xy, 6, 6)[0, 2, 3])(jnp.array([[3.2, 2.1]]))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="variance"):
        ops.gaussian_splat(jnp.zeros((2, 2)), 4, 4, variance=0.0)
    with pytest.raises(ValueError, match="xy must have trailing dimension 2"):
        ops.gaussian_splat(jnp.zeros((2, 3)), 4, 4)
    with pytest.raises(ValueError, match="values must have rank 3"):
        ops.bilinear_sample(jnp.zeros((4, 4)), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="xy must have rank 2"):
        ops.bilinear_sample(jnp.zeros((4, 4, 1)), jnp.zeros((2,)))
