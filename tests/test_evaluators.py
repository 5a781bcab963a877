"""The evaluators' metric functions against scikit-learn, scipy and hand-made cases."""

import itertools

import numpy as np
import pytest
import sklearn.linear_model
import sklearn.metrics

from tusk_jax.evaluators import (
    base,
    landmark_regression,
    multi_instance,
    object_discovery,
    purity,
)
from tusk_jax.evaluators import landmarks as landmark_protocol

# ----------------------------------------------------------------------------
# ARI.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_true,num_pred", [(2, 2), (5, 3), (1, 4), (7, 7)])
def test_ari_matches_sklearn_on_random_labelings(num_true, num_pred):
    rng = np.random.default_rng(num_true * 10 + num_pred)
    labels_true = rng.integers(0, num_true, size=(20, 50))
    # Half of the rows agree with the truth up to noise, to cover high ARI too.
    labels_pred = rng.integers(0, num_pred, size=(20, 50))
    labels_pred[:10] = np.where(rng.random((10, 50)) < 0.8, labels_true[:10], labels_pred[:10])
    weights = rng.random((20, 50)) < 0.7
    got = object_discovery.adjusted_rand_index(labels_true, labels_pred, weights)
    want = [
        sklearn.metrics.adjusted_rand_score(t[w], p[w])
        for t, p, w in zip(labels_true, labels_pred, weights, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ari_degenerate_labelings_follow_sklearn_and_are_finite():
    n = 12
    one = np.zeros(n, int)
    distinct = np.arange(n)
    split = np.repeat([0, 1, 2], 4)
    cases = [
        (one, one),  # one cluster in both: 1
        (distinct, distinct),  # all distinct in both: 1
        (one, distinct),  # 0
        (distinct, one),  # 0
        (one, split),  # 0
        (split, split[::-1]),  # relabelled: 1
        (split, np.tile([0, 1, 2], 4)),  # discordant: negative
    ]
    got = object_discovery.adjusted_rand_index(
        np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    )
    want = [sklearn.metrics.adjusted_rand_score(t, p) for t, p in cases]
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got[:2], 1.0)
    np.testing.assert_allclose(got[2:5], 0.0, atol=1e-12)
    assert got[6] < 0
    assert np.all(np.isfinite(got))


def test_segmentation_ari_foreground_only_ignores_background():
    gt = np.zeros((1, 6, 6), int)
    gt[0, :3, :3] = 1
    gt[0, 3:, 3:] = 2
    pred = np.where(gt == 2, 1, 0)
    pred[0, 0, 5] = 2  # A background pixel labelled as a third object.
    ari_fg, valid = object_discovery.segmentation_ari(gt, pred)
    assert valid.tolist() == [True]
    np.testing.assert_allclose(ari_fg, 1.0)
    ari_bg, _ = object_discovery.segmentation_ari(gt, pred, foreground_only=False)
    want = sklearn.metrics.adjusted_rand_score(gt.ravel(), pred.ravel())
    np.testing.assert_allclose(ari_bg, [want], atol=1e-12)
    assert ari_bg[0] < 1.0


def test_segmentation_ari_empty_foreground_is_invalid_not_nan():
    gt = np.zeros((3, 4, 4), int)
    gt[1, 0, 0] = 1  # A single foreground pixel: no pair to judge.
    gt[2, :2] = 1
    gt[2, 2:] = 2
    pred = np.zeros_like(gt)
    pred[2, 2:] = 1
    ari, valid = object_discovery.segmentation_ari(gt, pred)
    assert valid.tolist() == [False, False, True]
    assert np.all(np.isfinite(ari))
    np.testing.assert_allclose(ari, 1.0)


def test_object_ids_from_alpha_is_argmax_over_keypoints():
    alpha = np.zeros((1, 3, 2, 2))
    alpha[0, 0, 0, 0] = 1.0
    alpha[0, 2, 0, 1] = 1.0
    alpha[0, 1, 1, :] = 1.0
    np.testing.assert_array_equal(
        object_discovery.object_ids_from_alpha(alpha)[0], [[0, 2], [1, 1]]
    )


def test_ari_rejects_bad_input():
    with pytest.raises(ValueError, match="labels_true"):
        object_discovery.adjusted_rand_index(np.zeros(3, int), np.zeros(3, int))
    with pytest.raises(ValueError, match="non-negative"):
        object_discovery.adjusted_rand_index(-np.ones((1, 3), int), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="integer"):
        object_discovery.segmentation_ari(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), int))


