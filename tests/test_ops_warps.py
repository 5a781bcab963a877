"""Meaning of the TPS warps, `warp` and the training pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tusk_jax import ops
from tusk_jax.ops import warps

MULTI_OBJECT_TPS = dict(scale=0.95, scale_var=0.02, tps=0.02, off=0.05, rot=0.1)


def test_normalised_pixel_centres():
    grid = np.asarray(ops.identity_grid(2, 4))
    np.testing.assert_allclose(grid[0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(grid[:, 0, 1], [-0.5, 0.5])
    xy = jnp.array([[0.0, 0.0], [3.0, 1.0]])
    back = ops.normalised_to_pixel(ops.pixel_to_normalised(xy, 2, 4), 2, 4)
    np.testing.assert_allclose(back, xy, atol=1e-6)


def test_random_tps_constants():
    points, displacement = ops.random_tps(jax.random.PRNGKey(3), **MULTI_OBJECT_TPS)
    assert points.shape == displacement.shape == (16, 2)
    # Jittered control points stay within 0.1 of (+-0.7, +-0.7), (+-0.5, +-0.5).
    base = np.abs(np.asarray(points[:8]))
    assert np.all(np.abs(base[:4] - 0.7) <= 0.1 + 1e-6)
    assert np.all(np.abs(base[4:] - 0.5) <= 0.1 + 1e-6)
    # Border anchors are fixed and do not move.
    np.testing.assert_array_equal(points[8:], warps._BORDER_ANCHORS)
    np.testing.assert_array_equal(displacement[8:], 0.0)
    assert np.any(displacement[:8] != 0)


def test_zero_displacement_is_identity():
    points, _ = ops.random_tps(jax.random.PRNGKey(0), **MULTI_OBJECT_TPS)
    grid = ops.tps_sampling_grid(points, jnp.zeros_like(points), 7, 9)
    np.testing.assert_allclose(grid, ops.identity_grid(7, 9), atol=1e-5)


def test_tps_maps_control_points_to_their_targets():
    points, displacement = ops.random_tps(jax.random.PRNGKey(1), 0.9, 0.05, 0.1, 0.05, 0.25)
    moved = ops.tps_transform(points, displacement, points)
    np.testing.assert_allclose(moved, points + displacement, atol=1e-4)


def test_tps_reproduces_a_translation_exactly():
    points, _ = ops.random_tps(jax.random.PRNGKey(2), **MULTI_OBJECT_TPS)
    shift = jnp.array([0.1, -0.05])
    query = jax.random.uniform(jax.random.PRNGKey(4), (5, 3, 2), minval=-1, maxval=1)
    out = ops.tps_transform(points, jnp.broadcast_to(shift, points.shape), query)
    np.testing.assert_allclose(out, query + shift, atol=1e-5)


def test_warp_with_identity_grid_returns_input():
    image = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 3))
    for padding in ("reflect", "constant"):
        out = ops.warp(image, ops.identity_grid(6, 8), padding)
        np.testing.assert_allclose(out, image, atol=1e-6)


def test_translation_warp_moves_lit_pixel():
    height, width, shift = 10, 12, 3
    image = jnp.zeros((height, width, 1)).at[4, 5, 0].set(1.0)
    # Output pixel x reads input x + 3 (pixels): the lit pixel moves 3 left.
    grid = ops.identity_grid(height, width) + jnp.array([2.0 * shift / width, 0.0])
    out = np.asarray(ops.warp(image, grid, "constant"))[..., 0]
    expected = np.zeros((height, width))
    expected[4, 5 - shift] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_padding_modes_beyond_the_border():
    image = jnp.arange(4.0).reshape(1, 4, 1)  # one row: 0 1 2 3
    # Read at pixel x = -1 and x = 4: reflect mirrors about the outer edges.
    xs = ops.pixel_to_normalised(jnp.array([[-1.0, 0.0], [4.0, 0.0]]), 1, 4)
    grid = xs.reshape(1, 2, 2)
    np.testing.assert_allclose(ops.warp(image, grid, "reflect")[0, :, 0], [0.0, 3.0])
    np.testing.assert_allclose(ops.warp(image, grid, "constant", 7.0)[0, :, 0], [7.0, 7.0])


def test_training_pair_shapes_and_warp_consistency():
    image = jax.random.uniform(jax.random.PRNGKey(0), (20, 20, 3))
    i1, i2, grid = ops.make_training_pair(jax.random.PRNGKey(1), image, **MULTI_OBJECT_TPS)
    assert i1.shape == i2.shape == (20, 20, 3) and grid.shape == (28, 28, 2)
    # I2 is I1 warped by T on the padded canvas: warp_padded of I1 with the
    # returned grid gives I2 away from the pad (where I1 itself was mirrored).
    again = ops.warp_padded(i1, grid)
    np.testing.assert_allclose(again[6:14, 6:14], i2[6:14, 6:14], atol=0.02)
    assert float(jnp.abs(i1 - i2).mean()) > 1e-3


def test_training_pair_constant_padding_fills_cval():
    image = jnp.zeros((20, 20, 3))
    # Scale 1.6: output pixel q reads the input near 1.6 q, so the corners of
    # I2 show the pad (which must hold cval) while the centre still shows the image.
    _, i2, _ = ops.make_training_pair(
        jax.random.PRNGKey(0),
        image,
        1.6,
        0.0,
        0.0,
        0.0,
        0.0,
        padding="constant",
        cval=1.0,
        grid="pixel_centres",
        outside="padding",
    )
    assert float(i2[0, 0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(i2[10, 10, 0]) == pytest.approx(0.0, abs=1e-5)


def test_training_pair_outside_the_canvas():
    """`outside`: beyond the padded canvas the warps read 0 (the release) or the padding."""
    image = jnp.zeros((20, 20, 3))
    pair = lambda outside: ops.make_training_pair(
        jax.random.PRNGKey(0),
        image,
        1.6,
        0.0,
        0.0,
        0.0,
        0.0,
        padding="constant",
        cval=1.0,
        grid="pixel_centres",
        outside=outside,
    )
    _, i2_padding, grid = pair("padding")
    _, i2_zeros, same_grid = pair("zeros")
    np.testing.assert_array_equal(grid, same_grid)
    # I2's corner reads beyond the 28 x 28 canvas ([-1, 1]^2), the middle of
    # its top row reads the pad inside it, its centre the image.
    assert float(jnp.min(grid[4, 4])) < -1.0 and float(jnp.max(jnp.abs(grid[4, 14]))) < 1.0
    assert float(i2_padding[0, 0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(i2_zeros[0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    for i2 in (i2_padding, i2_zeros):
        assert float(i2[0, 10, 0]) == pytest.approx(1.0, abs=1e-5)
        assert float(i2[10, 10, 0]) == pytest.approx(0.0, abs=1e-6)


def test_warp_padded_outside_the_canvas():
    """A map of ones warped from beyond its canvas: 0 with "zeros", 1 with "padding"."""
    ones = jnp.ones((10, 10, 2))
    canvas = ops.identity_grid(14, 14)  # The padded canvas: p = 2.
    # Every output pixel reads 11 columns to its right (22 / 14 normalised):
    # crop column c (canvas column c + 2) reads canvas column c + 13, inside
    # the canvas (its last column) only for c = 0.
    shifted = canvas + jnp.array([22.0 / 14.0, 0.0])
    zeros = np.asarray(ops.warp_padded(ones, shifted, outside="zeros"))
    padding = np.asarray(ops.warp_padded(ones, shifted, outside="padding"))
    np.testing.assert_allclose(padding, 1.0, atol=1e-6)
    np.testing.assert_allclose(zeros[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(zeros[:, 1:], 0.0, atol=1e-6)
    # The identity warp changes nothing either way.
    for outside in ops.WARP_OUTSIDES:
        np.testing.assert_allclose(ops.warp_padded(ones, canvas, outside=outside), 1.0, atol=1e-6)


def _ramp(height, width):
    """`[H, W, 2]`: channel 0 is x + 1, channel 1 is y + 1 (pixel units)."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([xs + 1.0, ys + 1.0], axis=-1).astype(np.float32)


