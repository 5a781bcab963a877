"""Evaluation metrics of SPEC section 6, as numpy functions on plain arrays.

This module owns every number the evaluation reports; it runs once on model
outputs, so it is numpy (not jax), vectorised over images where the test split
is large. Conventions: keypoints and landmarks are (x, y) in pixel units with
the centre of the top-left pixel at (0, 0) (SPEC section 1); a leading axis `B`
(a batch) or `N` (a whole split) indexes images.

- Object discovery (Tetrominoes, CLEVR):
  `object_ids_from_alpha`, `segmentation_ari` (ARI-FG and ARI with background,
  checked against `sklearn.metrics.adjusted_rand_score`),
  `match_keypoints_to_objects` + `label_counts` + `majority_accuracy` for the
  attribute classification.
- MNIST-Hard: `box_iou`, `match_detections` (greedy, IoU > 0.5 on 20 x 20
  boxes), `mnist_hard_counts` + `mnist_hard_scores` (prototype -> class mapping
  by majority and by Hungarian matching, both reported).
- Landmark regression (CelebA/MAFL, H36M; seeds 003 and 004):
  `landmark_features` (the M x K x 2 input), `regression_moments` +
  `solve_regression` / `fit_linear_regressor` (closed-form least squares, no
  bias, optional ridge), `inter_ocular_distance`, `swap_left_right`,
  `normalized_point_error`, `ced_curve`, `landmark_prototype_counts` +
  `nmi_from_counts`, and `evaluate_landmark_regression` which runs the whole
  protocol (forward and backward error, CED curves, NMI).

Streaming: metrics whose definition needs the whole split (a prototype's
majority label) are split into a per-batch function that returns integer count
matrices, to be summed over batches, and a function that turns the summed
counts into the score. Everything else is per image, to be averaged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import sklearn.metrics
from absl import logging
from numpy.typing import ArrayLike

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


def _as_int_array(name: str, value, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {array.dtype}.")
    return array.astype(np.int64)


def _as_float_array(
    name: str, value, ndim: int, last_dim: int | None = None, keep_dtype: bool = False
) -> np.ndarray:
    array = np.asarray(value)
    if keep_dtype and np.issubdtype(array.dtype, np.floating):
        pass  # Large maps (alpha) are only compared, not summed: no float64 copy.
    else:
        array = array.astype(np.float64)
    if array.ndim != ndim or (last_dim is not None and array.shape[-1] != last_dim):
        want = f"rank {ndim}" + (f" with trailing size {last_dim}" if last_dim else "")
        raise ValueError(f"{name} must have {want}, got shape {array.shape}.")
    return array


def _check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Shapes must match, got {shapes}.")


# ----------------------------------------------------------------------------
# Object discovery: ARI.
# ----------------------------------------------------------------------------


def object_ids_from_alpha(alpha: ArrayLike) -> np.ndarray:
    """Predicted object id of each pixel: argmax over keypoints of the alpha maps.

    Args:
      alpha: `[B, K, H, W]` float, the alpha-mode decoder's per-keypoint masks
        (softmax over K, SPEC section 2).

    Returns:
      `[B, H, W]` int64 in [0, K). Ties go to the lowest keypoint index
      (`np.argmax`).
    """
    alpha = _as_float_array("alpha", alpha, 4, keep_dtype=True)
    return np.argmax(alpha, axis=1)


def contingency_tables(
    labels_true: ArrayLike, labels_pred: ArrayLike, weights: ArrayLike | None = None
) -> np.ndarray:
    """Per-row contingency tables of two labelings, all rows at once.

    Args:
      labels_true: `[B, N]` non-negative int, ground-truth cluster of each point.
      labels_pred: `[B, N]` non-negative int, predicted cluster of each point.
      weights: optional `[B, N]` bool (or 0/1 int); points with weight 0 are left
        out. None: every point counts.

    Returns:
      `[B, T, P]` int64 counts, `T = max(labels_true) + 1`,
      `P = max(labels_pred) + 1`; entry `[b, t, p]` counts the points of row `b`
      with true label `t` and predicted label `p`. One `np.bincount` over all
      rows (no Python loop over images).
    """
    labels_true = _as_int_array("labels_true", labels_true, 2)
    labels_pred = _as_int_array("labels_pred", labels_pred, 2)
    _check_same_shape(labels_true=labels_true, labels_pred=labels_pred)
    if labels_true.size and (labels_true.min() < 0 or labels_pred.min() < 0):
        raise ValueError("labels_true and labels_pred must be non-negative.")
    b = labels_true.shape[0]
    t = int(labels_true.max()) + 1 if labels_true.size else 1
    p = int(labels_pred.max()) + 1 if labels_pred.size else 1
    flat = (np.arange(b)[:, None] * t + labels_true) * p + labels_pred
    if weights is None:
        counts = np.bincount(flat.ravel(), minlength=b * t * p)
    else:
        weights = np.asarray(weights)
        _check_same_shape(labels_true=labels_true, weights=weights)
        counts = np.bincount(flat[weights.astype(bool)], minlength=b * t * p)
    return counts.reshape(b, t, p).astype(np.int64)


def adjusted_rand_index_from_contingency(contingency: ArrayLike) -> np.ndarray:
    """Adjusted Rand index of each row of `[B, T, P]` contingency tables.

    The pair-counting form of `sklearn.metrics.adjusted_rand_score` (through
    `pair_confusion_matrix`), vectorised over rows, so the values agree with
    scikit-learn to float rounding, including its special cases: full
    agreement (this covers one cluster in both labelings, all points distinct
    in both, and fewer than two points) gives 1.0; otherwise the denominator
    is positive, so the result is never NaN. ARI is 0 for chance agreement (a
    single true cluster against any other split), may be negative.

    Returns:
      `[B]` float64.
    """
    c = np.asarray(contingency, dtype=np.int64)
    if c.ndim != 3:
        raise ValueError(f"contingency must have rank 3, got shape {c.shape}.")
    n = c.sum(axis=(1, 2))
    sum_squares = (c * c).sum(axis=(1, 2))
    sum_true_sq = (c.sum(axis=2) ** 2).sum(axis=1)
    sum_pred_sq = (c.sum(axis=1) ** 2).sum(axis=1)
    # Ordered pairs: together in both, apart in true only, apart in pred only, apart in both.
    # Counts stay exact in int64 (< n^2); products are taken in float64.
    tp = (sum_squares - n).astype(np.float64)
    fp = (sum_pred_sq - sum_squares).astype(np.float64)
    fn = (sum_true_sq - sum_squares).astype(np.float64)
    tn = (n * n - sum_pred_sq - sum_true_sq + sum_squares).astype(np.float64)
    agree = (fp == 0) & (fn == 0)
    denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    safe = np.where(agree, 1.0, denominator)
    return np.where(agree, 1.0, 2.0 * (tp * tn - fn * fp) / safe)


def adjusted_rand_index(
    labels_true: ArrayLike, labels_pred: ArrayLike, weights: ArrayLike | None = None
) -> np.ndarray:
    """Adjusted Rand index per row, equal to `sklearn.metrics.adjusted_rand_score`.

    Args:
      labels_true: `[B, N]` non-negative int.
      labels_pred: `[B, N]` non-negative int.
      weights: optional `[B, N]` bool; only points with True are compared (row
        `b` equals `adjusted_rand_score(labels_true[b][w], labels_pred[b][w])`).

    Returns:
      `[B]` float64, see `adjusted_rand_index_from_contingency` for the special
      cases (never NaN).
    """
    return adjusted_rand_index_from_contingency(
        contingency_tables(labels_true, labels_pred, weights)
    )


def segmentation_ari(
    gt_mask: ArrayLike, pred_ids: ArrayLike, *, foreground_only: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """ARI-FG (default) or ARI with background, per image (SPEC section 6).

    Args:
      gt_mask: `[B, H, W]` int, ground-truth entity id of each pixel, 0 is the
        background.
      pred_ids: `[B, H, W]` int, predicted object id (e.g.
        `object_ids_from_alpha(alpha)`).
      foreground_only: True: ARI-FG, only pixels with `gt_mask != 0` are
        compared. False: all pixels, the background being one more cluster.

    Returns:
      `(ari, valid)`: `ari` `[B]` float64, the scikit-learn value on the
      compared pixels (1.0 when fewer than two pixels are compared); `valid`
      `[B]` bool, True when at least two pixels (one pair) are compared. An image
      with an empty foreground has no pair to judge, so the mean over a split is
      taken over valid images only: `ari[valid].mean()`; accumulate
      `ari[valid].sum()` and `valid.sum()` to stream batches.
    """
    gt_mask = _as_int_array("gt_mask", gt_mask, 3)
    pred_ids = _as_int_array("pred_ids", pred_ids, 3)
    _check_same_shape(gt_mask=gt_mask, pred_ids=pred_ids)
    b = gt_mask.shape[0]
    labels_true = gt_mask.reshape(b, -1)
    labels_pred = pred_ids.reshape(b, -1)
    weights = labels_true != 0 if foreground_only else np.ones_like(labels_true, dtype=bool)
    ari = adjusted_rand_index(labels_true, labels_pred, weights)
    valid = weights.sum(axis=1) >= 2
    return ari, valid


# ----------------------------------------------------------------------------
# Object discovery: attribute classification; shared count -> accuracy helpers.
# ----------------------------------------------------------------------------


def match_keypoints_to_objects(
    alpha: ArrayLike,
    gt_mask: ArrayLike,
    *,
    alpha_threshold: float = 0.8,
    overlap_threshold: float = 0.5,
    visibility: ArrayLike | None = None,
) -> np.ndarray:
    """Ground-truth object covering each keypoint's alpha mask (SPEC section 6).

    Keypoint k's mask is the set of pixels with `alpha[b, k] > alpha_threshold`.
    It is matched to the foreground entity `e` (id >= 1) whose ground-truth
    pixels cover strictly more than `overlap_threshold` of that mask. With a
    threshold >= 0.5 at most one entity can qualify, so there are no ties.
    Unmatched (-1): an empty mask, a mask mostly on the background, or one
    split between objects with none above the threshold.

    Args:
      alpha: `[B, K, H, W]` float alpha maps.
      gt_mask: `[B, H, W]` int entity id, 0 = background.
      alpha_threshold: a pixel belongs to a keypoint's mask if alpha > this.
      overlap_threshold: the matched entity covers > this fraction of the mask.
      visibility: optional `[B, E]` (bool/0-1), indexed by entity id like the
        mask; entities with visibility 0 are never matched.

    Returns:
      `[B, K]` int64: the matched entity id, or -1.
    """
    alpha = _as_float_array("alpha", alpha, 4, keep_dtype=True)
    gt_mask = _as_int_array("gt_mask", gt_mask, 3)
    b, k, h, w = alpha.shape
    if gt_mask.shape != (b, h, w):
        raise ValueError(f"gt_mask must have shape {(b, h, w)}, got {gt_mask.shape}.")
    if gt_mask.size and gt_mask.min() < 0:
        raise ValueError("gt_mask must be non-negative.")
    e = int(gt_mask.max()) + 1 if gt_mask.size else 1
    if visibility is not None:
        visibility = np.asarray(visibility)
        if visibility.ndim != 2 or visibility.shape[0] != b or visibility.shape[1] < e:
            raise ValueError(f"visibility must have shape [B={b}, E>={e}], got {visibility.shape}.")
        e = visibility.shape[1]
    # overlap[b, k, e] = number of pixels of keypoint k's mask (alpha > threshold)
    # that belong to entity e.
    ib, ik, iy, ix = np.nonzero(alpha > alpha_threshold)
    flat = (ib * k + ik) * e + gt_mask[ib, iy, ix]
    overlap = np.bincount(flat, minlength=b * k * e).reshape(b, k, e)
    area = overlap.sum(axis=2)
    overlap[:, :, 0] = 0  # The background is never an object.
    if visibility is not None:
        overlap = overlap * (visibility.astype(bool)[:, None, :])
    best = np.argmax(overlap, axis=2)
    best_overlap = np.take_along_axis(overlap, best[..., None], axis=2)[..., 0]
    matched = (area > 0) & (best_overlap > overlap_threshold * area)
    return np.where(matched, best, -1).astype(np.int64)


def label_counts(
    matched_ids: ArrayLike,
    prototype_ids: ArrayLike,
    labels: ArrayLike,
    num_prototypes: int,
    num_labels: int,
) -> np.ndarray:
    """Counts of (prototype, ground-truth label) over the matched keypoints.

    Used for the attribute classification (labels = one attribute of the
    matched entity) and, through `mnist_hard_counts`, for MNIST-Hard. Sum the
    returned matrices over batches, then score with `majority_accuracy` etc.

    Args:
      matched_ids: `[B, K]` int, the matched entity (index into `labels`' second
        axis) of each keypoint, -1 if unmatched (left out).
      prototype_ids: `[B, K]` int in [0, num_prototypes), each keypoint's nearest
        prototype.
      labels: `[B, E]` int in [0, num_labels), a label per entity (e.g. the
        `shape` attribute; index 0 the background, never matched).
      num_prototypes: M.
      num_labels: number of distinct label values V.

    Returns:
      `[M, V]` int64 counts.
    """
    matched_ids = _as_int_array("matched_ids", matched_ids, 2)
    prototype_ids = _as_int_array("prototype_ids", prototype_ids, 2)
    labels = _as_int_array("labels", labels, 2)
    _check_same_shape(matched_ids=matched_ids, prototype_ids=prototype_ids)
    if labels.shape[0] != matched_ids.shape[0]:
        raise ValueError(f"labels must have {matched_ids.shape[0]} rows, got shape {labels.shape}.")
    if matched_ids.size and matched_ids.max() >= labels.shape[1]:
        raise ValueError(f"matched_ids index entity {matched_ids.max()} >= E={labels.shape[1]}.")
    valid = matched_ids >= 0
    pids = prototype_ids[valid]
    if pids.size and (pids.min() < 0 or pids.max() >= num_prototypes):
        raise ValueError(f"prototype_ids must be in [0, {num_prototypes}).")
    values = np.take_along_axis(labels, np.maximum(matched_ids, 0), axis=1)[valid]
    if values.size and (values.min() < 0 or values.max() >= num_labels):
        raise ValueError(f"labels of matched entities must be in [0, {num_labels}).")
    counts = np.bincount(pids * num_labels + values, minlength=num_prototypes * num_labels)
    return counts.reshape(num_prototypes, num_labels).astype(np.int64)


def majority_mapping(counts: ArrayLike) -> np.ndarray:
    """Each prototype's majority label from `[M, V]` counts.

    Returns:
      `[M]` int64, the most frequent label of each prototype (ties: the lowest
      label index, which does not change the accuracy), -1 for a prototype
      with no count.
    """
    counts = np.asarray(counts)
    return np.where(counts.sum(axis=1) > 0, np.argmax(counts, axis=1), -1).astype(np.int64)


def hungarian_mapping(counts: ArrayLike) -> np.ndarray:
    """One-to-one prototype -> label assignment maximising the correct count.

    `scipy.optimize.linear_sum_assignment` on `[M, V]` counts (maximise). With
    M > V only V prototypes receive a label and the others map to -1 (their
    keypoints count as wrong); with M < V every prototype receives a distinct
    label.

    Returns:
      `[M]` int64 label per prototype, -1 if unassigned.
    """
    counts = np.asarray(counts)
    rows, cols = scipy.optimize.linear_sum_assignment(counts, maximize=True)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def mapped_correct(counts: ArrayLike, mapping: ArrayLike) -> int:
    """Number of counted items whose prototype maps to their label."""
    counts = np.asarray(counts)
    mapping = np.asarray(mapping)
    assigned = mapping >= 0
    rows = np.arange(counts.shape[0])[assigned]
    return int(counts[rows, mapping[assigned]].sum())


def majority_accuracy(counts: ArrayLike) -> float:
    """Attribute accuracy: sum over prototypes of the majority count / all counts.

    Args:
      counts: `[M, V]` summed `label_counts` of a whole split.

    Returns:
      float in [0, 1]; 0.0 (with a warning) when nothing was matched.
    """
    counts = np.asarray(counts)
    total = int(counts.sum())
    if total == 0:
        logging.warning("majority_accuracy: no matched keypoint, returning 0.")
        return 0.0
    return float(counts.max(axis=1).sum() / total)


# ----------------------------------------------------------------------------
# MNIST-Hard: detection and classification.
# ----------------------------------------------------------------------------


def box_iou(points_a: ArrayLike, points_b: ArrayLike, box_size: float = 20.0) -> np.ndarray:
    """IoU of axis-aligned `box_size` x `box_size` squares centred at points.

    Args:
      points_a: `[..., A, 2]` (x, y) pixel centres of the first boxes.
      points_b: `[..., B, 2]` (x, y) pixel centres of the second boxes.
      box_size: side of every box, pixels.

    Returns:
      `[..., A, B]` float64 in [0, 1]: with offsets (dx, dy) the intersection is
      `max(0, s - |dx|) * max(0, s - |dy|)`, the union `2 s^2 -` intersection.
    """
    a = np.asarray(points_a, dtype=np.float64)
    b = np.asarray(points_b, dtype=np.float64)
    if a.shape[-1] != 2 or b.shape[-1] != 2:
        raise ValueError(f"points must end in 2 (x, y), got {a.shape} and {b.shape}.")
    d = np.abs(a[..., :, None, :] - b[..., None, :, :])
    side = np.clip(box_size - d, 0.0, None)
    intersection = side[..., 0] * side[..., 1]
    return intersection / (2.0 * box_size**2 - intersection)


def match_detections(
    keypoints: ArrayLike,
    centers: ArrayLike,
    gt_valid: ArrayLike | None = None,
    *,
    box_size: float = 20.0,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of ground-truth digits to keypoint boxes (SPEC section 6).

    Ground truths are visited in their index order; each takes the unused
    detection with the highest IoU (ties: lowest keypoint index) and is matched
    if that IoU is strictly above `iou_threshold`; only a match uses up the
    detection. Vectorised over images (the loop runs over the O ground truths).

    Args:
      keypoints: `[B, K, 2]` (x, y) detected keypoints, pixels.
      centers: `[B, O, 2]` (x, y) ground-truth digit centres, pixels.
      gt_valid: optional `[B, O]` bool; False marks padding (never matched).
      box_size: side of the square boxes (20 px in the paper).
      iou_threshold: a match needs IoU > this.

    Returns:
      `(det_index, iou)`: `[B, O]` int64 index of the matched keypoint or -1,
      and `[B, O]` float64 IoU of the match (0 where unmatched).
    """
    keypoints = _as_float_array("keypoints", keypoints, 3, 2)
    centers = _as_float_array("centers", centers, 3, 2)
    if keypoints.shape[0] != centers.shape[0]:
        raise ValueError(
            f"keypoints and centers must share the batch axis, got {keypoints.shape} "
            f"and {centers.shape}."
        )
    b, o = centers.shape[:2]
    gt_valid = np.ones((b, o), bool) if gt_valid is None else np.asarray(gt_valid, bool)
    iou = box_iou(centers, keypoints, box_size)  # [B, O, K]
    used = np.zeros(keypoints.shape[:2], dtype=bool)
    det_index = np.full((b, o), -1, dtype=np.int64)
    det_iou = np.zeros((b, o), dtype=np.float64)
    rows = np.arange(b)
    for g in range(o):
        candidate = np.where(used, -1.0, iou[:, g])
        best = np.argmax(candidate, axis=1) if candidate.shape[1] else np.zeros(b, np.int64)
        best_iou = candidate[rows, best] if candidate.shape[1] else np.full(b, -1.0)
        ok = gt_valid[:, g] & (best_iou > iou_threshold)
        det_index[ok, g] = best[ok]
        det_iou[ok, g] = best_iou[ok]
        used[rows[ok], best[ok]] = True
    return det_index, det_iou