# ----------------------------------------------------------------------------
# Attribute classification and count -> accuracy helpers.
# ----------------------------------------------------------------------------


def _two_object_scene():
    """An 8x8 scene: object 1 in the top-left 4x4, object 2 in the bottom-right 4x4."""
    gt = np.zeros((1, 8, 8), int)
    gt[0, :4, :4] = 1
    gt[0, 4:, 4:] = 2
    return gt


def test_match_keypoints_to_objects_hand_made():
    gt = _two_object_scene()
    alpha = np.zeros((1, 5, 8, 8))
    alpha[0, 0, :4, :4] = 0.9  # Exactly object 1.
    alpha[0, 1, 4:, 4:7] = 0.95  # Inside object 2 (4x3 pixels).
    alpha[0, 1, 4:, 7] = 0.5  # Below the alpha threshold: not in the mask.
    alpha[0, 2, 3:5, 3:5] = 0.9  # 1 px on each object, 2 on background: unmatched.
    alpha[0, 3, 0, 2:6] = 0.9  # 2 px on object 1, 2 on background: not > 50%.
    alpha[0, 4] = 0.8  # Nothing above 0.8: empty mask, unmatched.
    matched = object_discovery.match_keypoints_to_objects(alpha, gt)
    np.testing.assert_array_equal(matched, [[1, 2, -1, -1, -1]])
    # 3 of 4 pixels on object 1 is a match.
    alpha[0, 3, 0, 5] = 0.0
    alpha[0, 3, 0, 1] = 0.9
    assert object_discovery.match_keypoints_to_objects(alpha, gt)[0, 3] == 1
    # An invisible entity is never matched.
    visibility = np.array([[1, 0, 1]])
    np.testing.assert_array_equal(
        object_discovery.match_keypoints_to_objects(alpha, gt, visibility=visibility)[0, :2],
        [-1, 2],
    )


def test_label_counts_and_majority_accuracy_hand_made():
    matched = np.array([[1, 2, -1], [1, 1, 2]])
    prototypes = np.array([[0, 1, 1], [0, 0, 1]])
    shape = np.array([[9, 3, 1], [9, 3, 0]])  # Index 0 is the background entity.
    counts = base.label_counts(matched, prototypes, shape, num_prototypes=2, num_labels=4)
    # Prototype 0 saw shape 3 (image 0, entity 1) and shape 3 twice (image 1).
    # Prototype 1 saw shape 1 (image 0, entity 2) and shape 0 (image 1, entity 2).
    want = np.zeros((2, 4), int)
    want[0, 3] = 3
    want[1, 1] = 1
    want[1, 0] = 1
    np.testing.assert_array_equal(counts, want)
    assert base.majority_accuracy(counts) == pytest.approx(4 / 5)
    np.testing.assert_array_equal(base.majority_mapping(counts), [3, 0])
    # Streaming: counts of two halves sum to the counts of the whole.
    halves = sum(
        base.label_counts(matched[i : i + 1], prototypes[i : i + 1], shape[i : i + 1], 2, 4)
        for i in range(2)
    )
    np.testing.assert_array_equal(halves, counts)


def test_majority_accuracy_empty_is_zero():
    assert base.majority_accuracy(np.zeros((3, 2), int)) == 0.0
    np.testing.assert_array_equal(base.majority_mapping(np.zeros((2, 2), int)), [-1, -1])


def test_hungarian_mapping_is_best_one_to_one_assignment():
    rng = np.random.default_rng(0)
    for m, c in [(4, 4), (3, 5), (5, 3)]:
        counts = rng.integers(0, 20, size=(m, c))
        mapping = base.hungarian_mapping(counts)
        assigned = mapping[mapping >= 0]
        assert len(set(assigned.tolist())) == len(assigned) == min(m, c)
        best = 0
        for rows in itertools.permutations(range(m), min(m, c)):
            for cols in itertools.permutations(range(c), min(m, c)):
                best = max(best, counts[list(rows), list(cols)].sum())
        assert base.mapped_correct(counts, mapping) == best


# ----------------------------------------------------------------------------
# MNIST-Hard.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Per-prototype purity and the largest prototype.
# ----------------------------------------------------------------------------