def _zoom_read(n):
    """Where output pixel i reads on the release's grid: i n / (n - 1) - 1/2 (pixels)."""
    return np.arange(n) * n / (n - 1) - 0.5


def test_identity_spline_on_the_release_grid_zooms_out():
    """The release's grid: output pixel i reads input i W / (W - 1) - 1/2 (bilinear)."""
    height, width = 7, 9
    points, _ = ops.random_tps(jax.random.PRNGKey(0), **MULTI_OBJECT_TPS)
    zero = jnp.zeros_like(points)
    image = jnp.asarray(_ramp(height, width))
    centres = ops.tps_sampling_grid(points, zero, height, width, grid="pixel_centres")
    np.testing.assert_allclose(ops.warp(image, centres, "constant"), image, atol=1e-5)
    release = ops.tps_sampling_grid(points, zero, height, width, grid="release")
    out = np.asarray(ops.warp(image, release, "constant"))  # zeros beyond, as grid_sample
    # Along one axis, a ramp v = x + 1 read bilinearly at x is x + 1 inside
    # [0, W - 1]; half a pixel beyond the border the outer pixel weighs 1/2
    # against a zero. Across the other axis the ramp is constant: weight 1/2 there too.
    x, y = _zoom_read(width), _zoom_read(height)
    ramp_x = np.where(x < 0, 0.5 * 1.0, np.where(x > width - 1, 0.5 * width, x + 1.0))
    ramp_y = np.where(y < 0, 0.5 * 1.0, np.where(y > height - 1, 0.5 * height, y + 1.0))
    inside_x = np.where((x < 0) | (x > width - 1), 0.5, 1.0)
    inside_y = np.where((y < 0) | (y > height - 1), 0.5, 1.0)
    np.testing.assert_allclose(out[..., 0], inside_y[:, None] * ramp_x[None, :], atol=1e-4)
    np.testing.assert_allclose(out[..., 1], ramp_y[:, None] * inside_x[None, :], atol=1e-4)