def mnist_hard_counts(
    keypoints: ArrayLike,
    prototype_ids: ArrayLike,
    centers: ArrayLike,
    labels: ArrayLike,
    *,
    num_prototypes: int,
    num_classes: int = 10,
    box_size: float = 20.0,
    iou_threshold: float = 0.5,
) -> dict[str, np.ndarray | int]:
    """Per-batch MNIST-Hard statistics, to be summed over the test split.

    Args:
      keypoints: `[B, K, 2]` (x, y) keypoints, pixels.
      prototype_ids: `[B, K]` int nearest prototype of each keypoint.
      centers: `[B, O, 2]` (x, y) ground-truth digit centres.
      labels: `[B, O]` int digit classes in [0, num_classes); -1 marks padding.
      num_prototypes: M.
      num_classes: number of digit classes.
      box_size, iou_threshold: see `match_detections`.

    Returns:
      dict with `num_gt` (int, ground truths), `num_matched` (int, ground truths
      matched to a keypoint) and `counts` (`[M, num_classes]` int64: for each
      match, the keypoint's prototype against the digit's class).
    """
    labels = _as_int_array("labels", labels, 2)
    prototype_ids = _as_int_array("prototype_ids", prototype_ids, 2)
    gt_valid = labels >= 0
    det_index, _ = match_detections(
        keypoints, centers, gt_valid, box_size=box_size, iou_threshold=iou_threshold
    )
    matched = det_index >= 0
    # label_counts over ground truths: each matched digit (its own index into
    # `labels`) paired with the prototype of the keypoint it matched.
    match_protos = np.take_along_axis(prototype_ids, np.maximum(det_index, 0), axis=1)
    counts = label_counts(
        np.where(matched, np.arange(labels.shape[1])[None, :], -1),
        np.where(matched, match_protos, 0),
        np.maximum(labels, 0),
        num_prototypes,
        num_classes,
    )
    return {
        "num_gt": int(gt_valid.sum()),
        "num_matched": int(matched.sum()),
        "counts": counts,
    }


