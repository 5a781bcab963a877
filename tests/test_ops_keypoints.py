"""Meaning of the keypoint ops: NMS, top-K, soft-argmax, detect_keypoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tusk_jax import ops


def lit(height, width, points, values=None):
    """A float32 [H, W] map with the given (x, y) pixels set (to 1 by default)."""
    score = np.zeros((height, width), np.float32)
    for i, (x, y) in enumerate(points):
        score[y, x] = 1.0 if values is None else values[i]
    return jnp.asarray(score)


def test_nms_keeps_only_local_maxima():
    score = lit(7, 7, [(1, 1), (2, 1), (5, 5)], values=[0.5, 0.9, 0.3])
    out = np.asarray(ops.non_max_suppression(score, 3))
    expected = np.zeros((7, 7), np.float32)
    expected[1, 2] = 0.9  # (1, 1) is next to the stronger (2, 1).
    expected[5, 5] = 0.3
    np.testing.assert_array_equal(out, expected)


def test_nms_window_reaches_exactly_its_radius():
    score = lit(1, 9, [(2, 0), (5, 0)], values=[1.0, 0.5])
    # Distance 3: a window of 5 (radius 2) keeps both, of 7 (radius 3) one.
    assert np.count_nonzero(ops.non_max_suppression(score, 5)) == 2
    assert np.count_nonzero(ops.non_max_suppression(score, 7)) == 1


@pytest.mark.parametrize("x, y", [(0, 0), (8, 0), (0, 5), (8, 5), (4, 3)])
def test_lit_pixel_gives_its_coordinate(x, y):
    score = lit(6, 9, [(x, y)])
    peaks, peak_score = ops.top_k_peaks(score, 1, 3)
    np.testing.assert_array_equal(peaks, [[x, y]])
    assert peaks.dtype == jnp.int32 and float(peak_score[0]) == 1.0
    # At a low temperature the background of the patch does not pull: exact,
    # even in a corner where the patch is cut by the border.
    xy, confidence = ops.detect_keypoints(score, 1, 5, temperature=0.01)
    np.testing.assert_array_equal(xy, [[x, y]])
    np.testing.assert_array_equal(confidence, [1.0])


def test_interior_lit_pixel_exact_at_default_temperature():
    xy, confidence = ops.detect_keypoints(lit(9, 9, [(5, 3)]), 1, 5)
    np.testing.assert_array_equal(xy, [[5.0, 3.0]])
    np.testing.assert_array_equal(confidence, [1.0])


def test_zero_padded_border_counts_outside_pixels_as_score_zero():
    # The reference zero-pads: a lit corner pixel on a zero map stays exactly
    # in place (the outside pixels weigh exp(0) = 1 like the inside zeros)...
    xy, _ = ops.detect_keypoints(lit(9, 9, [(8, 0)]), 1, 5, border="zeros")
    np.testing.assert_allclose(xy, [[8.0, 0.0]], atol=1e-6)
    # ... and a uniform map v pulls a corner peak inwards. Window 3 at (0, 0):
    # 4 inside pixels of weight w = e^(v / 0.2) with x offsets 0, 1, 0, 1 and
    # 5 outside pixels of weight 1 with x offsets -1, -1, -1, 0, 1:
    # dx = (2 w - 2) / (4 w + 5), and dy the same by symmetry.
    v = 0.5
    w = np.exp(v / 0.2)
    xy = ops.soft_argmax_refine(jnp.full((6, 6), v), jnp.array([[0, 0]]), 3, 0.2, border="zeros")
    expected = (2 * w - 2) / (4 * w + 5)
    np.testing.assert_allclose(np.asarray(xy), [[expected, expected]], rtol=1e-6)
    # Left out ("inside"), the uniform map leaves the 4 inside pixels: dx = 1/2.
    xy = ops.soft_argmax_refine(jnp.full((6, 6), v), jnp.array([[0, 0]]), 3, 0.2, border="inside")
    np.testing.assert_allclose(np.asarray(xy), [[0.5, 0.5]], rtol=1e-6)


def test_inside_border_leaves_outside_pixels_out():
    # In a corner the patch is cut; the in-image background pulls the estimate
    # inward, but nothing outside the image pulls it outward.
    xy, _ = ops.detect_keypoints(lit(9, 9, [(8, 0)]), 1, 5, border="inside")
    x, y = np.asarray(xy[0])
    assert x < 8.0 and y > 0.0
    # Hand value: weights e^(1/0.2) at the peak, 1 at the 8 other in-image pixels.
    # The 3 x 3 in-image patch has column offsets -2, -1, 0 in each of 3 rows;
    # the peak (offset 0) adds nothing to the weighted sum.
    w = np.exp(5.0)
    expected_dx = 3 * (-2 - 1 + 0) / (w + 8)
    np.testing.assert_allclose(x, 8 + expected_dx, rtol=1e-5)


def test_symmetric_bump_and_plateau_give_their_centre():
    yy, xx = np.mgrid[0:15, 0:15]
    bump = jnp.asarray(np.exp(-((xx - 6) ** 2 + (yy - 9) ** 2) / 4.0), jnp.float32)
    xy, _ = ops.detect_keypoints(bump, 1, 7)
    np.testing.assert_allclose(xy, [[6.0, 9.0]], atol=1e-5)
    # A 2 x 2 plateau: its centre lies between pixels.
    plateau = lit(10, 10, [(4, 6), (5, 6), (4, 7), (5, 7)])
    xy, confidence = ops.detect_keypoints(plateau, 1, 5, temperature=0.01)
    np.testing.assert_allclose(xy, [[4.5, 6.5]], atol=1e-5)
    np.testing.assert_allclose(confidence, [1.0], atol=1e-5)


def test_far_apart_peaks_found_and_sorted_by_score():
    points = [(2, 2), (17, 3), (9, 15), (3, 18)]
    values = [0.4, 0.9, 0.6, 0.8]
    peaks, score = ops.top_k_peaks(lit(20, 20, points, values), 4, 5)
    order = np.argsort(values)[::-1]
    np.testing.assert_array_equal(peaks, np.array(points)[order])
    np.testing.assert_allclose(score, np.array(values)[order])


def test_soft_argmax_moves_toward_heavier_neighbour():
    score = lit(9, 9, [(4, 4), (5, 4), (4, 3)], values=[1.0, 0.8, 0.3])
    xy = ops.soft_argmax_refine(score, jnp.array([[4, 4]]), 3, 0.2)
    x, y = np.asarray(xy[0])
    assert 4.0 < x < 4.5  # pulled right toward 0.8
    assert 3.5 < y < 4.0  # pulled up toward 0.3, less
    assert (x - 4.0) > (4.0 - y)


def test_soft_argmax_gradient_finite_and_nonzero():
    score = lit(9, 9, [(4, 4), (5, 4)], values=[1.0, 0.5])

    def loss(s):
        xy, confidence = ops.detect_keypoints(s, 1, 3)
        return xy[0, 0] + confidence[0]

    grad = jax.grad(loss)(score)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("window", [0, -3, 4, 2.0])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        ops.non_max_suppression(jnp.zeros((5, 5)), window)


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="k must"):
        ops.top_k_peaks(jnp.zeros((3, 3)), 10, 3)
    with pytest.raises(ValueError, match="score_map must have rank 2"):
        ops.detect_keypoints(jnp.zeros((3, 3, 1)), 1, 3)
    with pytest.raises(ValueError, match="score_map must be a float"):
        ops.detect_keypoints(jnp.zeros((3, 3), jnp.int32), 1, 3)
    with pytest.raises(ValueError, match="peaks_xy"):
        ops.soft_argmax_refine(jnp.zeros((3, 3)), jnp.zeros((2, 3), jnp.int32), 3, 0.2)
    with pytest.raises(ValueError, match="temperature"):
        ops.soft_argmax_refine(jnp.zeros((3, 3)), jnp.zeros((2, 2), jnp.int32), 3, 0.0)