def test_prototype_purity_hand_made():
    # Two images, entity 0 the background. Keypoint -> (matched entity, prototype):
    # prototype 0 sees shapes 3, 3, 1 and colours 2, 5, 5; prototype 2 sees shape 4,
    # colour 0; prototype 1 matches nothing (its keypoint is unmatched).
    matched = np.array([[1, 2, -1], [1, 2, 3]])
    prototypes = np.array([[0, 0, 1], [0, 2, 2]])
    shape = np.array([[0, 3, 3, 0], [0, 1, 4, 4]])
    color = np.array([[0, 2, 5, 0], [0, 5, 0, 0]])
    counts = {
        "shape": base.label_counts(matched, prototypes, shape, 3, 5),
        "color": base.label_counts(matched, prototypes, color, 3, 6),
    }
    assert purity.prototype_purity(counts) == [
        {
            "prototype": 0,
            "matched": 3,
            "majority": {"shape": 3, "color": 5},
            "purity": {"shape": 2 / 3, "color": 2 / 3},
        },
        {
            "prototype": 2,
            "matched": 2,
            "majority": {"shape": 4, "color": 0},
            "purity": {"shape": 1.0, "color": 1.0},
        },
    ]
    # A tie goes to the lowest label, as base.majority_mapping: purity 1/2.
    tie = purity.prototype_purity({"digit": np.array([[0, 2, 2]])})
    assert tie == [
        {"prototype": 0, "matched": 4, "majority": {"digit": 1}, "purity": {"digit": 0.5}}
    ]
    assert purity.prototype_purity({}) == []
    assert purity.prototype_purity({"shape": np.zeros((3, 2), int)}) == []
    with pytest.raises(ValueError, match="'color' count other keypoints"):
        purity.prototype_purity({"shape": np.array([[1, 1]]), "color": np.array([[1, 0]])})


def test_largest_prototype_share_of_a_catch_all():
    # Prototype 3 is nearest to 12 of 20 keypoints.
    assert purity.largest_prototype([2, 4, 0, 12, 2]) == {
        "largest_prototype": 3,
        "largest_prototype_share": 0.6,
    }
    assert purity.largest_prototype([5, 5])["largest_prototype"] == 0  # Ties: lowest index.
    empty = purity.largest_prototype([0, 0, 0])
    assert empty["largest_prototype"] == -1 and np.isnan(empty["largest_prototype_share"])


def _quadrant_scene():
    """Two 8 x 8 images, K = 4 keypoints each owning one quadrant of alpha (1 inside, 0 out).

    Image 0: entity 1 top-left, entity 2 bottom-right; keypoints 0 and 1 on them,
    2 and 3 on the background. Image 1: entity 1 top-left under keypoint 0, the
    rest background. Matched: 3 of 8 keypoints.
    """
    quadrants = np.zeros((4, 8, 8), np.float32)
    quadrants[0, :4, :4] = quadrants[1, 4:, 4:] = quadrants[2, :4, 4:] = quadrants[3, 4:, :4] = 1
    mask = np.zeros((2, 8, 8), np.int64)
    mask[:, :4, :4] = 1
    mask[0, 4:, 4:] = 2
    batch = {
        "image": np.zeros((2, 8, 8, 3), np.float32),
        "valid": np.array([True, True]),
        "mask": mask,
        "visibility": np.array([[0, 1, 1], [0, 1, 0]]),
        "shape": np.array([[0, 3, 3], [0, 5, 0]]),
        "color": np.array([[0, 1, 4], [0, 4, 0]]),
    }
    outputs = {
        "alpha": np.stack([quadrants, quadrants]),
        # Prototype 2 takes every background keypoint and one more: a catch-all.
        "prototype": np.array([[0, 0, 2, 2], [1, 2, 2, 2]]),
        "confidence": np.ones((2, 4), np.float32),
        "descriptors": np.ones((2, 4, 3), np.float32),
        "reconstruction": np.zeros((2, 8, 8, 3), np.float32),
    }
    return batch, outputs