def mnist_hard_scores(counts: ArrayLike, num_gt: int, num_matched: int) -> dict[str, float]:
    """MNIST-Hard localisation / classification / both from summed statistics.

    Localisation = matched / ground truths. Classification = correctly labelled
    / matched, Both = correctly labelled / ground truths, where a match is
    correctly labelled if its keypoint's prototype maps to the digit's class;
    the mapping is reported two ways: `*_majority` (each prototype to its most
    frequent class, the reference's choice) and `*_hungarian` (one-to-one
    bipartite matching, the paper's text). A zero denominator gives 0.0.

    Returns:
      dict with keys `localization`, `classification_majority`, `both_majority`,
      `classification_hungarian`, `both_hungarian` (floats in [0, 1]).
    """
    counts = np.asarray(counts)
    if int(counts.sum()) != int(num_matched):
        raise ValueError(f"counts sum to {int(counts.sum())}, num_matched is {num_matched}.")

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else 0.0

    scores = {"localization": ratio(num_matched, num_gt)}
    for name, mapping in (
        ("majority", majority_mapping(counts)),
        ("hungarian", hungarian_mapping(counts)),
    ):
        correct = mapped_correct(counts, mapping)
        scores[f"classification_{name}"] = ratio(correct, num_matched)
        scores[f"both_{name}"] = ratio(correct, num_gt)
    return scores


