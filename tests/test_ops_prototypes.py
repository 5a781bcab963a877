"""Meaning of the prototype ops: k-means loss, counts, mixture, sliced Wasserstein."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tusk_jax import ops


def unit(x):
    return np.asarray(x, np.float32) / np.linalg.norm(x, axis=-1, keepdims=True)


def test_sliced_wasserstein_zero_for_identical_and_permutation_invariant():
    key_x, key_y, key_d, key_p = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(key_x, (32, 8))
    y = jax.random.normal(key_y, (32, 8))
    directions = ops.random_directions(key_d, 8, 50)
    assert float(ops.sliced_wasserstein(x, x, directions)) == 0.0
    permuted = jax.random.permutation(key_p, x)
    assert float(ops.sliced_wasserstein(x, permuted, directions)) == 0.0
    distance = float(ops.sliced_wasserstein(x, y, directions))
    assert distance > 0.1
    assert float(ops.sliced_wasserstein(permuted, y[::-1], directions)) == pytest.approx(distance)


def test_sliced_wasserstein_known_value_for_a_shift():
    # Shifting a set by s along the only direction costs s^2.
    x = jnp.arange(5.0)[:, None]
    assert float(ops.sliced_wasserstein(x, x + 2.0, jnp.ones((1, 1)))) == pytest.approx(4.0)


def test_random_directions_unit_norm():
    d = ops.random_directions(jax.random.PRNGKey(0), 6, 100)
    np.testing.assert_allclose(jnp.linalg.norm(d, axis=0), 1.0, rtol=1e-5)


def test_prototype_counts_sum_and_favour_owner():
    prototypes = jnp.asarray(np.eye(4, 8, dtype=np.float32))
    noise = 0.01 * np.random.default_rng(0).normal(size=(30, 8))
    descriptors = jnp.asarray(unit(np.eye(4, 8)[np.zeros(30, int)] + noise))  # all near proto 0
    counts = np.asarray(ops.prototype_counts(descriptors, prototypes))
    assert counts.dtype == np.int32 and counts.sum() == 30 and np.all(counts >= 0)
    assert counts[0] == counts.max() and counts[0] > 30 / 4
    # Hand value: r = (30, 0, 0, 0), s = (~0, 1, 1, 1), a = var(s) ~ 3/16.
    a = np.var([0.0, 1.0, 1.0, 1.0])
    weight = np.array([30.0, 0, 0, 0]) + 30 * (0.01 + a)
    expected = np.floor(weight / weight.sum() * 30).astype(int)
    expected[-1] += 30 - expected.sum()
    np.testing.assert_array_equal(counts, expected)


def test_largest_remainder_counts_spread_what_last_gives_the_last_prototype():
    # A CPU-sized batch: N = 48 descriptors on 8 of M = 32 prototypes (6 each).
    prototypes = jnp.asarray(np.eye(32, dtype=np.float32))
    descriptors = jnp.asarray(np.eye(32, dtype=np.float32)[np.repeat(np.arange(8), 6)])
    spread = np.array([0.0] * 8 + [1.0] * 24)  # s_m: 0 on the used, 1 on the unused.
    weight = np.array([6.0] * 8 + [0.0] * 24) + 48 * (0.01 + np.var(spread))
    exact = weight / weight.sum() * 48
    last = np.asarray(ops.prototype_counts(descriptors, prototypes, "last"))
    spread_out = np.asarray(ops.prototype_counts(descriptors, prototypes, "largest_remainder"))
    for counts in (last, spread_out):
        assert counts.dtype == np.int32 and counts.sum() == 48 and np.all(counts >= 0)
    remainder = 48 - int(np.floor(exact).sum())
    assert remainder == 8  # exact: 2.11 on the used, 1.30 on the unused.
    np.testing.assert_array_equal(last[:-1], np.floor(exact[:-1]))
    assert last[-1] == np.floor(exact[-1]) + remainder  # The reference: 9 samples for 1.3.
    assert np.all((spread_out == np.floor(exact)) | (spread_out == np.ceil(exact)))
    # The unused prototypes have the larger fractional part (0.30 against 0.11):
    # the 8 extra samples go to the first 8 of them (equal fractions: lowest index).
    assert list(np.flatnonzero(spread_out > np.floor(exact))) == list(range(8, 16))
    expected = np.floor(exact).astype(int)
    by_fraction = np.argsort(-(exact - np.floor(exact)), kind="stable")
    expected[by_fraction[:remainder]] += 1
    np.testing.assert_array_equal(spread_out, expected)
    with pytest.raises(ValueError, match="rounding"):
        ops.prototype_counts(descriptors, prototypes, "nearest")


def test_spread_is_the_channel_mean_as_in_the_reference():
    # M = 8 prototypes e_0..e_7 in C = 8; N = 8 unit descriptors, all nearest
    # to e_0: 0.6 on channel 0, 0.8 / sqrt(7) on each other channel, so
    # |D - e_0|^2 = 2 - 2 * 0.6 = 0.8 (to any other e_j: 2 - 2 * 0.302 = 1.40).
    prototypes = jnp.asarray(np.eye(8, dtype=np.float32))
    row = np.full(8, 0.8 / np.sqrt(7.0))
    row[0] = 0.6
    descriptors = jnp.asarray(np.tile(row, (8, 1)).astype(np.float32))
    # The reference: s_0 = 0.8 / C = 0.1, s_1..7 = 1 (unused); var(s) =
    # (0.7875^2 + 7 * 0.1125^2) / 8 = 0.0885938; each weight gets
    # N (0.01 + var) = 0.78875: (8.78875, 0.78875 x 7) / 14.31 x 8 =
    # (4.913, 0.441 x 7) -> floors (4, 0 x 7), the remainder 4 to the last.
    np.testing.assert_array_equal(
        ops.prototype_counts(descriptors, prototypes), [4, 0, 0, 0, 0, 0, 0, 4]
    )
    # Summed over the channels: s_0 = 0.8, var(s) = 0.004375, each weight
    # gets 0.115: (8.115, 0.115 x 7) / 8.92 x 8 = (7.278, 0.103 x 7) -> (7, 0 x 6, 1).
    np.testing.assert_array_equal(
        ops.prototype_counts(descriptors, prototypes, spread="channel_sum"),
        [7, 0, 0, 0, 0, 0, 0, 1],
    )
    with pytest.raises(ValueError, match="spread"):
        ops.prototype_counts(descriptors, prototypes, spread="channel_max")


def test_prototype_counts_balanced_when_descriptors_are_balanced():
    prototypes = jnp.asarray(np.eye(3, 3, dtype=np.float32))
    descriptors = jnp.asarray(np.eye(3, 3, dtype=np.float32)[np.repeat(np.arange(3), 4)])
    np.testing.assert_array_equal(ops.prototype_counts(descriptors, prototypes), [4, 4, 4])


def test_mixture_sample_shape_and_location():
    prototypes = jnp.asarray(np.eye(3, 5, dtype=np.float32) * 3.0)  # normalised inside
    counts = jnp.array([2, 0, 5], jnp.int32)
    sample = np.asarray(ops.sample_prototype_mixture(jax.random.PRNGKey(0), prototypes, counts, 7))
    assert sample.shape == (7, 5)
    np.testing.assert_allclose(np.linalg.norm(sample, axis=1), 1.0, rtol=1e-5)
    nearest = np.argmax(sample @ np.eye(3, 5).T, axis=1)
    np.testing.assert_array_equal(nearest, [0, 0, 2, 2, 2, 2, 2])
    assert np.all(np.max(sample @ np.eye(3, 5).T, axis=1) > 0.99)  # noise std 0.02


def test_kmeans_loss_near_zero_on_prototypes_and_larger_between():
    prototypes = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    on = prototypes[jnp.array([0, 1, 2, 3, 0, 2])]
    assert float(ops.kmeans_loss(on, prototypes)) < 1e-6
    between = jnp.asarray(unit([[1.0, 1.0], [-1.0, 1.0]]))
    assert float(ops.kmeans_loss(between, prototypes)) > 0.5


def test_sliced_wasserstein_loss_gradients_and_decrease():
    descriptors = jnp.asarray(unit(np.random.default_rng(1).normal(size=(40, 6))))
    prototypes = jax.random.normal(jax.random.PRNGKey(2), (5, 6))
    loss_and_grad = jax.jit(jax.value_and_grad(ops.sliced_wasserstein_loss, argnums=2))
    key = jax.random.PRNGKey(3)
    loss0, grad = loss_and_grad(key, descriptors, prototypes)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    for _ in range(50):  # plain gradient descent on the prototypes lowers the loss
        _, grad = loss_and_grad(key, descriptors, prototypes)
        prototypes = prototypes - 0.5 * grad
    assert float(loss_and_grad(key, descriptors, prototypes)[0]) < float(loss0)


def test_kmeans_gradient_finite_nonzero():
    descriptors = jnp.asarray(unit(np.random.default_rng(0).normal(size=(10, 4))))
    prototypes = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    grads = jax.grad(ops.kmeans_loss, argnums=(0, 1))(descriptors, prototypes)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="share C"):
        ops.kmeans_loss(jnp.zeros((4, 3)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="x and y"):
        ops.sliced_wasserstein(jnp.zeros((4, 3)), jnp.zeros((5, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="directions"):
        ops.sliced_wasserstein(jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="counts"):
        ops.sample_prototype_mixture(jax.random.PRNGKey(0), jnp.ones((3, 2)), jnp.ones(2), 4)
    with pytest.raises(ValueError, match="num_projections"):
        ops.sliced_wasserstein_loss(jax.random.PRNGKey(0), jnp.ones((4, 2)), jnp.ones((2, 2)), 0)


def test_l2_normalize_unit_norm_and_safe_at_zero():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(ops.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda v: ops.l2_normalize(v).sum())(x)
    assert np.all(np.isfinite(grad))


def test_stochastic_counts_are_unbiased_with_no_preferred_index():
    # The tied case above: 8 spare samples over 24 unused prototypes with equal
    # fractional parts. largest_remainder always gives them to prototypes 8-15;
    # stochastic rounding gives each prototype weight_m N samples on average.
    prototypes = jnp.asarray(np.eye(32, dtype=np.float32))
    descriptors = jnp.asarray(np.eye(32, dtype=np.float32)[np.repeat(np.arange(8), 6)])
    spread = np.array([0.0] * 8 + [1.0] * 24)
    weight = np.array([6.0] * 8 + [0.0] * 24) + 48 * (0.01 + np.var(spread))
    exact = weight / weight.sum() * 48
    draw = jax.jit(
        jax.vmap(lambda k: ops.prototype_counts(descriptors, prototypes, "stochastic", key=k))
    )
    counts = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 4000)))
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts.sum(axis=1), 48)
    assert np.all((counts == np.floor(exact)) | (counts == np.ceil(exact)))
    # Mean over 4000 draws: the binomial std of each mean is <= 0.008.
    np.testing.assert_allclose(counts.mean(axis=0), exact, atol=0.04)
    assert counts[:, 16:].sum(axis=1).mean() > 1.0  # The high indices get samples too.
    assert len({tuple(c) for c in counts[:50]}) > 10  # The draws differ by key.


def test_stochastic_counts_exact_when_weights_are_integral_and_need_a_key():
    descriptors = jnp.asarray(unit(np.repeat(np.eye(3, 6), 4, axis=0)))
    prototypes = jnp.asarray(np.eye(3, 6, dtype=np.float32))
    # Balanced: weight_m N = 4 exactly, nothing to round.
    for seed in range(3):
        counts = ops.prototype_counts(
            descriptors, prototypes, "stochastic", key=jax.random.PRNGKey(seed)
        )
        np.testing.assert_array_equal(counts, [4, 4, 4])
    with pytest.raises(ValueError, match="needs a key"):
        ops.prototype_counts(descriptors, prototypes, "stochastic")


def test_sliced_wasserstein_loss_keeps_the_reference_key_stream_for_other_roundings():
    key = jax.random.PRNGKey(3)
    descriptors = jnp.asarray(unit(np.random.default_rng(0).normal(size=(12, 6))))
    prototypes = jnp.asarray(unit(np.random.default_rng(1).normal(size=(5, 6))))
    # The reference's stream: the key splits once into (mixture sample, directions).
    key_sample, key_directions = jax.random.split(key)
    counts = ops.prototype_counts(descriptors, prototypes, "last")
    target = ops.sample_prototype_mixture(key_sample, prototypes, counts, 12, 0.02)
    directions = ops.random_directions(key_directions, 6, 100)
    expected = float(ops.sliced_wasserstein(descriptors, target, directions))
    loss = ops.sliced_wasserstein_loss(key, descriptors, prototypes, count_rounding="last")
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    stochastic = ops.sliced_wasserstein_loss(
        key, descriptors, prototypes, count_rounding="stochastic"
    )
    assert np.isfinite(float(stochastic)) and float(stochastic) >= 0.0