def test_object_discovery_reports_purity_matched_fraction_and_largest_share():
    batch, outputs = _quadrant_scene()
    evaluator = object_discovery.ObjectDiscoveryEvaluator(num_prototypes=3, image_size=8)
    evaluator.add(batch, outputs)
    found = evaluator.result()
    assert found["matched_keypoint_fraction"] == 3 / 8
    assert found["prototype_usage"] == [2, 1, 5]
    assert (found["largest_prototype"], found["largest_prototype_share"]) == (2, 5 / 8)
    # Prototype 0: image 0's entities (shapes 3, 3; colours 1, 4: a tie, to 1).
    # Prototype 1: image 1's entity (shape 5, colour 4). The catch-all matched nothing.
    assert found["prototype_purity"] == [
        {
            "prototype": 0,
            "matched": 2,
            "majority": {"shape": 3, "color": 1},
            "purity": {"shape": 1.0, "color": 0.5},
        },
        {
            "prototype": 1,
            "matched": 1,
            "majority": {"shape": 5, "color": 4},
            "purity": {"shape": 1.0, "color": 1.0},
        },
    ]
    assert found["shape_accuracy"] == 1.0 and found["color_accuracy"] == 2 / 3
    # An invalid (padding) image adds neither keypoints nor matches.
    padded = dict(batch, valid=np.array([True, False]))
    evaluator = object_discovery.ObjectDiscoveryEvaluator(num_prototypes=3, image_size=8)
    evaluator.add(padded, outputs)
    found = evaluator.result()
    assert found["matched_keypoint_fraction"] == 2 / 4 and found["prototype_usage"] == [2, 0, 2]
    assert [row["prototype"] for row in found["prototype_purity"]] == [0]


def test_summary_lines_quote_share_and_purity():
    batch, outputs = _quadrant_scene()
    evaluator = object_discovery.ObjectDiscoveryEvaluator(num_prototypes=3, image_size=8)
    evaluator.add(batch, outputs)
    found = evaluator.result()
    assert purity.summary_lines(found) == [
        "largest prototype: 2, nearest to 62.5 % of all keypoints (uniform: 33.3 %)",
        "per prototype: majority label (purity) of its matched keypoints",
        "prototype  keypoints  matched  shape        color",
        "0          25.0 %     2        3 (100.0 %)  1 (50.0 %)",
        "1          12.5 %     1        5 (100.0 %)  4 (100.0 %)",
        "2          62.5 %     0        -            -",
    ]
    assert purity.matched_note("shape_accuracy", found) == " (on 37.5 % of keypoints matched)"
    assert purity.matched_note("ari_fg", found) == ""
    assert purity.matched_note("shape_accuracy", {}) == ""  # No matched fraction: no note.
    assert purity.summary_lines({"prototype_usage": [0, 0]})[0].startswith(
        "largest prototype: none"
    )


def test_mnist_hard_purity_per_prototype_over_matched_detections():
    # Three canvases; prototype 3 detects digits 3, 3 and 5, prototype 7 detects a 7;
    # the third canvas's keypoint is 30 px off its digit: unmatched, not counted.
    batch = {
        "image": np.zeros((3, 80, 80, 3), np.float32),
        "valid": np.array([True, True, True]),
        "centers": np.array(
            [[[10.0, 10.0], [50.0, 50.0]], [[20.0, 20.0], [60.0, 20.0]]]
            + [[[10.0, 10.0], [40.0, 40.0]]]
        ),
        "labels": np.array([[3, 7], [3, 5], [1, -1]]),
    }
    outputs = {
        "keypoints": np.array(
            [
                [[10.0, 11.0], [50.0, 50.0]],
                [[20.0, 20.0], [61.0, 20.0]],
                [[40.0, 10.0], [70.0, 70.0]],
            ]
        ),
        "prototype": np.array([[3, 7], [3, 3], [3, 3]]),
        "confidence": np.ones((3, 2)),
        "descriptors": np.ones((3, 2, 4)) / 2.0,
        "reconstruction": np.zeros((3, 80, 80, 3), np.float32),
    }
    evaluator = multi_instance.MultiInstanceEvaluator(10, 80)
    evaluator.add(batch, outputs)
    found = evaluator.result()
    assert found["localization"] == 4 / 5
    assert found["prototype_purity"] == [
        {"prototype": 3, "matched": 3, "majority": {"digit": 3}, "purity": {"digit": 2 / 3}},
        {"prototype": 7, "matched": 1, "majority": {"digit": 7}, "purity": {"digit": 1.0}},
    ]
    assert (found["largest_prototype"], found["largest_prototype_share"]) == (3, 5 / 6)