# ----------------------------------------------------------------------------
# Landmark regression (seeds 003 and 004).
# ----------------------------------------------------------------------------


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
    keypoints = _as_float_array("keypoints", keypoints, 3, 2)
    prototype_ids = _as_int_array("prototype_ids", prototype_ids, 2)
    b, k, _ = keypoints.shape
    if prototype_ids.shape != (b, k):
        raise ValueError(f"prototype_ids must have shape {(b, k)}, got {prototype_ids.shape}.")
    if prototype_ids.size and (prototype_ids.min() < 0 or prototype_ids.max() >= num_prototypes):
        raise ValueError(f"prototype_ids must be in [0, {num_prototypes}).")
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


def regression_moments(inputs: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sufficient statistics of a least-squares fit without bias.

    Args:
      inputs: `[N, D]` float (e.g. flattened `landmark_features`).
      targets: `[N, P]` float (e.g. flattened landmarks).

    Returns:
      `(inputs^T inputs [D, D], inputs^T targets [D, P])`, float64; sum them
      over batches to fit on a split too large to hold as one `[N, D]` array.
    """
    x = _as_float_array("inputs", inputs, 2)
    y = _as_float_array("targets", targets, 2)
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
    landmarks = _as_float_array("landmarks", landmarks, 3, 2)
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
    landmarks = _as_float_array("landmarks", landmarks, 3, 2)
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
    prediction = _as_float_array("prediction", prediction, 3, 2)
    target = _as_float_array("target", target, 3, 2)
    _check_same_shape(prediction=prediction, target=target)
    normalizer = np.broadcast_to(np.asarray(normalizer, np.float64), prediction.shape[:1])
    if np.any(normalizer <= 0):
        raise ValueError("normalizer must be positive.")
    distance = np.linalg.norm(prediction - target, axis=-1)
    if valid is None:
        mean = distance.mean(axis=1)
    else:
        valid = np.asarray(valid, dtype=bool)
        _check_same_shape(distance=distance, valid=valid)
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
    keypoints = _as_float_array("keypoints", keypoints, 3, 2)
    landmarks = _as_float_array("landmarks", landmarks, 3, 2)
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
    prototype_ids = _as_int_array("prototype_ids", prototype_ids, 2)
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


@dataclasses.dataclass(frozen=True)
class LandmarkRegressionResult:
    """Output of `evaluate_landmark_regression` (errors are normalised, not %)."""

    forward_error: float  # Mean over test images of `forward_per_image`.
    backward_error: float  # Mean over test images of `backward_per_image`.
    nmi: float  # NMI(nearest GT landmark id, prototype id) over test keypoints.
    forward_per_image: np.ndarray  # [N] mean over landmarks of distance / normaliser.
    forward_per_landmark: np.ndarray  # [T] mean over images of distance / normaliser.
    backward_per_image: np.ndarray  # [N] mean over the K keypoints.
    ced_thresholds: np.ndarray  # [G]
    ced_forward: np.ndarray  # [G]
    ced_backward: np.ndarray  # [G]
    forward_weights: np.ndarray  # [M*K*2, T*2]: landmarks = features @ W.
    backward_weights: np.ndarray  # [T*2, M*K*2]: features = landmarks @ W.


def evaluate_landmark_regression(
    train_keypoints: ArrayLike,
    train_prototype_ids: ArrayLike,
    train_landmarks: ArrayLike,
    test_keypoints: ArrayLike,
    test_prototype_ids: ArrayLike,
    test_landmarks: ArrayLike,
    *,
    num_prototypes: int,
    normalizer: str | float = "inter_ocular",
    eye_indices: tuple[int, int] = (0, 1),
    train_back_facing: ArrayLike | None = None,
    test_back_facing: ArrayLike | None = None,
    left_right_pairs: Sequence[tuple[int, int]] | None = None,
    ridge: float = 0.0,
    ced_thresholds: ArrayLike = DEFAULT_CED_THRESHOLDS,
    chunk_size: int = 4096,
) -> LandmarkRegressionResult:
    """The landmark regression protocol (SPEC section 6, seeds 003 and 004).

    1. Inputs: `landmark_features` (M x K x 2, flattened to D = M*K*2).
    2. H36M: if `*_back_facing` is given, left/right ground-truth labels are
       swapped on those images (train and test) with `left_right_pairs`.
    3. Forward: W_f fitted on train (`[N, D]` -> `[N, T*2]`, no bias, closed
       form, optional ridge); error per test image = mean over the T landmarks
       of distance / normaliser.
    4. Backward (Sanchez & Tzimiropoulos, seed 003): W_b fitted on train from
       the (swapped) landmarks to the features; error per test image = mean over
       the image's K keypoints of the distance between the keypoint and its
       slot's regressed position, / the same normaliser. (Empty slots are not
       scored: they hold no keypoint.)
    5. CED curves of both per-image errors, and NMI between each test
       keypoint's prototype and the id of its nearest (swapped) landmark.

    Args:
      train_keypoints, test_keypoints: `[N, K, 2]` (x, y) pixels.
      train_prototype_ids, test_prototype_ids: `[N, K]` int in [0, M).
      train_landmarks, test_landmarks: `[N, T, 2]` (x, y) pixels.
      num_prototypes: M.
      normalizer: "inter_ocular" (distance between `eye_indices` of each test
        image's landmarks; CelebA/MAFL) or a positive number (pixels, e.g. the
        image size for H36M).
      eye_indices: the two eye landmarks for "inter_ocular".
      train_back_facing, test_back_facing: optional `[N]` bool (H36M).
      left_right_pairs: pairs to swap; None: `H36M_32_LEFT_RIGHT_PAIRS` when
        T == 32, else a `ValueError` if a back_facing array is given.
      ridge: L2 weight of both fits (0: least squares).
      ced_thresholds: `[G]` CED threshold grid.
      chunk_size: images per chunk when building features (bounds memory).

    Returns:
      `LandmarkRegressionResult`.
    """
    train_landmarks = _as_float_array("train_landmarks", train_landmarks, 3, 2)
    test_landmarks = _as_float_array("test_landmarks", test_landmarks, 3, 2)
    t = train_landmarks.shape[1]
    if test_landmarks.shape[1] != t:
        raise ValueError(
            f"train_landmarks and test_landmarks differ in T: {t} vs {test_landmarks.shape[1]}."
        )
    if train_back_facing is not None or test_back_facing is not None:
        if left_right_pairs is None:
            if t != 32:
                raise ValueError(
                    f"left_right_pairs must be given for T={t} landmarks (the default "
                    "H36M_32_LEFT_RIGHT_PAIRS needs T=32)."
                )
            left_right_pairs = H36M_32_LEFT_RIGHT_PAIRS
        if train_back_facing is not None:
            train_landmarks = swap_left_right(train_landmarks, train_back_facing, left_right_pairs)
        if test_back_facing is not None:
            test_landmarks = swap_left_right(test_landmarks, test_back_facing, left_right_pairs)

    if normalizer == "inter_ocular":
        norm = inter_ocular_distance(test_landmarks, eye_indices)
        if np.any(norm <= 0):
            raise ValueError("test_landmarks: an image has coincident eye landmarks.")
    elif isinstance(normalizer, str):
        raise ValueError(f"normalizer must be 'inter_ocular' or a number, got {normalizer!r}.")
    else:
        norm = np.full(test_landmarks.shape[0], float(normalizer))

    def features_of(keypoints, prototype_ids, start, stop):
        f, filled = landmark_features(
            np.asarray(keypoints)[start:stop], np.asarray(prototype_ids)[start:stop], num_prototypes
        )
        return f.reshape(f.shape[0], -1), filled

    # Fit both directions from streamed moments.
    n_train = train_landmarks.shape[0]
    if np.shape(train_keypoints)[0] != n_train or np.shape(train_prototype_ids)[0] != n_train:
        raise ValueError("train_keypoints, train_prototype_ids, train_landmarks differ in N.")
    gram_f = cross_f = gram_b = cross_b = 0.0
    for start in range(0, n_train, chunk_size):
        x, _ = features_of(train_keypoints, train_prototype_ids, start, start + chunk_size)
        y = train_landmarks[start : start + chunk_size].reshape(x.shape[0], -1)
        g, c = regression_moments(x, y)
        gram_f, cross_f = gram_f + g, cross_f + c
        g, c = regression_moments(y, x)
        gram_b, cross_b = gram_b + g, cross_b + c
    w_forward = solve_regression(gram_f, cross_f, ridge)
    w_backward = solve_regression(gram_b, cross_b, ridge)

    n_test = test_landmarks.shape[0]
    if np.shape(test_keypoints)[0] != n_test or np.shape(test_prototype_ids)[0] != n_test:
        raise ValueError("test_keypoints, test_prototype_ids, test_landmarks differ in N.")
    forward, per_landmark, backward = [], [], []
    for start in range(0, n_test, chunk_size):
        stop = start + chunk_size
        x, filled = features_of(test_keypoints, test_prototype_ids, start, stop)
        y = test_landmarks[start:stop]
        nrm = norm[start:stop]
        pred = (x @ w_forward).reshape(y.shape)
        per_landmark.append(np.linalg.norm(pred - y, axis=-1) / nrm[:, None])
        forward.append(per_landmark[-1].mean(axis=1))
        pred_x = (y.reshape(y.shape[0], -1) @ w_backward).reshape(x.shape[0], -1, 2)
        backward.append(
            normalized_point_error(
                pred_x, x.reshape(x.shape[0], -1, 2), nrm, filled.reshape(x.shape[0], -1)
            )
        )
    forward = np.concatenate(forward)
    backward = np.concatenate(backward)
    per_landmark = np.concatenate(per_landmark).mean(axis=0)

    nmi_counts = landmark_prototype_counts(
        test_keypoints, test_prototype_ids, test_landmarks, num_prototypes
    )

    return LandmarkRegressionResult(
        forward_error=float(forward.mean()),
        backward_error=float(backward.mean()),
        nmi=nmi_from_counts(nmi_counts),
        forward_per_image=forward,
        forward_per_landmark=per_landmark,
        backward_per_image=backward,
        ced_thresholds=np.asarray(ced_thresholds, dtype=np.float64),
        ced_forward=ced_curve(forward, ced_thresholds),
        ced_backward=ced_curve(backward, ced_thresholds),
        forward_weights=w_forward,
        backward_weights=w_backward,
    )
