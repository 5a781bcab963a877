"""Thin-plate-spline warps and the TPS training pair (SPEC section 4).

Coordinates here are *normalised*: [-1, 1]^2 with the align_corners=False
meaning, -1 and +1 being the outer edges of the border pixels, so the centre
of pixel i of a side of n pixels is (2 i + 1) / n - 1. A point is (x, y).

A sampling grid `[H, W, 2]` says where each output pixel reads the input:
output pixel (x, y) takes the input bilinearly sampled at `grid[y, x]`.

Two choices of the authors' release are options here (`TPS_GRIDS`,
`WARP_OUTSIDES`): where the spline of a random warp is evaluated, and what a
warp reads beyond the padded canvas.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tusk_jax.ops import _checks
from tusk_jax.ops.sampling import interpolate

# Control points of the random warps: (+-0.7, +-0.7) and (+-0.5, +-0.5).
# numpy, not jnp: importing the ops must not start JAX's backends (multi-process
# runs call jax.distributed.initialize first).
_CONTROL_POINTS = np.array(
    [[sx * r, sy * r] for r in (0.7, 0.5) for sx in (-1.0, 1.0) for sy in (-1.0, 1.0)],
    np.float32,
)
_CONTROL_JITTER = 0.1
# Fixed anchors on the border that keep their place (the reference's values,
# including its -0.95 for the last one).
_BORDER_ANCHORS = np.array(
    [
        [-0.99, -0.99],
        [-0.99, 0.99],
        [0.99, -0.99],
        [0.99, 0.99],
        [0.0, -0.99],
        [0.0, 0.99],
        [0.99, 0.0],
        [-0.95, 0.0],
    ],
    np.float32,
)
# The mild warp that turns an image into I1 (SPEC 4).
MILD_TPS = dict(scale=0.98, scale_var=0.02, tps=0.03, off=0.02, rot=0.05)
# Where a random warp's spline is evaluated (`tps.grid`):
# "release": at linspace(-1, 1, n) per axis, read as align_corners=False grids
#   (the release: utils/tps.py evaluates there, grid_sample reads with
#   align_corners=False), so even the identity spline zooms out by n / (n - 1)
#   about the centre: output pixel i reads input pixel i n / (n - 1) - 1/2;
# "pixel_centres": at the pixel centres, the identity spline is the identity.
TPS_GRIDS = ("release", "pixel_centres")
# What a warp of the training pair reads beyond its padded canvas (`tps.outside`):
# "zeros": 0 (the release: torch grid_sample's default zero padding, in both
#   pair-making warps and in the equivariance loss's warps of the maps);
# "padding": the canvas's own padding continued (reflection, or `cval`).
WARP_OUTSIDES = ("zeros", "padding")


def pixel_to_normalised(xy: jax.Array, height: int, width: int) -> jax.Array:
    """(x, y) pixel coordinates -> normalised coordinates (align_corners=False)."""
    size = jnp.array([width, height], dtype=jnp.result_type(xy, jnp.float32))
    return (2.0 * xy + 1.0) / size - 1.0


def normalised_to_pixel(xy: jax.Array, height: int, width: int) -> jax.Array:
    """Normalised coordinates -> (x, y) pixel coordinates (align_corners=False)."""
    size = jnp.array([width, height], dtype=jnp.result_type(xy, jnp.float32))
    return ((xy + 1.0) * size - 1.0) / 2.0


def identity_grid(height: int, width: int) -> jax.Array:
    """`[H, W, 2]` sampling grid of the identity warp (normalised pixel centres)."""
    ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    return pixel_to_normalised(jnp.stack([xs, ys], axis=-1).astype(jnp.float32), height, width)


def tps_query_grid(height: int, width: int, grid: str = "pixel_centres") -> jax.Array:
    """`[H, W, 2]` normalised points at which a warp's spline is evaluated (`TPS_GRIDS`).

    "pixel_centres": `identity_grid`; "release": x = linspace(-1, 1, W) along
    a row, y = linspace(-1, 1, H) down a column (the border pixels' outer edges).
    """
    if grid not in TPS_GRIDS:
        raise ValueError(f"grid must be one of {TPS_GRIDS}, got {grid!r}.")
    if grid == "pixel_centres":
        return identity_grid(height, width)
    ys, xs = jnp.meshgrid(
        jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width), indexing="ij"
    )
    return jnp.stack([xs, ys], axis=-1).astype(jnp.float32)


def random_tps(
    key: jax.Array, scale: float, scale_var: float, tps: float, off: float, rot: float
) -> tuple[jax.Array, jax.Array]:
    """Draws a random thin-plate-spline warp with the reference's recipe.

    8 control points at (+-0.7, +-0.7), (+-0.5, +-0.5), each jittered by
    U(-0.1, 0.1) and displaced by U(-tps, tps); the displaced points then go
    through a per-axis scaling U(scale - scale_var, scale + scale_var) about
    a centre U(-off, off)^2 and a rotation U(-rot, rot) (radians) about a
    second centre U(-off, off)^2. 8 anchors on the border keep their place.

    Args:
      key: a `jax.random` key.
      scale, scale_var, tps, off, rot: the warp's strength (see above), all in
        normalised units except `rot` (radians) and the unitless scale.

    Returns:
      `(points, displacement)`, both `[16, 2]` normalised (x, y): the spline
      moves `points[i]` to `points[i] + displacement[i]`.
    """
    k_jitter, k_tps, k_scale, k_centre1, k_angle, k_centre2 = jax.random.split(key, 6)
    uniform = lambda k, shape, half: jax.random.uniform(k, shape, minval=-half, maxval=half)
    points = _CONTROL_POINTS + uniform(k_jitter, (8, 2), _CONTROL_JITTER)
    moved = points + uniform(k_tps, (8, 2), tps)
    axis_scale = scale + uniform(k_scale, (2,), scale_var)
    centre1 = uniform(k_centre1, (2,), off)
    moved = (moved - centre1) * axis_scale + centre1
    angle = uniform(k_angle, (), rot)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotation = jnp.array([[cos, -sin], [sin, cos]])
    centre2 = uniform(k_centre2, (2,), off)
    moved = (moved - centre2) @ rotation.T + centre2
    all_points = jnp.concatenate([points, _BORDER_ANCHORS], axis=0)
    displacement = jnp.concatenate([moved - points, jnp.zeros_like(_BORDER_ANCHORS)], axis=0)
    return all_points, displacement


def _tps_kernel(squared_distance: jax.Array) -> jax.Array:
    """U(r) = r^2 log(r^2 + 1e-6), written on the squared distance r^2."""
    return squared_distance * jnp.log(squared_distance + 1e-6)


def _pairwise_squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)


def tps_transform(points: jax.Array, displacement: jax.Array, query: jax.Array) -> jax.Array:
    """Evaluates the thin-plate spline that moves `points` by `displacement`.

    Solves the (N + 3) x (N + 3) interpolation system for the spline
    f(q) = q + sum_i w_i U(|q - p_i|) + a_0 + a_1 x + a_2 y with
    f(p_i) = p_i + displacement_i and evaluates it at `query`.

    Args:
      points: `[N, 2]` normalised (x, y) control points (N >= 3, not collinear).
      displacement: `[N, 2]` normalised displacement of each control point.
      query: `[..., 2]` normalised (x, y) points.

    Returns:
      `[..., 2]` the transformed query points.
    """
    _checks.check_rank("points", points, 2, last_dim=2)
    _checks.check_rank("displacement", displacement, 2, last_dim=2)
    if displacement.shape != points.shape:
        raise ValueError(
            f"displacement must have the shape of points {points.shape}, got {displacement.shape}."
        )
    if query.ndim < 1 or query.shape[-1] != 2:
        raise ValueError(f"query must have trailing dimension 2, got shape {query.shape}.")
    n = points.shape[0]
    affine = jnp.concatenate([jnp.ones((n, 1), points.dtype), points], axis=1)  # [N, 3]
    system = jnp.block(
        [
            [_tps_kernel(_pairwise_squared_distance(points, points)), affine],
            [affine.T, jnp.zeros((3, 3), points.dtype)],
        ]
    )
    rhs = jnp.concatenate([displacement, jnp.zeros((3, 2), displacement.dtype)], axis=0)
    coefficients = jnp.linalg.solve(system, rhs)  # [N + 3, 2]
    flat_query = query.reshape(-1, 2)
    basis = jnp.concatenate(
        [
            _tps_kernel(_pairwise_squared_distance(flat_query, points)),
            jnp.ones((flat_query.shape[0], 1), query.dtype),
            flat_query,
        ],
        axis=1,
    )
    return (flat_query + basis @ coefficients).reshape(query.shape)


def tps_sampling_grid(
    points: jax.Array,
    displacement: jax.Array,
    height: int,
    width: int,
    grid: str = "pixel_centres",
) -> jax.Array:
    """The spline of `tps_transform` evaluated at the pixel centres (or `tps_query_grid`).

    Args:
      grid: one of `TPS_GRIDS`: where the spline is evaluated; "release"
        zooms out by n / (n - 1) on top of the spline (see `TPS_GRIDS`).

    Returns:
      `[H, W, 2]` normalised sampling grid for `warp`.
    """
    return tps_transform(points, displacement, tps_query_grid(height, width, grid))


def warp(
    values: jax.Array, grid: jax.Array, padding: str = "reflect", cval: float = 0.0
) -> jax.Array:
    """Resamples a map through a sampling grid (bilinear).

    Output pixel (x, y) is `values` bilinearly sampled at the normalised point
    `grid[y, x]`. Beyond the border the map is mirrored about its outer pixel
    edges ('reflect', as torch's grid_sample reflection padding with
    align_corners=False) or filled with `cval` ('constant'). The output may
    have another size than the input.

    Args:
      values: `[H, W, C]` float map.
      grid: `[H', W', 2]` normalised (x, y) sampling points.
      padding: 'reflect' or 'constant'.
      cval: fill value for 'constant'.

    Returns:
      `[H', W', C]`.
    """
    _checks.check_rank("values", values, 3)
    _checks.check_float("values", values)
    _checks.check_rank("grid", grid, 3, last_dim=2)
    _checks.check_padding(padding)
    height, width = values.shape[:2]
    pixel = normalised_to_pixel(grid, height, width)
    return interpolate(values, pixel[..., 0], pixel[..., 1], mode=padding, cval=cval)


def pad_width(height: int) -> int:
    """Pad (pixels) added around an image or map before a TPS warp: H / 5."""
    return height // 5


def pad(values: jax.Array, width: int, padding: str, cval: float = 0.0) -> jax.Array:
    """Pads the two spatial axes of `[H, W, C]` by `width` pixels.

    'reflect' mirrors about the border pixel (numpy's 'reflect', as torch's
    F.pad reflect); 'constant' fills with `cval`.
    """
    _checks.check_padding(padding)
    spec = ((width, width), (width, width), (0, 0))
    if padding == "reflect":
        return jnp.pad(values, spec, mode="reflect")
    return jnp.pad(values, spec, mode="constant", constant_values=cval)


def _check_outside(outside: str) -> None:
    if outside not in WARP_OUTSIDES:
        raise ValueError(f"outside must be one of {WARP_OUTSIDES}, got {outside!r}.")


def _warp_canvas(
    canvas: jax.Array, grid: jax.Array, padding: str, cval: float, outside: str
) -> jax.Array:
    """`warp` of an already padded canvas; beyond it, zeros or the padding (`WARP_OUTSIDES`)."""
    _check_outside(outside)
    if outside == "zeros":
        return warp(canvas, grid, "constant", 0.0)
    return warp(canvas, grid, padding, cval)


def warp_padded(
    values: jax.Array,
    grid: jax.Array,
    padding: str = "reflect",
    cval: float = 0.0,
    outside: str = "zeros",
) -> jax.Array:
    """Warps a map on its padded canvas and crops the pad, as pairs are made.

    `grid` covers the padded canvas, `[H + 2p, W + 2p, 2]` with p = H / 5
    (as returned by `make_training_pair`); `values` is `[H, W, C]` and is
    padded by p first. This is how the warp T of a pair is applied to score
    and feature maps in the equivariance loss.

    Args:
      padding, cval: how the canvas is padded ('reflect' or 'constant').
      outside: one of `WARP_OUTSIDES`: what is read beyond the padded canvas,
        0 ("zeros", the release) or the padding continued ("padding").

    Returns:
      `[H, W, C]`.
    """
    _checks.check_rank("values", values, 3)
    _checks.check_rank("grid", grid, 3, last_dim=2)
    height, width = values.shape[:2]
    p = pad_width(height)
    if grid.shape[:2] != (height + 2 * p, width + 2 * p):
        raise ValueError(
            f"grid must cover the padded canvas {(height + 2 * p, width + 2 * p)} of a "
            f"{(height, width)} map, got {grid.shape[:2]}."
        )
    warped = _warp_canvas(pad(values, p, padding, cval), grid, padding, cval, outside)
    return warped[p : p + height, p : p + width]


def make_training_pair(
    key: jax.Array,
    image: jax.Array,
    scale: float,
    scale_var: float,
    tps: float,
    off: float,
    rot: float,
    padding: str = "reflect",
    cval: float = 0.0,
    grid: str = "release",
    outside: str = "zeros",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Makes the training pair (I1, I2 = T(I1)) of SPEC section 4 from one image.

    The image is padded by H / 5 pixels (`padding`, `cval`), warped once with
    the mild TPS `MILD_TPS` into I1, and I1 is warped with a TPS T of the
    given strength into I2; both are cropped back to `[H, W, 3]`. The
    defaults of `grid` and `outside` are the release's.

    Args:
      key: a `jax.random` key.
      image: `[H, W, 3]` float in [0, 1].
      scale, scale_var, tps, off, rot: the dataset's TPS strength (`random_tps`).
      padding: 'reflect' or 'constant' fill of the pad.
      cval: fill value for 'constant' (0 for MNIST, 1 for H36M).
      grid: one of `TPS_GRIDS`, where both warps' splines are evaluated (the
        returned grid of T, which the equivariance loss reuses, too).
      outside: one of `WARP_OUTSIDES`, what both warps read beyond the canvas.

    Returns:
      `(i1, i2, grid)`: the two `[H, W, 3]` images and T's sampling grid
      `[H + 2p, W + 2p, 2]` on the padded canvas, for `warp_padded`.
    """
    _checks.check_rank("image", image, 3)
    _checks.check_float("image", image)
    _check_outside(outside)
    height, width = image.shape[:2]
    p = pad_width(height)
    canvas = (height + 2 * p, width + 2 * p)
    key_mild, key_t = jax.random.split(key)
    padded = pad(image, p, padding, cval)
    mild_grid = tps_sampling_grid(*random_tps(key_mild, **MILD_TPS), *canvas, grid=grid)
    i1_padded = _warp_canvas(padded, mild_grid, padding, cval, outside)
    t_grid = tps_sampling_grid(
        *random_tps(key_t, scale, scale_var, tps, off, rot), *canvas, grid=grid
    )
    i2_padded = _warp_canvas(i1_padded, t_grid, padding, cval, outside)
    crop = lambda x: x[p : p + height, p : p + width]
    return crop(i1_padded), crop(i2_padded), t_grid