def test_box_iou_matches_explicit_boxes():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 40, size=(5, 2))
    b = rng.uniform(0, 40, size=(4, 2))
    got = multi_instance.box_iou(a, b, box_size=20.0)
    for i, j in itertools.product(range(5), range(4)):
        lo = np.maximum(a[i], b[j]) - 10
        hi = np.minimum(a[i], b[j]) + 10
        inter = np.prod(np.clip(hi - lo, 0, None))
        assert got[i, j] == pytest.approx(inter / (800 - inter))
    np.testing.assert_allclose(
        multi_instance.box_iou([[0.0, 0.0]], [[0.0, 0.0], [10.0, 0.0], [20, 0]]),
        [[1.0, 1 / 3, 0.0]],
    )


def test_match_detections_greedy_in_ground_truth_order():
    centers = np.array([[[10.0, 10.0], [12.0, 10.0], [50.0, 50.0], [0.0, 0.0]]])
    keypoints = np.array([[[11.5, 10.0], [15.0, 10.0], [80.0, 80.0]]])
    gt_valid = np.array([[True, True, True, False]])
    # gt 0 takes keypoint 0 (dx 1.5); gt 1 would prefer keypoint 0 (dx 0.5) but it is
    # used, so it takes keypoint 1 (dx 3, IoU 17/23 > 0.5); gt 2 has no detection.
    det, iou = multi_instance.match_detections(keypoints, centers, gt_valid)
    np.testing.assert_array_equal(det, [[0, 1, -1, -1]])
    np.testing.assert_allclose(iou[0, :2], [18.5 / 21.5, 17 / 23])
    # A detection whose IoU is exactly at the threshold is not a match and is not used up:
    # 3x3 boxes 1 px apart overlap by 6 px^2 of a 12 px^2 union, IoU 0.5.
    det, iou = multi_instance.match_detections(
        [[[1.0, 0.0]]], [[[0.0, 0.0], [1.0, 0.0]]], box_size=3.0
    )
    assert multi_instance.box_iou([[0.0, 0.0]], [[1.0, 0.0]], box_size=3.0)[0, 0] == 0.5
    np.testing.assert_array_equal(det, [[-1, 0]])
    np.testing.assert_allclose(iou, [[0.0, 1.0]])


def test_mnist_hard_scores_perfect_and_hand_made():
    rng = np.random.default_rng(2)
    b, o = 6, 9
    grid = np.stack(np.meshgrid([10.0, 35.0, 60.0], [10.0, 35.0, 60.0]), -1).reshape(o, 2)
    centers = grid + rng.uniform(-3, 3, size=(b, o, 2))  # Digits at least 19 px apart.
    labels = rng.integers(0, 10, size=(b, o))
    permutation = rng.permutation(10)  # Prototype p stands for class permutation[p].
    inverse = np.argsort(permutation)
    order = np.stack([rng.permutation(o) for _ in range(b)])  # Keypoints in any order.
    keypoints = np.take_along_axis(centers, order[..., None], axis=1) + 0.5
    protos = inverse[np.take_along_axis(labels, order, axis=1)]
    stats = multi_instance.mnist_hard_counts(keypoints, protos, centers, labels, num_prototypes=10)
    assert stats["num_gt"] == b * o
    scores = multi_instance.mnist_hard_scores(**stats)
    for value in scores.values():
        assert value == pytest.approx(1.0)

    # Majority and Hungarian differ when two prototypes prefer the same class.
    counts = np.array([[5, 1], [4, 2]])
    scores = multi_instance.mnist_hard_scores(counts, num_gt=16, num_matched=12)
    assert scores["localization"] == pytest.approx(12 / 16)
    assert scores["classification_majority"] == pytest.approx(9 / 12)
    assert scores["both_majority"] == pytest.approx(9 / 16)
    assert scores["classification_hungarian"] == pytest.approx(7 / 12)
    assert scores["both_hungarian"] == pytest.approx(7 / 16)


def test_mnist_hard_counts_ignores_padding_and_unmatched():
    centers = np.array([[[10.0, 10.0], [40.0, 40.0], [70.0, 10.0]]])
    labels = np.array([[3, 7, -1]])
    keypoints = np.array([[[10.0, 11.0], [60.0, 60.0]]])
    protos = np.array([[1, 0]])
    stats = multi_instance.mnist_hard_counts(keypoints, protos, centers, labels, num_prototypes=2)
    assert stats["num_gt"] == 2 and stats["num_matched"] == 1
    want = np.zeros((2, 10), int)
    want[1, 3] = 1
    np.testing.assert_array_equal(stats["counts"], want)


