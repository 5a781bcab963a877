"""Reading values at sub-pixel locations and splatting keypoints into maps.

Conventions (SPEC section 1): values are `[H, W, C]`; a location is (x, y) in
pixel units with pixel centres at integers.
"""

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from tusk_jax.ops import _checks


def interpolate(values: jax.Array, x: jax.Array, y: jax.Array, mode: str, cval: float = 0.0):
    """Bilinear interpolation of every channel of `values` at pixel coordinates.

    Args:
      values: `[H, W, C]` float.
      x, y: float arrays of one shape `S`, pixel coordinates (x column, y row).
      mode: what lies beyond the border, as in `jax.scipy.ndimage.map_coordinates`:
        'nearest' (border values repeat), 'reflect' (mirror about the outer
        pixel edges) or 'constant' (`cval`).
      cval: fill value for 'constant'.

    Returns:
      `[*S, C]`.
    """
    # One map_coordinates call per channel: the coordinate arithmetic is
    # shared across channels by vmap, only the gather is batched.
    per_channel = jax.vmap(
        lambda channel: ndimage.map_coordinates(channel, [y, x], order=1, mode=mode, cval=cval),
        in_axes=2,
        out_axes=-1,
    )
    return per_channel(values)


def bilinear_sample(values: jax.Array, xy: jax.Array) -> jax.Array:
    """Bilinearly interpolates a feature map at K sub-pixel locations.

    Integer locations return the pixel values exactly; beyond the image the
    border values repeat. Differentiable w.r.t. `values` and `xy`.

    Args:
      values: `[H, W, C]` float map.
      xy: `[K, 2]` (x, y) pixel coordinates.

    Returns:
      `[K, C]`.
    """
    _checks.check_rank("values", values, 3)
    _checks.check_float("values", values)
    _checks.check_rank("xy", xy, 2, last_dim=2)
    return interpolate(values, xy[:, 0], xy[:, 1], mode="nearest")


def gaussian_splat(xy: jax.Array, height: int, width: int, variance: float = 0.05) -> jax.Array:
    """One isotropic Gaussian map per keypoint, each normalised to sum 1.

    G_k(p) = exp(-|p - xy_k|^2 / (2 variance)) over the pixel centres p of an
    `height` x `width` grid, divided by its sum. With the default variance
    (0.05 pixels^2) a map is nearly a delta at the nearest pixel, yet stays
    differentiable w.r.t. the location.

    Args:
      xy: `[K, 2]` (x, y) pixel coordinates.
      height, width: map size in pixels (Python ints).
      variance: Gaussian variance in pixels^2, > 0.

    Returns:
      `[K, H, W]` float, each map summing to 1.
    """
    _checks.check_rank("xy", xy, 2, last_dim=2)
    _checks.check_positive("variance", variance)
    _checks.check_positive("height", height)
    _checks.check_positive("width", width)
    xs = jnp.arange(width, dtype=xy.dtype)
    ys = jnp.arange(height, dtype=xy.dtype)
    # The 2-D Gaussian is separable: normalising each axis normalises the map.
    # Log-space softmax keeps far-away keypoints (all weights underflowing) finite.
    gx = jax.nn.softmax(-((xs[None, :] - xy[:, 0:1]) ** 2) / (2 * variance), axis=-1)
    gy = jax.nn.softmax(-((ys[None, :] - xy[:, 1:2]) ** 2) / (2 * variance), axis=-1)
    return gy[:, :, None] * gx[:, None, :]
