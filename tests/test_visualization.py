"""Tests of tusk_jax.visualization (marker positions, tiling, colours, files, t-SNE) and
tusk_jax.charts (the purity figure)."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from tusk_jax import charts
from tusk_jax import visualization as vis


def _color(pid, num):
    return vis.to_uint8(vis.prototype_palette(num)[pid])


def test_keypoint_colours_its_upscaled_pixel_block():
    image = np.zeros((10, 8, 3))
    scale = 4
    out = vis.draw_keypoints(image, [[3.0, 5.0]], [2], num_prototypes=5, scale=scale)
    assert out.shape == (40, 32, 3) and out.dtype == np.uint8
    block = out[5 * scale : 6 * scale, 3 * scale : 4 * scale]
    np.testing.assert_array_equal(block, np.broadcast_to(_color(2, 5), block.shape))
    # The marker is centred on the block centre ((x + 0.5) * s - 0.5, (y + 0.5) * s - 0.5).
    ys, xs = np.nonzero(np.all(out == _color(2, 5), axis=-1))
    assert xs.mean() == pytest.approx((3 + 0.5) * scale - 0.5)
    assert ys.mean() == pytest.approx((5 + 0.5) * scale - 0.5)
    # Far from the marker the (black) image is untouched.
    assert out[:12].max() == 0 and out[:, 24:].max() == 0


def test_draw_keypoints_upscales_nearest_and_colours_by_prototype():
    rng = np.random.default_rng(0)
    image = rng.random((6, 6, 3))
    out = vis.draw_keypoints(
        image, [[0.0, 0.0], [5.0, 5.0]], [0, 1], num_prototypes=2, scale=3, radius=1.0
    )
    np.testing.assert_array_equal(out[1, 1], _color(0, 2))
    np.testing.assert_array_equal(out[16, 16], _color(1, 2))
    assert not np.array_equal(_color(0, 2), _color(1, 2))
    # Pixel (x=3, y=2) is away from both markers: its 3x3 block repeats its value.
    np.testing.assert_array_equal(
        out[6:9, 9:12], np.broadcast_to(vis.to_uint8(image[2, 3]), (3, 3, 3))
    )


def test_low_confidence_marker_is_blended():
    image = np.zeros((4, 4, 3))
    full = vis.draw_keypoints(image, [[1.0, 1.0]], [0], 1, confidence=[1.0], scale=2)
    faint = vis.draw_keypoints(image, [[1.0, 1.0]], [0], 1, confidence=[0.0], scale=2)
    np.testing.assert_array_equal(full[2, 2], _color(0, 1))
    np.testing.assert_array_equal(faint[2, 2], vis.to_uint8(0.25 * vis.prototype_palette(1)[0]))


def test_palette_is_distinct_for_many_prototypes():
    for m in (3, 10, 16, 48, 114):
        colors = vis.to_uint8(vis.prototype_palette(m))
        assert colors.shape == (m, 3)
        assert len({tuple(c) for c in colors}) == m


def test_image_grid_tiling():
    images = np.stack([np.full((4, 6, 3), 40 * i, np.uint8) for i in range(5)])
    grid = vis.image_grid(images, ncols=3)
    assert grid.shape == (8, 18, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[4 * r : 4 * r + 4, 6 * c : 6 * c + 6], images[i])
    assert np.all(grid[4:, 12:] == 255)  # The unused sixth cell.
    padded = vis.image_grid(images, ncols=3, pad=2, pad_value=0.0)
    assert padded.shape == (2 * 4 + 3 * 2, 3 * 6 + 4 * 2, 3)
    # Image 4 sits in row 1, column 1.
    np.testing.assert_array_equal(padded[2 + 6 : 2 + 6 + 4, 2 + 8 : 2 + 8 + 6], images[4])
    assert padded[0].max() == 0 and padded[:, 9].max() == 0


def test_mask_to_rgb():
    mask = np.array([[0, 1], [2, 1]])
    rgb = vis.mask_to_rgb(mask, 3)
    np.testing.assert_array_equal(rgb[0, 1], _color(1, 3))
    np.testing.assert_array_equal(rgb[1, 0], _color(2, 3))
    np.testing.assert_array_equal(vis.mask_to_rgb(mask, 3, background=0)[0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="mask ids"):
        vis.mask_to_rgb(mask, 2)


def test_alpha_panel_layout():
    k, h, w = 3, 5, 4
    rng = np.random.default_rng(1)
    rgb = rng.random((k, h, w, 3))
    alpha = rng.random((k, h, w))
    alpha /= alpha.sum(0)
    panel = vis.alpha_panel(rgb, alpha, pad=1)
    assert panel.shape == (2 * h + 3, 4 * w + 5, 3)

    def tile(row, col):
        y0, x0 = 1 + row * (h + 1), 1 + col * (w + 1)
        return panel[y0 : y0 + h, x0 : x0 + w]

    np.testing.assert_array_equal(tile(0, 1), vis.to_uint8(rgb[1]))
    np.testing.assert_array_equal(tile(0, 3), vis.to_uint8((alpha[..., None] * rgb).sum(0)))
    np.testing.assert_array_equal(tile(1, 2)[..., 0], vis.to_uint8(alpha[2]))
    np.testing.assert_array_equal(tile(1, 3), vis.mask_to_rgb(np.argmax(alpha, 0), k))


def test_save_png_round_trip(tmp_path):
    image = np.random.default_rng(2).random((7, 5, 3))
    path = tmp_path / "sub" / "image.png"
    vis.save_png(str(path), image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), vis.to_uint8(image))


def test_tsne_figure_is_drawn_and_not_blank():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 8))
    labels = np.repeat(np.arange(3), 10)
    descriptors = centres[labels] + 0.05 * rng.normal(size=(30, 8))
    kwargs = dict(size_inches=2, dpi=100, max_iter=250)
    figure = vis.tsne_figure(descriptors, centres, labels=labels, **kwargs)
    assert figure.dtype == np.uint8 and figure.shape == (200, 200, 3)

    def pixels_near(image, color):
        return int(np.sum(np.abs(image.astype(int) - color.astype(int)).max(-1) <= 24))

    # Each label's colour and the black prototype crosses (the only black: frame and
    # title are grey) are drawn on the white page.
    for label in range(3):
        assert pixels_near(figure, _color(label, 3)) >= 10
    assert pixels_near(figure, np.zeros(3, np.uint8)) >= 30
    # Without labels the descriptors are grey.
    plain = vis.tsne_figure(descriptors, centres, **kwargs)
    assert pixels_near(plain, _color(0, 3)) == 0
    assert pixels_near(plain, vis.to_uint8(np.full(3, 0.6))) >= 30


def test_purity_figure_draws_each_used_prototype_in_its_colour():
    usage = [0, 30, 0, 10]
    rows = [{"prototype": 1, "matched": 5, "purity": {"shape": 0.6, "color": 1.0}}]
    figure = charts.purity_figure(usage, rows, size_inches=(5, 4), dpi=100)
    assert figure.dtype == np.uint8 and figure.shape == (400, 500, 3)

    def pixels_of(image, color):
        return int(np.sum(np.abs(image.astype(int) - color.astype(int)).max(-1) <= 8))

    # Bars in the prototypes' colours; prototype 1's (75 % of keypoints) is three
    # times as tall as prototype 3's (25 %) at the same width.
    tall, short = pixels_of(figure, _color(1, 4)), pixels_of(figure, _color(3, 4))
    assert short > 100 and 2.5 < tall / short < 3.5
    assert pixels_of(figure, _color(0, 4)) == 0 and pixels_of(figure, _color(2, 4)) == 0
    # The purity bars; without purity rows only the share panel is drawn.
    purity_color = vis.to_uint8(np.asarray(matplotlib.colormaps["Set2"](0))[:3])
    assert pixels_of(figure, purity_color) > 100
    plain = charts.purity_figure(usage, None)
    assert pixels_of(plain, purity_color) == 0 and pixels_of(plain, _color(1, 4)) > tall
    with pytest.raises(ValueError, match="usage must be"):
        charts.purity_figure([[1, 2]])
    with pytest.raises(ValueError, match=r"prototypes in \[0, 4\)"):
        charts.purity_figure(usage, [dict(rows[0], prototype=4)])
