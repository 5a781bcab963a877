"""What every evaluator shares: the `Evaluator` base, array checks and count helpers.

An evaluator streams one split: `add(batch, outputs)` per evaluation batch
(`input_pipeline`) and its `Detector.apply` outputs, rows with `valid` False
ignored; `result()` gives the metrics (fractions in [0, 1]). Metrics that need
the whole split (a prototype's majority label) are summed as integer count
matrices per batch and scored at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.optimize
from absl import logging
from numpy.typing import ArrayLike

from tusk_jax.evaluators import purity


class Evaluator:
    """The task-independent sums: prototype usage, confidence, reconstruction error, t-SNE points.

    Subclasses add their protocol in `_add` and `_result`. `fit_split`: a split
    run first through an evaluator of the same class, passed as `fit` (the
    landmark regressor's training split), or None.

    Args:
      num_prototypes: M.
      image_size: the evaluated image side in pixels.
      tsne_points: descriptors kept for the t-SNE figure (0: none).
    """

    fit_split: str | None = None

    def __init__(self, num_prototypes: int, image_size: int, tsne_points: int = 0):
        self.num_prototypes = num_prototypes
        self.image_size = image_size
        self.tsne_points = tsne_points
        self.num_examples = 0
        self.usage = np.zeros(num_prototypes, np.int64)
        self.confidence_sum = 0.0
        self.num_keypoints_seen = 0
        self.squared_error_sum = 0.0
        # (descriptors [P, C], labels [P] or None) chunks for the t-SNE figure.
        self.tsne_labelled: list[tuple[np.ndarray, np.ndarray]] = []
        self.tsne_unlabelled: list[tuple[np.ndarray, None]] = []

    def keep_for_tsne(self, descriptors: np.ndarray, labels: np.ndarray | None) -> None:
        """Keeps up to `tsne_points` descriptors, labelled ones apart from unlabelled ones."""
        store = self.tsne_labelled if labels is not None else self.tsne_unlabelled
        room = self.tsne_points - sum(d.shape[0] for d, _ in store)
        if room > 0 and descriptors.shape[0]:
            store.append((descriptors[:room], None if labels is None else labels[:room]))

    def add(self, batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            return
        self.num_examples += int(valid.sum())
        prototype = outputs["prototype"]
        self.usage += np.bincount(prototype[valid].ravel(), minlength=self.num_prototypes)
        self.confidence_sum += float(outputs["confidence"][valid].sum())
        self.num_keypoints_seen += int(outputs["confidence"][valid].size)
        error = (outputs["reconstruction"] - batch["image"]) ** 2
        self.squared_error_sum += float(error[valid].mean(axis=(1, 2, 3)).sum())
        self._add(batch, outputs, valid)

    def _add(self, batch, outputs, valid) -> None:
        raise NotImplementedError

    def tsne_data(self, min_labelled: int = 10) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`(descriptors [P, C], labels [P] | None)` for the t-SNE, or `(None, None)`.

        Descriptors with a ground-truth class when at least `min_labelled`
        exist, otherwise all descriptors without labels.
        """
        if sum(d.shape[0] for d, _ in self.tsne_labelled) >= min_labelled:
            return (
                np.concatenate([d for d, _ in self.tsne_labelled]),
                np.concatenate([lab for _, lab in self.tsne_labelled]),
            )
        if self.tsne_unlabelled:
            return np.concatenate([d for d, _ in self.tsne_unlabelled]), None
        return None, None

    def result(self) -> dict[str, Any]:
        """The split's metrics (fractions)."""
        seen = max(self.num_keypoints_seen, 1)
        out: dict[str, Any] = {
            "num_examples": self.num_examples,
            "reconstruction_mse": self.squared_error_sum / max(self.num_examples, 1),
            "mean_confidence": self.confidence_sum / seen,
            "prototypes_in_use": int((self.usage > 0).sum()),
            "prototype_usage": self.usage.tolist(),
            **purity.largest_prototype(self.usage),
        }
        out.update(self._result(seen))
        return out

    def _result(self, num_keypoints_seen: int) -> dict[str, Any]:
        raise NotImplementedError


def add_counts(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """Sums `[M, V]` count matrices whose V may differ (pads with zeros)."""
    if total is None:
        return counts.copy()
    width = max(total.shape[1], counts.shape[1])
    out = np.zeros((total.shape[0], width), np.int64)
    out[:, : total.shape[1]] += total
    out[:, : counts.shape[1]] += counts
    return out


def as_int_array(name: str, value, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {array.dtype}.")
    return array.astype(np.int64)


def as_float_array(
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


def check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Shapes must match, got {shapes}.")


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
    matched_ids = as_int_array("matched_ids", matched_ids, 2)
    prototype_ids = as_int_array("prototype_ids", prototype_ids, 2)
    labels = as_int_array("labels", labels, 2)
    check_same_shape(matched_ids=matched_ids, prototype_ids=prototype_ids)
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
