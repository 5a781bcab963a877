"""Landmark regression (CelebA/MAFL, H36M; SPEC 6): forward and backward error, NMI, CED.

Keypoints and landmarks are (x, y) pixels; errors are fractions of the
inter-ocular distance (CelebA) or of the image size (H36M).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from tusk_jax.evaluators import base, landmark_regression


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
    ced_thresholds: ArrayLike = landmark_regression.DEFAULT_CED_THRESHOLDS,
    chunk_size: int = 4096,
) -> LandmarkRegressionResult:
    """The landmark regression protocol (SPEC section 6, seeds 003 and 004).

    Inputs are `landmark_features` (D = M*K*2); H36M swaps left/right labels
    of back-facing images first. Forward: W_f (no bias, closed form) from
    features to landmarks, error = mean over the T landmarks of distance /
    normaliser. Backward (seed 003): W_b from landmarks to features, error =
    mean over the image's filled keypoint slots. Also CED curves of both and
    the NMI of prototype ids vs nearest landmark ids.

    Args:
      train_keypoints, test_keypoints: `[N, K, 2]` (x, y) pixels.
      train_prototype_ids, test_prototype_ids: `[N, K]` int in [0, M).
      train_landmarks, test_landmarks: `[N, T, 2]` (x, y) pixels.
      num_prototypes: M.
      normalizer: "inter_ocular" (between the `eye_indices` landmarks of each
        test image; CelebA) or a positive number of pixels (H36M: image size).
      train_back_facing, test_back_facing: optional `[N]` bool (H36M).
      left_right_pairs: pairs to swap (None: the H36M skeleton's, T = 32).
      ridge: L2 weight of both fits (0: least squares).
      ced_thresholds, chunk_size: `[G]` CED thresholds; images per feature chunk.
    """
    train_landmarks = base.as_float_array("train_landmarks", train_landmarks, 3, 2)
    test_landmarks = base.as_float_array("test_landmarks", test_landmarks, 3, 2)
    t = train_landmarks.shape[1]
    if test_landmarks.shape[1] != t:
        raise ValueError(
            f"train_landmarks and test_landmarks differ in T: {t} vs {test_landmarks.shape[1]}."
        )
    train_landmarks, test_landmarks = _swap_back_facing(
        train_landmarks, test_landmarks, train_back_facing, test_back_facing, left_right_pairs
    )
    norm = _normalizers(normalizer, test_landmarks, eye_indices)
    w_forward, w_backward = _fit_both_directions(
        train_keypoints, train_prototype_ids, train_landmarks, num_prototypes, ridge, chunk_size
    )
    forward, per_landmark, backward = _test_errors(
        test_keypoints,
        test_prototype_ids,
        test_landmarks,
        norm,
        num_prototypes,
        w_forward,
        w_backward,
        chunk_size,
    )
    nmi_counts = landmark_regression.landmark_prototype_counts(
        test_keypoints, test_prototype_ids, test_landmarks, num_prototypes
    )
    return LandmarkRegressionResult(
        forward_error=float(forward.mean()),
        backward_error=float(backward.mean()),
        nmi=landmark_regression.nmi_from_counts(nmi_counts),
        forward_per_image=forward,
        forward_per_landmark=per_landmark,
        backward_per_image=backward,
        ced_thresholds=np.asarray(ced_thresholds, dtype=np.float64),
        ced_forward=landmark_regression.ced_curve(forward, ced_thresholds),
        ced_backward=landmark_regression.ced_curve(backward, ced_thresholds),
        forward_weights=w_forward,
        backward_weights=w_backward,
    )


def _swap_back_facing(
    train_landmarks, test_landmarks, train_back_facing, test_back_facing, left_right_pairs
):
    """H36M: left and right labels exchanged on back-facing images (train and test)."""
    t = train_landmarks.shape[1]
    if train_back_facing is not None or test_back_facing is not None:
        if left_right_pairs is None:
            if t != 32:
                raise ValueError(
                    f"left_right_pairs must be given for T={t} landmarks (the default "
                    "H36M_32_LEFT_RIGHT_PAIRS needs T=32)."
                )
            left_right_pairs = landmark_regression.H36M_32_LEFT_RIGHT_PAIRS
        if train_back_facing is not None:
            train_landmarks = landmark_regression.swap_left_right(
                train_landmarks, train_back_facing, left_right_pairs
            )
        if test_back_facing is not None:
            test_landmarks = landmark_regression.swap_left_right(
                test_landmarks, test_back_facing, left_right_pairs
            )
    return train_landmarks, test_landmarks


def _normalizers(
    normalizer: str | float, landmarks: np.ndarray, eye_indices: tuple[int, int]
) -> np.ndarray:
    """`[N]` error normaliser of each image: its inter-ocular distance or a constant."""
    if normalizer == "inter_ocular":
        norm = landmark_regression.inter_ocular_distance(landmarks, eye_indices)
        if np.any(norm <= 0):
            raise ValueError("test_landmarks: an image has coincident eye landmarks.")
        return norm
    if isinstance(normalizer, str):
        raise ValueError(f"normalizer must be 'inter_ocular' or a number, got {normalizer!r}.")
    return np.full(landmarks.shape[0], float(normalizer))


def _flat_features(keypoints, prototype_ids, start, stop, num_prototypes):
    f, filled = landmark_regression.landmark_features(
        np.asarray(keypoints)[start:stop], np.asarray(prototype_ids)[start:stop], num_prototypes
    )
    return f.reshape(f.shape[0], -1), filled


def _fit_both_directions(keypoints, prototype_ids, landmarks, num_prototypes, ridge, chunk_size):
    """(W_forward, W_backward) from moments streamed over chunks of the training images."""
    n_train = landmarks.shape[0]
    if np.shape(keypoints)[0] != n_train or np.shape(prototype_ids)[0] != n_train:
        raise ValueError("train_keypoints, train_prototype_ids, train_landmarks differ in N.")
    gram_f = cross_f = gram_b = cross_b = 0.0
    for start in range(0, n_train, chunk_size):
        x, _ = _flat_features(keypoints, prototype_ids, start, start + chunk_size, num_prototypes)
        y = landmarks[start : start + chunk_size].reshape(x.shape[0], -1)
        g, c = landmark_regression.regression_moments(x, y)
        gram_f, cross_f = gram_f + g, cross_f + c
        g, c = landmark_regression.regression_moments(y, x)
        gram_b, cross_b = gram_b + g, cross_b + c
    return landmark_regression.solve_regression(
        gram_f, cross_f, ridge
    ), landmark_regression.solve_regression(gram_b, cross_b, ridge)


def _test_errors(
    keypoints, prototype_ids, landmarks, norm, num_prototypes, w_forward, w_backward, chunk_size
):
    """(forward `[N]`, forward per landmark `[T]`, backward `[N]`) errors of the test images."""
    n_test = landmarks.shape[0]
    if np.shape(keypoints)[0] != n_test or np.shape(prototype_ids)[0] != n_test:
        raise ValueError("test_keypoints, test_prototype_ids, test_landmarks differ in N.")
    forward, per_landmark, backward = [], [], []
    for start in range(0, n_test, chunk_size):
        stop = start + chunk_size
        x, filled = _flat_features(keypoints, prototype_ids, start, stop, num_prototypes)
        y = landmarks[start:stop]
        nrm = norm[start:stop]
        pred = (x @ w_forward).reshape(y.shape)
        per_landmark.append(np.linalg.norm(pred - y, axis=-1) / nrm[:, None])
        forward.append(per_landmark[-1].mean(axis=1))
        pred_x = (y.reshape(y.shape[0], -1) @ w_backward).reshape(x.shape[0], -1, 2)
        backward.append(
            landmark_regression.normalized_point_error(
                pred_x, x.reshape(x.shape[0], -1, 2), nrm, filled.reshape(x.shape[0], -1)
            )
        )
    return (
        np.concatenate(forward),
        np.concatenate(per_landmark).mean(axis=0),
        np.concatenate(backward),
    )


class LandmarkEvaluator(base.Evaluator):
    """Collects keypoints and landmarks; `result()` runs the regression when given `fit`.

    Args:
      normalizer: "inter_ocular" (CelebA) or "image_size" (errors / the image side).
      fit: the evaluator of the `regressor_train` split (None on that split itself).
      regressor: the authors' regressor `[2 K M, 2 T]` (`convert_release`), used
        instead of a fit on `fit` (then `fit` is not needed).
    """

    fit_split = "regressor_train"

    def __init__(
        self,
        num_prototypes: int,
        image_size: int,
        tsne_points: int = 0,
        normalizer: str = "image_size",
        fit: LandmarkEvaluator | None = None,
        regressor: np.ndarray | None = None,
    ):
        super().__init__(num_prototypes, image_size, tsne_points)
        self.normalizer = normalizer
        self.fit = fit
        self.regressor = regressor
        self.parts: dict[str, list[np.ndarray]] = {}

    def _add(self, batch, out, valid) -> None:
        for name, value in (
            ("keypoints", out["keypoints"]),
            ("prototype", out["prototype"]),
            ("landmarks", batch["landmarks"]),
            ("back_facing", batch.get("back_facing")),
        ):
            if value is not None:
                self.parts.setdefault(name, []).append(np.asarray(value)[valid])
        nearest = landmark_regression.nearest_landmark_ids(
            out["keypoints"][valid], batch["landmarks"][valid]
        )
        self.keep_for_tsne(
            out["descriptors"][valid].reshape(-1, out["descriptors"].shape[-1]),
            nearest.reshape(-1),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """`keypoints` `[N, K, 2]`, `prototype` `[N, K]`, `landmarks` `[N, T, 2]`, `back_facing`."""
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}

    def _result(self, num_keypoints_seen: int) -> dict[str, Any]:
        normalizer = self.normalizer
        if normalizer == "image_size":
            normalizer = float(self.image_size)
        if self.regressor is not None:
            return release_regression_results(
                self.arrays(), self.regressor, self.num_prototypes, self.image_size, normalizer
            )
        if self.fit is None:
            return {}
        return regression_results(self.fit.arrays(), self.arrays(), self.num_prototypes, normalizer)


def regression_results(
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    num_prototypes: int,
    normalizer: str | float,
) -> dict[str, Any]:
    """The protocol's reported numbers from two `LandmarkEvaluator.arrays()` (train, test)."""
    regression = evaluate_landmark_regression(
        train["keypoints"],
        train["prototype"],
        train["landmarks"],
        test["keypoints"],
        test["prototype"],
        test["landmarks"],
        num_prototypes=num_prototypes,
        normalizer=normalizer,
        train_back_facing=train.get("back_facing"),
        test_back_facing=test.get("back_facing"),
    )
    return {
        "forward_error": regression.forward_error,
        "backward_error": regression.backward_error,
        "nmi": regression.nmi,
        "forward_error_per_landmark": regression.forward_per_landmark,
        "ced_thresholds": regression.ced_thresholds,
        "ced_forward": regression.ced_forward,
        "ced_backward": regression.ced_backward,
        "regressor": "fit",
    }


def release_regression_results(
    test: dict[str, np.ndarray],
    weights: np.ndarray,
    num_prototypes: int,
    image_size: int,
    normalizer: str | float,
    eye_indices: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """The forward error with the authors' fitted regressor (their protocol, no fit here).

    Args:
      test: `LandmarkEvaluator.arrays()` of the test split.
      weights: `[2 K M, 2 T]` from `convert_release.read_release_regressor`: it
        maps `release_landmark_features` (image fractions) to landmarks in
        image fractions.
      num_prototypes: M.
      image_size: the square image side in pixels.
      normalizer: "inter_ocular" or a number of pixels.

    Returns:
      dict with `forward_error`, `forward_error_per_landmark`, `nmi`,
      `ced_thresholds`, `ced_forward` and `regressor` = "release" (the release
      has no backward regressor, so no backward error).
    """
    landmarks = test["landmarks"]
    n, t, _ = landmarks.shape
    if weights.shape[1] != 2 * t:
        raise ValueError(
            f"the release regressor predicts {weights.shape[1] // 2} landmarks; the dataset "
            f"has {t}."
        )
    if test.get("back_facing") is not None:
        landmarks = landmark_regression.swap_left_right(landmarks, test["back_facing"])
    features = landmark_regression.release_landmark_features(
        test["keypoints"], test["prototype"], num_prototypes, image_size, image_size
    )
    if features.shape[1] != weights.shape[0]:
        raise ValueError(
            f"the release regressor takes {weights.shape[0]} inputs (2 K M); this evaluation "
            f"gives {features.shape[1]}: evaluate with the trained K (omit --num_keypoints)."
        )
    predicted = (features @ weights).reshape(n, t, 2) * float(image_size)
    norm = _normalizers(normalizer, landmarks, eye_indices)
    per_landmark = np.linalg.norm(predicted - landmarks, axis=-1) / norm[:, None]
    forward = per_landmark.mean(axis=1)
    counts = landmark_regression.landmark_prototype_counts(
        test["keypoints"], test["prototype"], landmarks, num_prototypes
    )
    thresholds = landmark_regression.DEFAULT_CED_THRESHOLDS
    return {
        "forward_error": float(forward.mean()),
        "nmi": landmark_regression.nmi_from_counts(counts),
        "forward_error_per_landmark": per_landmark.mean(axis=0),
        "ced_thresholds": thresholds,
        "ced_forward": landmark_regression.ced_curve(forward, thresholds),
        "regressor": "release",
    }
