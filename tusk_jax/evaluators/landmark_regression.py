"""The array functions of the landmark protocol: regressor features, least squares, errors, NMI.

Keypoints and landmarks are (x, y) pixels; `N` indexes images, `K`
keypoints, `T` landmarks, `M` prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn.metrics
from numpy.typing import ArrayLike

from tusk_jax.evaluators import base

# Left/right joint pairs (left index, right index) of the 32-joint Human3.6M
# skeleton in its original order (0 hip, 1-5 right leg: hip, knee, ankle, ball,
# toes; 6-10 left leg likewise; 11 pelvis, 12 thorax, 13 neck, 14 head centre,
# 15 head back; 16-23 left arm: clavicle, shoulder, elbow, wrist, wrist 2,
# thumb, little finger, little finger 2; 24-31 right arm likewise), as used by
# the H36M protocol of Zhang et al. 2018 / Jakab et al. that TUSK follows.
H36M_32_LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = (
    (6, 1),
    (7, 2),
    (8, 3),
    (9, 4),
    (10, 5),
    (16, 24),
    (17, 25),
    (18, 26),
    (19, 27),
    (20, 28),
    (21, 29),
    (22, 30),
    (23, 31),
)

# Threshold grid of the CED curves: normalised error 0, 0.005, ..., 0.5.
DEFAULT_CED_THRESHOLDS = np.linspace(0.0, 0.5, 101)


def _checked_slots_input(keypoints, prototype_ids, num_prototypes: int):
    """`(keypoints [B, K, 2] float64, prototype_ids [B, K] int)`, checked for the slot layout."""
    keypoints = base.as_float_array("keypoints", keypoints, 3, 2)
    prototype_ids = base.as_int_array("prototype_ids", prototype_ids, 2)
    b, k, _ = keypoints.shape
    if prototype_ids.shape != (b, k):
        raise ValueError(f"prototype_ids must have shape {(b, k)}, got {prototype_ids.shape}.")
    if prototype_ids.size and (prototype_ids.min() < 0 or prototype_ids.max() >= num_prototypes):
        raise ValueError(f"prototype_ids must be in [0, {num_prototypes}).")
    return keypoints, prototype_ids


def landmark_features(
    keypoints: ArrayLike, prototype_ids: ArrayLike, num_prototypes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The M x K x 2 regressor input of SPEC section 6, for a batch of images.

    Keypoints are grouped by prototype; within a prototype they are sorted left
    to right (by x; equal x by y, then by keypoint index) and fill slots
    `[m, 0..n-1]`; every other slot is zero. Coordinates stay in pixels with the
    origin at the top-left pixel centre (SPEC section 1; the paper places the
    frame of reference at the top-left corner).

    Args:
      keypoints: `[B, K, 2]` (x, y) pixels.
      prototype_ids: `[B, K]` int in [0, M).
      num_prototypes: M.

    Returns:
      `(features, filled)`: `[B, M, K, 2]` float64 and `[B, M, K]` bool (True in
      the slots that hold a keypoint; exactly K per image).
    """
    keypoints, prototype_ids = _checked_slots_input(keypoints, prototype_ids, num_prototypes)
    b, k, _ = keypoints.shape
    index = np.broadcast_to(np.arange(k), (b, k))
    # Last key is primary: prototype, then x, then y, then keypoint index.
    order = np.lexsort((index, keypoints[..., 1], keypoints[..., 0], prototype_ids), axis=-1)
    sorted_protos = np.take_along_axis(prototype_ids, order, axis=1)
    position = np.arange(k)[None, :]
    is_first = np.ones((b, k), dtype=bool)
    is_first[:, 1:] = sorted_protos[:, 1:] != sorted_protos[:, :-1]
    group_start = np.maximum.accumulate(np.where(is_first, position, 0), axis=1)
    slot = position - group_start
    features = np.zeros((b, num_prototypes, k, 2), dtype=np.float64)
    filled = np.zeros((b, num_prototypes, k), dtype=bool)
    rows = np.broadcast_to(np.arange(b)[:, None], (b, k))
    features[rows, sorted_protos, slot] = np.take_along_axis(keypoints, order[..., None], axis=1)
    filled[rows, sorted_protos, slot] = True
    return features, filled


