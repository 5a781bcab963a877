"""Pure single-example keypoint ops (SPEC section 7), batched by callers with `jax.vmap`.

- `keypoints`: NMS, top-K peaks, patch soft-argmax, `detect_keypoints`.
- `sampling`: bilinear interpolation and Gaussian splatting.
- `warps`: thin-plate-spline warps, `warp` and the TPS training pair.
- `prototypes`: k-means cluster loss, prototype mixture, sliced Wasserstein.
"""

from tusk_jax.ops.keypoints import (
    SOFT_ARGMAX_BORDERS,
    detect_keypoints,
    max_peaks,
    non_max_suppression,
    soft_argmax_refine,
    top_k_peaks,
)
from tusk_jax.ops.prototypes import (
    COUNT_ROUNDINGS,
    SPREADS,
    kmeans_loss,
    l2_normalize,
    nearest_prototype,
    prototype_counts,
    random_directions,
    sample_prototype_mixture,
    sliced_wasserstein,
    sliced_wasserstein_loss,
)
from tusk_jax.ops.sampling import bilinear_sample, gaussian_splat
from tusk_jax.ops.warps import (
    MILD_TPS,
    TPS_GRIDS,
    WARP_OUTSIDES,
    identity_grid,
    make_training_pair,
    normalised_to_pixel,
    pixel_to_normalised,
    random_tps,
    tps_query_grid,
    tps_sampling_grid,
    tps_transform,
    warp,
    warp_padded,
)

__all__ = [
    "COUNT_ROUNDINGS",
    "SOFT_ARGMAX_BORDERS",
    "SPREADS",
    "MILD_TPS",
    "TPS_GRIDS",
    "WARP_OUTSIDES",
    "bilinear_sample",
    "detect_keypoints",
    "gaussian_splat",
    "identity_grid",
    "kmeans_loss",
    "l2_normalize",
    "make_training_pair",
    "max_peaks",
    "nearest_prototype",
    "non_max_suppression",
    "normalised_to_pixel",
    "pixel_to_normalised",
    "prototype_counts",
    "random_directions",
    "random_tps",
    "sample_prototype_mixture",
    "sliced_wasserstein",
    "sliced_wasserstein_loss",
    "soft_argmax_refine",
    "tps_query_grid",
    "tps_sampling_grid",
    "tps_transform",
    "top_k_peaks",
    "warp",
    "warp_padded",
]
