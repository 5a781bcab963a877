"""Multi-instance detection and classification (MNIST-Hard, SPEC 6).

Boxes are 20 x 20 pixels at the paper's 80 x 80 canvas and scale with the
evaluated image size; a detection matches a digit at IoU > 0.5 (greedy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from tusk_jax.evaluators import base, purity

BOX_SIZE = 20.0  # MNIST-Hard box side at the paper's canvas (pixels).
CANVAS = 80.0


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
    keypoints = base.as_float_array("keypoints", keypoints, 3, 2)
    centers = base.as_float_array("centers", centers, 3, 2)
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
    labels = base.as_int_array("labels", labels, 2)
    prototype_ids = base.as_int_array("prototype_ids", prototype_ids, 2)
    gt_valid = labels >= 0
    det_index, _ = match_detections(
        keypoints, centers, gt_valid, box_size=box_size, iou_threshold=iou_threshold
    )
    matched = det_index >= 0
    # label_counts over ground truths: each matched digit (its own index into
    # `labels`) paired with the prototype of the keypoint it matched.
    match_protos = np.take_along_axis(prototype_ids, np.maximum(det_index, 0), axis=1)
    counts = base.label_counts(
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
        ("majority", base.majority_mapping(counts)),
        ("hungarian", base.hungarian_mapping(counts)),
    ):
        correct = base.mapped_correct(counts, mapping)
        scores[f"classification_{name}"] = ratio(correct, num_matched)
        scores[f"both_{name}"] = ratio(correct, num_gt)
    return scores


class MultiInstanceEvaluator(base.Evaluator):
    """MNIST-Hard localisation, classification (majority and bipartite mapping) and purity.

    `prototype_purity` gives each prototype's majority digit over its matched detections.
    """

    def __init__(self, num_prototypes: int, image_size: int, tsne_points: int = 0):
        super().__init__(num_prototypes, image_size, tsne_points)
        self.num_gt = 0
        self.num_matched = 0
        self.counts = None

    def _add(self, batch, out, valid) -> None:
        labels = np.where(valid[:, None], batch["labels"], -1)
        box_size = BOX_SIZE * self.image_size / CANVAS
        stats = mnist_hard_counts(
            out["keypoints"],
            out["prototype"],
            batch["centers"],
            labels,
            num_prototypes=self.num_prototypes,
            box_size=box_size,
        )
        self.num_gt += stats["num_gt"]
        self.num_matched += stats["num_matched"]
        self.counts = base.add_counts(self.counts, stats["counts"])
        det_index, _ = match_detections(
            out["keypoints"], batch["centers"], labels >= 0, box_size=box_size
        )
        self.keep_for_tsne(
            out["descriptors"][valid].reshape(-1, out["descriptors"].shape[-1]), None
        )
        hit = det_index >= 0
        if hit.any():
            rows = np.nonzero(hit)[0]
            descriptors = out["descriptors"][rows, det_index[hit]]
            self.keep_for_tsne(descriptors, labels[hit].astype(np.int64))

    def _result(self, num_keypoints_seen: int) -> dict[str, Any]:
        counts = self.counts
        if counts is None:
            counts = np.zeros((self.num_prototypes, 10), np.int64)
        out: dict[str, Any] = mnist_hard_scores(counts, self.num_gt, self.num_matched)
        out[purity.PURITY] = purity.prototype_purity({"digit": counts})
        return out