def release_landmark_features(
    keypoints: ArrayLike, prototype_ids: ArrayLike, num_prototypes: int, height: int, width: int
) -> np.ndarray:
    """The regressor input of the authors' release (`evaluate_celeba_h36m.py`).

    Same slots as `landmark_features` (`[M, K]`, x and y interleaved), but in
    image fractions (x / W, y / H) and in the release's order within a
    prototype: keypoints are taken in detection order (descending score) and
    each is inserted before the first of the prototype's earlier keypoints,
    except the last of them, that comes after it in raster order (key
    W y + x on the fractions); with none such it goes last. So the last
    earlier keypoint is never passed, and a prototype's first two keypoints
    stay in detection order. The release's regressors were fitted on this
    layout, so it is what they must be fed.

    Args:
      keypoints: `[B, K, 2]` (x, y) pixels, in detection order.
      prototype_ids: `[B, K]` int in [0, M).
      num_prototypes: M.
      height, width: the image size in pixels.

    Returns:
      `[B, M * K * 2]` float64.
    """
    keypoints, prototype_ids = _checked_slots_input(keypoints, prototype_ids, num_prototypes)
    b, k, _ = keypoints.shape
    fractions = keypoints / np.array([width, height], np.float64)
    raster = width * fractions[..., 1] + fractions[..., 0]
    features = np.zeros((b, num_prototypes, k, 2), np.float64)
    for i in range(b):
        slots: list[list[int]] = [[] for _ in range(num_prototypes)]  # Keypoint indices.
        for j in range(k):
            placed = slots[prototype_ids[i, j]]
            position = len(placed)
            for s in range(len(placed) - 1):  # The release's loop skips the last one.
                if raster[i, placed[s]] > raster[i, j]:
                    position = s
                    break
            placed.insert(position, j)
        for m, placed in enumerate(slots):
            features[i, m, : len(placed)] = fractions[i, placed]
    return features.reshape(b, -1)


