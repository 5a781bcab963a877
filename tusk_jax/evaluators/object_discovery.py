"""Object discovery (Tetrominoes, CLEVR; SPEC 6): ARI-FG, ARI and attribute accuracies.

Conventions: masks `[B, H, W]` with 0 the background; alpha `[B, K, H, W]`
from the alpha-mode decoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from tusk_jax.evaluators import base, purity

ATTRIBUTES = ("shape", "color", "size", "material")


def object_ids_from_alpha(alpha: ArrayLike) -> np.ndarray:
    """Predicted object id of each pixel: argmax over keypoints of the alpha maps.

    Args:
      alpha: `[B, K, H, W]` float, the alpha-mode decoder's per-keypoint masks
        (softmax over K, SPEC section 2).

    Returns:
      `[B, H, W]` int64 in [0, K). Ties go to the lowest keypoint index
      (`np.argmax`).
    """
    alpha = base.as_float_array("alpha", alpha, 4, keep_dtype=True)
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
    labels_true = base.as_int_array("labels_true", labels_true, 2)
    labels_pred = base.as_int_array("labels_pred", labels_pred, 2)
    base.check_same_shape(labels_true=labels_true, labels_pred=labels_pred)
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
        base.check_same_shape(labels_true=labels_true, weights=weights)
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
    gt_mask = base.as_int_array("gt_mask", gt_mask, 3)
    pred_ids = base.as_int_array("pred_ids", pred_ids, 3)
    base.check_same_shape(gt_mask=gt_mask, pred_ids=pred_ids)
    b = gt_mask.shape[0]
    labels_true = gt_mask.reshape(b, -1)
    labels_pred = pred_ids.reshape(b, -1)
    weights = labels_true != 0 if foreground_only else np.ones_like(labels_true, dtype=bool)
    ari = adjusted_rand_index(labels_true, labels_pred, weights)
    valid = weights.sum(axis=1) >= 2
    return ari, valid


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
    alpha = base.as_float_array("alpha", alpha, 4, keep_dtype=True)
    gt_mask = base.as_int_array("gt_mask", gt_mask, 3)
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


def class_labels(batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per-entity class codes of an object-discovery batch (SPEC 5), `[B, E]` int.

    Tetrominoes: shape x 6 + colour; CLEVR (has `size`): shape x 16 +
    colour x 2 + size. None without shape and colour.
    """
    if "shape" not in batch or "color" not in batch:
        return None
    shape, color = batch["shape"].astype(np.int64), batch["color"].astype(np.int64)
    if "size" in batch:
        return shape * 16 + color * 2 + batch["size"].astype(np.int64)
    return shape * 6 + color


class ObjectDiscoveryEvaluator(base.Evaluator):
    """ARI-FG, ARI, matched keypoints, attribute accuracies and per-prototype purity.

    An attribute accuracy takes each prototype's majority label over the
    matched keypoints; `prototype_purity` lists those labels and purities.
    """

    def __init__(self, num_prototypes: int, image_size: int, tsne_points: int = 0):
        super().__init__(num_prototypes, image_size, tsne_points)
        self.ari_fg = [0.0, 0]  # (sum over valid images, count)
        self.ari = [0.0, 0]
        self.attribute_counts: dict[str, np.ndarray | None] = {}
        self.num_matched = 0

    def _add(self, batch, out, valid) -> None:
        if "alpha" not in out:
            raise ValueError(
                "object discovery metrics need the alpha decoder (config model.decoder_mode="
                "'alpha'); this model is 'plain'."
            )
        mask = batch["mask"]
        pred_ids = object_ids_from_alpha(out["alpha"])
        for key, foreground_only in (("ari_fg", True), ("ari", False)):
            ari, ok = segmentation_ari(mask, pred_ids, foreground_only=foreground_only)
            ok = ok & valid
            total = getattr(self, key)
            total[0] += float(ari[ok].sum())
            total[1] += int(ok.sum())
        matched = match_keypoints_to_objects(out["alpha"], mask, visibility=batch.get("visibility"))
        matched[~valid] = -1
        self.num_matched += int((matched >= 0).sum())
        for name in ATTRIBUTES:
            if name not in batch:
                continue
            labels = np.asarray(batch[name]).astype(np.int64)
            counts = base.label_counts(
                matched,
                out["prototype"],
                labels,
                self.num_prototypes,
                int(labels.max()) + 1 if labels.size else 1,
            )
            self.attribute_counts[name] = base.add_counts(self.attribute_counts.get(name), counts)
        flat = out["descriptors"][valid].reshape(-1, out["descriptors"].shape[-1])
        self.keep_for_tsne(flat, None)
        codes = class_labels(batch)
        hit = matched >= 0
        if codes is not None and hit.any():
            entity_codes = np.take_along_axis(codes, np.maximum(matched, 0), axis=1)
            self.keep_for_tsne(out["descriptors"][hit], entity_codes[hit])

    def _result(self, num_keypoints_seen: int) -> dict[str, Any]:
        out = {
            "ari_fg": self.ari_fg[0] / self.ari_fg[1] if self.ari_fg[1] else float("nan"),
            "ari": self.ari[0] / self.ari[1] if self.ari[1] else float("nan"),
            "matched_keypoint_fraction": self.num_matched / num_keypoints_seen,
        }
        for name, counts in self.attribute_counts.items():
            out[f"{name}_accuracy"] = base.majority_accuracy(counts)
        out[purity.PURITY] = purity.prototype_purity(self.attribute_counts)
        return out
