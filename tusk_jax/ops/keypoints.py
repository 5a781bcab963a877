"""Keypoint detection on a single score map: NMS, top-K, patch soft-argmax.

Conventions (SPEC section 1): a score map is `[H, W]` float; a keypoint is
(x, y) in pixel units, x the column and y the row, with pixel centres at
integers ((0, 0) is the centre of the top-left pixel).
"""

import jax
import jax.numpy as jnp
from jax import lax

from tusk_jax.ops import _checks
from tusk_jax.ops.sampling import bilinear_sample

# What the soft-argmax window sees beyond the image border: "zeros" (the
# reference zero-pads the score map, so outside pixels weigh exp(0) = 1 and
# pull border keypoints inwards) | "inside" (outside pixels are left out).
SOFT_ARGMAX_BORDERS = ("zeros", "inside")


def _check_score_map(score_map: jax.Array) -> None:
    _checks.check_rank("score_map", score_map, 2)
    _checks.check_float("score_map", score_map)


def non_max_suppression(score_map: jax.Array, window: int) -> jax.Array:
    """Keeps the local maxima of a score map and zeroes everything else.

    A pixel survives when it equals the maximum of the `window` x `window`
    neighbourhood centred on it (pixels beyond the border are ignored). Every
    pixel of a flat plateau survives.

    Args:
      score_map: `[H, W]` float scores.
      window: odd, positive side of the square neighbourhood, in pixels.

    Returns:
      `[H, W]`, the input at local maxima and 0 elsewhere.
    """
    _check_score_map(score_map)
    _checks.check_window(window)
    local_max = lax.reduce_window(
        score_map,
        -jnp.inf,
        lax.max,
        window_dimensions=(window, window),
        window_strides=(1, 1),
        padding="SAME",
    )
    return jnp.where(score_map == local_max, score_map, jnp.zeros_like(score_map))


def max_peaks(height: int, width: int, window: int) -> int:
    """The most distinct-valued NMS peaks a `height` x `width` score map can hold.

    Two such peaks are never inside each other's window (each would be the
    other's maximum), so they lie at least `window // 2 + 1` pixels apart
    along x or y: one per cell of that side, a bound a lattice reaches. Only
    a flat plateau (ties) gives more. `top_k_peaks` fills the slots of K
    beyond the peaks found with suppressed pixels (score 0), not peaks.
    """
    step = window // 2 + 1
    return -(-height // step) * -(-width // step)


def top_k_peaks(score_map: jax.Array, k: int, window: int) -> tuple[jax.Array, jax.Array]:
    """The `k` highest local maxima of a score map, best first.

    Args:
      score_map: `[H, W]` float scores.
      k: number of peaks, a Python int in [1, H * W] (with symbolic H, W the
        caller ensures H * W >= k).
      window: odd NMS window side, in pixels.

    Returns:
      `(xy, score)`: `xy` int32 `[K, 2]` integer pixel (x, y) of each peak,
      `score` `[K]` its score, sorted in decreasing score (ties: row-major
      order). When fewer than `k` pixels survive NMS the remaining slots hold
      suppressed pixels with score 0.
    """
    _check_score_map(score_map)
    height, width = score_map.shape
    pixels = height * width  # Symbolic under jax.export shape polymorphism: not checked here.
    if not isinstance(k, int) or k < 1 or (isinstance(pixels, int) and k > pixels):
        raise ValueError(f"k must be an int in [1, {pixels}] (H * W), got {k!r}.")
    suppressed = non_max_suppression(score_map, window)
    score, flat_index = lax.top_k(suppressed.reshape(-1), k)
    xy = jnp.stack([flat_index % width, flat_index // width], axis=-1).astype(jnp.int32)
    return xy, score


def soft_argmax_refine(
    score_map: jax.Array,
    peaks_xy: jax.Array,
    window: int,
    temperature: float,
    border: str = "zeros",
) -> jax.Array:
    """Refines integer peaks to sub-pixel locations by a patch soft-argmax.

    Each location is the mean of the pixel coordinates of the `window` x
    `window` patch centred on the peak, weighted by exp(score / temperature).
    Pixels outside the image count as score 0 (`border="zeros"`, the
    reference's zero padding) or do not contribute (`"inside"`).
    Differentiable w.r.t. `score_map`.

    Args:
      score_map: `[H, W]` float scores.
      peaks_xy: int `[K, 2]` (x, y) pixel coordinates of the peaks.
      window: odd patch side, in pixels.
      temperature: softness (> 0); small values approach the patch argmax.
      border: one of `SOFT_ARGMAX_BORDERS` (static).

    Returns:
      `[K, 2]` float (x, y) pixel coordinates.
    """
    _check_score_map(score_map)
    _checks.check_window(window)
    _checks.check_rank("peaks_xy", peaks_xy, 2, last_dim=2)
    _checks.check_positive("temperature", temperature)
    if border not in SOFT_ARGMAX_BORDERS:
        raise ValueError(f"border must be one of {SOFT_ARGMAX_BORDERS}, got {border!r}.")
    height, width = score_map.shape
    radius = window // 2
    offsets = jnp.arange(-radius, radius + 1)
    # [K, B, B] absolute coordinates of each patch pixel.
    xs = peaks_xy[:, 0, None, None] + offsets[None, None, :]
    ys = peaks_xy[:, 1, None, None] + offsets[None, :, None]
    xs, ys = jnp.broadcast_arrays(xs, ys)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    values = score_map[jnp.clip(ys, 0, height - 1), jnp.clip(xs, 0, width - 1)]
    outside_logit = 0.0 if border == "zeros" else -jnp.inf
    logits = jnp.where(inside, values / temperature, outside_logit)
    weights = jax.nn.softmax(logits.reshape(logits.shape[0], -1), axis=-1).reshape(logits.shape)
    # Offsets from the peak rather than absolute coordinates: the sum is then
    # small and exact for symmetric patches (a lone peak stays on its pixel).
    dx = jnp.sum(weights * offsets[None, None, :], axis=(1, 2))
    dy = jnp.sum(weights * offsets[None, :, None], axis=(1, 2))
    return peaks_xy.astype(weights.dtype) + jnp.stack([dx, dy], axis=-1)


def detect_keypoints(
    score_map: jax.Array, k: int, window: int, temperature: float = 0.2, border: str = "zeros"
) -> tuple[jax.Array, jax.Array]:
    """Top-`k` NMS peaks refined by patch soft-argmax, with their confidence.

    The peak choice is not differentiable; the refined locations and the
    confidences are differentiable w.r.t. `score_map`.

    Args:
      score_map: `[H, W]` float scores in [0, 1].
      k: number of keypoints (Python int).
      window: odd NMS / soft-argmax window side, in pixels.
      temperature: soft-argmax temperature tau (0.2 in the reference).
      border: `soft_argmax_refine`'s border rule (`SOFT_ARGMAX_BORDERS`).

    Returns:
      `(xy, confidence)`: `xy` `[K, 2]` float (x, y) pixels, `confidence`
      `[K]` the score map bilinearly interpolated at `xy`.
    """
    peaks_xy, _ = top_k_peaks(lax.stop_gradient(score_map), k, window)
    xy = soft_argmax_refine(score_map, peaks_xy, window, temperature, border)
    confidence = bilinear_sample(score_map[:, :, None], xy)[:, 0]
    return xy, confidence