def regression_moments(inputs: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sufficient statistics of a least-squares fit without bias.

    Args:
      inputs: `[N, D]` float (e.g. flattened `landmark_features`).
      targets: `[N, P]` float (e.g. flattened landmarks).

    Returns:
      `(inputs^T inputs [D, D], inputs^T targets [D, P])`, float64; sum them
      over batches to fit on a split too large to hold as one `[N, D]` array.
    """
    x = base.as_float_array("inputs", inputs, 2)
    y = base.as_float_array("targets", targets, 2)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and targets must have the same N, got {x.shape}, {y.shape}.")
    return x.T @ x, x.T @ y


def solve_regression(gram: ArrayLike, cross: ArrayLike, ridge: float = 0.0) -> np.ndarray:
    """Weights minimising `|X W - Y|^2 + ridge |W|^2` from `regression_moments`.

    Solves `(X^T X + ridge I) W = X^T Y` with `np.linalg.lstsq` (SVD), so a
    rank-deficient system (slots never filled, ridge 0) gets the minimum-norm
    solution, which is the minimum-norm least-squares fit up to the SVD cut-off
    (singular values of X below about sqrt(eps) of the largest are dropped,
    because the Gram matrix squares them).

    Args:
      gram: `[D, D]` X^T X.
      cross: `[D, P]` X^T Y.
      ridge: non-negative L2 weight on W (0: plain least squares).

    Returns:
      `[D, P]` float64 W; predictions are `X @ W`.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    gram = np.asarray(gram, dtype=np.float64)
    cross = np.asarray(cross, dtype=np.float64)
    system = gram + ridge * np.eye(gram.shape[0])
    return np.linalg.lstsq(system, cross, rcond=None)[0]


def fit_linear_regressor(inputs: ArrayLike, targets: ArrayLike, ridge: float = 0.0) -> np.ndarray:
    """Closed-form linear map without bias, `[N, D]` -> `[N, P]` (seed 004).

    Returns:
      `[D, P]` weights W with `targets ~ inputs @ W`, see `solve_regression`.
    """
    return solve_regression(*regression_moments(inputs, targets), ridge=ridge)


def inter_ocular_distance(
    landmarks: ArrayLike, eye_indices: tuple[int, int] = (0, 1)
) -> np.ndarray:
    """Distance between the two eye landmarks (CelebA/MAFL: landmarks 0 and 1).

    Args:
      landmarks: `[N, T, 2]` (x, y) pixels.
      eye_indices: indices of the two eyes.

    Returns:
      `[N]` float64 pixels.
    """
    landmarks = base.as_float_array("landmarks", landmarks, 3, 2)
    i, j = eye_indices
    return np.linalg.norm(landmarks[:, i] - landmarks[:, j], axis=-1)


def swap_left_right(
    landmarks: ArrayLike,
    swap: ArrayLike,
    pairs: Sequence[tuple[int, int]] = H36M_32_LEFT_RIGHT_PAIRS,
) -> np.ndarray:
    """Exchanges left and right joint labels on the images where `swap` is True.

    H36M protocol (Zhang et al. 2018, followed by TUSK): front and back views
    of a person look alike, so on back-facing people the ground-truth left and
    right joints are exchanged (on the train split before fitting and on the
    test split before scoring).

    Args:
      landmarks: `[N, T, 2]` (x, y) pixels.
      swap: `[N]` bool, e.g. the H36M `back_facing` field.
      pairs: (left, right) landmark index pairs; default: the 32-joint H36M
        skeleton, `H36M_32_LEFT_RIGHT_PAIRS`.

    Returns:
      `[N, T, 2]` copy with the paired rows exchanged where `swap`.
    """
    landmarks = base.as_float_array("landmarks", landmarks, 3, 2)
    swap = np.asarray(swap, dtype=bool)
    if swap.shape != landmarks.shape[:1]:
        raise ValueError(f"swap must have shape {landmarks.shape[:1]}, got {swap.shape}.")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    t = landmarks.shape[1]
    if pairs.size and (pairs.min() < 0 or pairs.max() >= t):
        raise ValueError(f"pairs index landmarks outside [0, {t}).")
    permutation = np.arange(t)
    permutation[pairs[:, 0]] = pairs[:, 1]
    permutation[pairs[:, 1]] = pairs[:, 0]
    return np.where(swap[:, None, None], landmarks[:, permutation], landmarks)


def normalized_point_error(
    prediction: ArrayLike, target: ArrayLike, normalizer: ArrayLike, valid: ArrayLike | None = None
) -> np.ndarray:
    """Per-image mean Euclidean distance between point sets / a normaliser.

    Args:
      prediction: `[N, P, 2]` (x, y) pixels.
      target: `[N, P, 2]` (x, y) pixels.
      normalizer: scalar or `[N]` pixels (inter-ocular distance, image size).
      valid: optional `[N, P]` bool, the points to average over (every image
        needs at least one).

    Returns:
      `[N]` float64, mean over the (valid) points of `|prediction - target| /
      normalizer`.
    """
    prediction = base.as_float_array("prediction", prediction, 3, 2)
    target = base.as_float_array("target", target, 3, 2)
    base.check_same_shape(prediction=prediction, target=target)
    normalizer = np.broadcast_to(np.asarray(normalizer, np.float64), prediction.shape[:1])
    if np.any(normalizer <= 0):
        raise ValueError("normalizer must be positive.")
    distance = np.linalg.norm(prediction - target, axis=-1)
    if valid is None:
        mean = distance.mean(axis=1)
    else:
        valid = np.asarray(valid, dtype=bool)
        base.check_same_shape(distance=distance, valid=valid)
        if np.any(valid.sum(axis=1) == 0):
            raise ValueError("valid must mark at least one point per image.")
        mean = (distance * valid).sum(axis=1) / valid.sum(axis=1)
    return mean / normalizer


def ced_curve(errors: ArrayLike, thresholds: ArrayLike = DEFAULT_CED_THRESHOLDS) -> np.ndarray:
    """Cumulative error distribution: fraction of images with error <= threshold.

    Args:
      errors: `[N]` per-image normalised errors.
      thresholds: `[G]` increasing thresholds (default 0 to 0.5 by 0.005).

    Returns:
      `[G]` float64 in [0, 1], non-decreasing.
    """
    errors = np.sort(np.asarray(errors, dtype=np.float64).ravel())
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if errors.size == 0:
        raise ValueError("errors is empty.")
    return np.searchsorted(errors, thresholds, side="right") / errors.size


def nearest_landmark_ids(keypoints: ArrayLike, landmarks: ArrayLike) -> np.ndarray:
    """Index of the nearest ground-truth landmark of each keypoint.

    Args:
      keypoints: `[B, K, 2]` (x, y) pixels.
      landmarks: `[B, T, 2]` (x, y) pixels.

    Returns:
      `[B, K]` int64 in [0, T) (ties: the lowest landmark index).
    """
    keypoints = base.as_float_array("keypoints", keypoints, 3, 2)
    landmarks = base.as_float_array("landmarks", landmarks, 3, 2)
    d2 = ((keypoints[:, :, None] - landmarks[:, None]) ** 2).sum(-1)
    return np.argmin(d2, axis=2)


def landmark_prototype_counts(
    keypoints: ArrayLike, prototype_ids: ArrayLike, landmarks: ArrayLike, num_prototypes: int
) -> np.ndarray:
    """Counts of (nearest ground-truth landmark, prototype) over keypoints.

    Args:
      keypoints: `[B, K, 2]` (x, y) pixels.
      prototype_ids: `[B, K]` int in [0, M).
      landmarks: `[B, T, 2]` (x, y) pixels.
      num_prototypes: M.

    Returns:
      `[T, M]` int64; sum over batches, then `nmi_from_counts`.
    """
    prototype_ids = base.as_int_array("prototype_ids", prototype_ids, 2)
    nearest = nearest_landmark_ids(keypoints, landmarks)
    if nearest.shape != prototype_ids.shape:
        raise ValueError(
            f"prototype_ids must have shape {nearest.shape}, got {prototype_ids.shape}."
        )
    if prototype_ids.size and (prototype_ids.min() < 0 or prototype_ids.max() >= num_prototypes):
        raise ValueError(f"prototype_ids must be in [0, {num_prototypes}).")
    t = np.shape(landmarks)[1]
    counts = np.bincount(
        (nearest * num_prototypes + prototype_ids).ravel(), minlength=t * num_prototypes
    )
    return counts.reshape(t, num_prototypes).astype(np.int64)


def nmi_from_counts(counts: ArrayLike) -> float:
    """Normalised mutual information from a `[T, M]` (label, cluster) count table.

    Expands the counts to label pairs and calls
    `sklearn.metrics.normalized_mutual_info_score` (arithmetic mean
    normalisation), so streamed counts give exactly scikit-learn's value.
    Used with T = ground-truth landmark identity (`nearest_landmark_ids`) and
    M = prototype assignment (seed 003's descriptor metric).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2:
        raise ValueError(f"counts must have rank 2, got shape {counts.shape}.")
    t, m = np.nonzero(counts)
    repeats = counts[t, m]
    if repeats.sum() == 0:
        raise ValueError("counts is all zero.")
    return float(
        sklearn.metrics.normalized_mutual_info_score(np.repeat(t, repeats), np.repeat(m, repeats))
    )