# ----------------------------------------------------------------------------
# Landmark regression.
# ----------------------------------------------------------------------------


def test_landmark_features_groups_by_prototype_and_sorts_by_x():
    keypoints = np.array([[[5.0, 1.0], [1.0, 2.0], [3.0, 3.0], [9.0, 4.0]]])
    protos = np.array([[2, 0, 2, 2]])
    features, filled = landmark_regression.landmark_features(keypoints, protos, num_prototypes=3)
    assert features.shape == (1, 3, 4, 2)
    want = np.zeros((3, 4, 2))
    want[0, 0] = [1, 2]
    want[2, 0] = [3, 3]
    want[2, 1] = [5, 1]
    want[2, 2] = [9, 4]
    np.testing.assert_array_equal(features[0], want)
    want_filled = np.zeros((3, 4), bool)
    want_filled[0, 0] = want_filled[2, :3] = True
    np.testing.assert_array_equal(filled[0], want_filled)


def test_fit_linear_regressor_recovers_weights_and_matches_sklearn():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6))
    w = rng.normal(size=(6, 4))
    np.testing.assert_allclose(landmark_regression.fit_linear_regressor(x, x @ w), w, atol=1e-9)
    y = x @ w + 0.1 * rng.normal(size=(200, 4))
    ols = sklearn.linear_model.LinearRegression(fit_intercept=False).fit(x, y)
    np.testing.assert_allclose(
        landmark_regression.fit_linear_regressor(x, y), ols.coef_.T, atol=1e-9
    )
    ridge = sklearn.linear_model.Ridge(alpha=5.0, fit_intercept=False).fit(x, y)
    np.testing.assert_allclose(
        landmark_regression.fit_linear_regressor(x, y, ridge=5.0), ridge.coef_.T, atol=1e-9
    )
    # Never-filled (all-zero) input columns get zero weight, not NaN.
    x[:, 2] = 0.0
    weights = landmark_regression.fit_linear_regressor(x, y)
    assert np.all(np.isfinite(weights))
    np.testing.assert_allclose(weights[2], 0.0, atol=1e-9)