def _bilinear(values, x, y):
    """numpy bilinear read of `[H, W, C]` at pixel coordinates inside the map."""
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x1, y1 = np.minimum(x0 + 1, values.shape[1] - 1), np.minimum(y0 + 1, values.shape[0] - 1)
    top = values[y0, x0] * (1 - fx) + values[y0, x1] * fx
    bottom = values[y1, x0] * (1 - fx) + values[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def test_training_pair_grid_reaches_both_warps(monkeypatch):
    """Identity splines: "pixel_centres" keeps the image, "release" zooms each warp out."""
    size, p = 20, 4
    monkeypatch.setattr(
        warps, "MILD_TPS", dict(scale=1.0, scale_var=0.0, tps=0.0, off=0.0, rot=0.0)
    )
    image = jax.random.uniform(jax.random.PRNGKey(0), (size, size, 3))
    identity = dict(scale=1.0, scale_var=0.0, tps=0.0, off=0.0, rot=0.0)
    key = jax.random.PRNGKey(1)
    i1, i2, grid = ops.make_training_pair(key, image, **identity, grid="pixel_centres")
    np.testing.assert_allclose(i1, image, atol=1e-5)
    np.testing.assert_allclose(i2, image, atol=1e-5)
    np.testing.assert_allclose(grid, ops.identity_grid(size + 2 * p, size + 2 * p), atol=1e-5)
    i1, i2, grid = ops.make_training_pair(key, image, **identity, grid="release")
    n = size + 2 * p
    np.testing.assert_allclose(grid, ops.tps_query_grid(n, n, "release"), atol=1e-5)
    # I1: the reflect-padded canvas read at i n / (n - 1) - 1/2, cropped.
    canvas = np.pad(np.asarray(image), ((p, p), (p, p), (0, 0)), mode="reflect")
    read = _zoom_read(n)[p : p + size]
    ys, xs = np.meshgrid(read, read, indexing="ij")
    np.testing.assert_allclose(i1, _bilinear(canvas, xs, ys), atol=1e-5)
    # I2 is I1's canvas zoomed once more: not I1.
    assert float(jnp.abs(i2 - i1).max()) > 1e-2


def test_warp_gradient_finite_and_nonzero():
    image = jax.random.uniform(jax.random.PRNGKey(0), (6, 6, 2))
    grid = ops.identity_grid(6, 6) + 0.05

    g_values, g_grid = jax.grad(lambda v, g: jnp.sum(ops.warp(v, g) ** 2), argnums=(0, 1))(
        image, grid
    )
    for g in (g_values, g_grid):
        assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="padding"):
        ops.warp(jnp.zeros((4, 4, 1)), ops.identity_grid(4, 4), "wrap")
    with pytest.raises(ValueError, match="grid must have trailing dimension 2"):
        ops.warp(jnp.zeros((4, 4, 1)), jnp.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="values must have rank 3"):
        ops.warp(jnp.zeros((4, 4)), ops.identity_grid(4, 4))
    with pytest.raises(ValueError, match="displacement"):
        ops.tps_transform(jnp.zeros((4, 2)), jnp.zeros((3, 2)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="padded canvas"):
        ops.warp_padded(jnp.zeros((10, 10, 1)), ops.identity_grid(10, 10))
    with pytest.raises(ValueError, match="outside must be one of"):
        ops.warp_padded(jnp.zeros((10, 10, 1)), ops.identity_grid(14, 14), outside="reflect")
    with pytest.raises(ValueError, match="grid must be one of"):
        ops.tps_query_grid(4, 4, "centres")
    with pytest.raises(ValueError, match="outside must be one of"):
        ops.make_training_pair(
            jax.random.PRNGKey(0), jnp.zeros((10, 10, 3)), **MULTI_OBJECT_TPS, outside="wrap"
        )