def test_inter_ocular_distance_and_normalized_error():
    landmarks = np.array([[[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    np.testing.assert_allclose(landmark_regression.inter_ocular_distance(landmarks), [5.0])
    prediction = landmarks + np.array([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(
        landmark_regression.normalized_point_error(prediction, landmarks, 5.0), [0.2]
    )
    valid = np.array([[True, True, False]])
    np.testing.assert_allclose(
        landmark_regression.normalized_point_error(prediction, landmarks, [2.0], valid), [0.75]
    )


def test_swap_left_right():
    landmarks = np.arange(2 * 4 * 2, dtype=float).reshape(2, 4, 2)
    got = landmark_regression.swap_left_right(landmarks, [False, True], pairs=[(0, 3)])
    np.testing.assert_array_equal(got[0], landmarks[0])
    np.testing.assert_array_equal(got[1], landmarks[1, [3, 1, 2, 0]])
    pairs = np.array(landmark_regression.H36M_32_LEFT_RIGHT_PAIRS)
    assert len(np.unique(pairs)) == pairs.size == 26 and pairs.max() < 32
    # Centre joints (hip, spine, thorax, neck, head) stay.
    assert not {0, 11, 12, 13, 14, 15} & set(pairs.ravel().tolist())
    h36m = np.random.default_rng(4).normal(size=(3, 32, 2))
    twice = landmark_regression.swap_left_right(
        landmark_regression.swap_left_right(h36m, [True] * 3), [True] * 3
    )
    np.testing.assert_array_equal(twice, h36m)


def test_ced_curve():
    errors = np.array([0.3, 0.1, 0.2])
    np.testing.assert_allclose(
        landmark_regression.ced_curve(errors, [0.0, 0.1, 0.25, 1.0]), [0.0, 1 / 3, 2 / 3, 1.0]
    )


def test_nmi_from_streamed_counts_matches_sklearn():
    rng = np.random.default_rng(5)
    keypoints = rng.uniform(0, 50, size=(30, 4, 2))
    landmarks = rng.uniform(0, 50, size=(30, 5, 2))
    protos = rng.integers(0, 6, size=(30, 4))
    counts = sum(
        landmark_regression.landmark_prototype_counts(
            keypoints[i : i + 10], protos[i : i + 10], landmarks[i : i + 10], 6
        )
        for i in range(0, 30, 10)
    )
    nearest = np.argmin(
        np.linalg.norm(keypoints[:, :, None] - landmarks[:, None], axis=-1), axis=-1
    )
    want = sklearn.metrics.normalized_mutual_info_score(nearest.ravel(), protos.ravel())
    assert landmark_regression.nmi_from_counts(counts) == pytest.approx(want, abs=1e-12)


def _synthetic_landmark_split(rng, n, k, t, mixing, back_facing=None, pairs=None):
    """Keypoints with a fixed prototype each; landmarks a linear function of them."""
    keypoints = rng.uniform(10, 70, size=(n, k, 2))
    landmarks = np.einsum("tk,nkc->ntc", mixing, keypoints)
    protos = np.broadcast_to(np.arange(k), (n, k))
    if back_facing is not None:
        # The detector sees appearance: on a back-facing person the labels are swapped.
        landmarks = landmark_regression.swap_left_right(landmarks, back_facing, pairs)
    return keypoints, protos, landmarks


def test_evaluate_landmark_regression_exact_and_noisy():
    rng = np.random.default_rng(6)
    k, t, m = 4, 5, 6
    mixing = rng.normal(size=(t, k))
    train = _synthetic_landmark_split(rng, 300, k, t, mixing)
    test = _synthetic_landmark_split(rng, 100, k, t, mixing)
    result = landmark_protocol.evaluate_landmark_regression(*train, *test, num_prototypes=m)
    assert result.forward_error < 1e-8
    assert result.backward_error < 1e-8  # 2K <= 2T: keypoints are linear in landmarks.
    np.testing.assert_allclose(result.ced_forward[1:], 1.0)
    assert result.forward_weights.shape == (m * k * 2, t * 2)
    assert result.forward_per_landmark.shape == (t,)
    assert 0.0 <= result.nmi <= 1.0

    noisy_test = (test[0] + rng.normal(scale=2.0, size=test[0].shape), test[1], test[2])
    noisy = landmark_protocol.evaluate_landmark_regression(
        *train, *noisy_test, num_prototypes=m, normalizer=80.0, chunk_size=7
    )
    assert noisy.forward_error > 0.005
    np.testing.assert_allclose(noisy.forward_error, noisy.forward_per_image.mean())
    assert np.all(np.diff(noisy.ced_forward) >= 0) and np.all(np.diff(noisy.ced_backward) >= 0)


def test_evaluate_landmark_regression_swaps_back_facing_people():
    rng = np.random.default_rng(7)
    k = t = 6
    mixing = np.eye(t)
    back_train = rng.random(200) < 0.5
    back_test = rng.random(50) < 0.5
    pairs = ((0, 3), (1, 4))
    # Ground truth as annotated (anatomical): keypoints of back-facing people sit on the
    # mirrored joints, so the labels must be swapped to regress them.
    kp_tr, pr_tr, lm_tr = _synthetic_landmark_split(rng, 200, k, t, mixing, back_train, pairs)
    kp_te, pr_te, lm_te = _synthetic_landmark_split(rng, 50, k, t, mixing, back_test, pairs)
    args = (kp_tr, pr_tr, lm_tr, kp_te, pr_te, lm_te)
    swapped = landmark_protocol.evaluate_landmark_regression(
        *args,
        num_prototypes=k,
        normalizer=80.0,
        train_back_facing=back_train,
        test_back_facing=back_test,
        left_right_pairs=pairs,
    )
    plain = landmark_protocol.evaluate_landmark_regression(*args, num_prototypes=k, normalizer=80.0)
    assert swapped.forward_error < 1e-8
    assert plain.forward_error > 0.01
    with pytest.raises(ValueError, match="left_right_pairs"):
        landmark_protocol.evaluate_landmark_regression(
            *args, num_prototypes=k, train_back_facing=back_train
        )
    with pytest.raises(ValueError, match="normalizer"):
        landmark_protocol.evaluate_landmark_regression(*args, num_prototypes=k, normalizer="iod")
