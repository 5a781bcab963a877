"""Prototype clustering: the k-means cluster loss and the sliced-Wasserstein
prototype loss with its Gaussian-mixture target (SPEC section 3).

Descriptors are `[N, C]` (N keypoints of a batch, flattened); prototypes are
`[M, C]` and are L2-normalised wherever they are used.
"""

import jax
import jax.numpy as jnp

from tusk_jax.ops import _checks


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) along `axis` (as torch.nn.functional.normalize).

    Written with rsqrt of the clamped squared norm so that the gradient stays
    finite at x = 0 (the square root's gradient there is infinite).
    """
    squared_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def _check_pair(descriptors: jax.Array, prototypes: jax.Array) -> None:
    _checks.check_rank("descriptors", descriptors, 2)
    _checks.check_rank("prototypes", prototypes, 2)
    if descriptors.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"descriptors [N, C] and prototypes [M, C] must share C, got "
            f"{descriptors.shape} and {prototypes.shape}."
        )


def _squared_distances(descriptors: jax.Array, prototypes: jax.Array) -> jax.Array:
    """`[N, M]` squared L2 distances (summed over channels)."""
    return jnp.sum((descriptors[:, None, :] - prototypes[None, :, :]) ** 2, axis=-1)


def nearest_prototype(descriptors: jax.Array, prototypes: jax.Array) -> jax.Array:
    """int32 `[N]` index of each descriptor's nearest (L2-normalised) prototype."""
    _check_pair(descriptors, prototypes)
    distances = _squared_distances(descriptors, l2_normalize(prototypes))
    return jnp.argmin(distances, axis=1).astype(jnp.int32)


def kmeans_loss(
    descriptors: jax.Array, prototypes: jax.Array, temperature: float = 20.0
) -> jax.Array:
    """The cluster loss L_km: descriptors pulled toward their soft-nearest prototype.

    d_ij = mean over channels of (D_i - P_j)^2, q_ij = softmin_j(temperature
    d_ij), L = -mean_i log max_j q_ij. Zero when every descriptor sits on a
    prototype that is far from all the others.

    Args:
      descriptors: `[N, C]`.
      prototypes: `[M, C]` (normalised here).
      temperature: softmin sharpness.

    Returns:
      scalar loss >= 0.
    """
    _check_pair(descriptors, prototypes)
    channels = descriptors.shape[1]
    logits = -temperature * _squared_distances(descriptors, l2_normalize(prototypes)) / channels
    # -log max_j softmax_j(logits) = logsumexp(logits) - max(logits): stable form.
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.max(logits, axis=1))


# How `prototype_counts` turns the mixture weights into integer sample counts.
# "last": floor(weight_m N), the remainder to the last prototype (the paper's
# reference, SPEC section 3). "largest_remainder": floor, then one more sample
# to each of the prototypes with the largest fractional parts until the counts
# sum to N (every count is floor or ceil of weight_m N). They agree when N is
# large against M; when it is not (a CPU-sized batch: N = 48 descriptors for
# M = 32 prototypes), "last" gives the last prototype up to M - 1 extra samples
# and every prototype whose weight_m N is below 1 none, so unused prototypes
# are never pulled toward the descriptors. "largest_remainder" breaks ties by
# index: every unused prototype has the same fractional part, so the spare
# samples go to the lowest-indexed unused ones, every step. "stochastic": floor, then one
# more sample to prototype m with probability equal to its fractional part
# (systematic sampling over a random order), exactly N in all: unbiased,
# E[count_m] = weight_m N, with no preferred index.
COUNT_ROUNDINGS = ("last", "largest_remainder", "stochastic")
# s_m, the spread of prototype m: "channel_mean" is the mean over its
# descriptors and over the C channels of (D_i - P_m)^2 (the reference's
# `torch.mean`, SPEC section 3); "channel_sum" sums over the channels (C times
# larger; what tusk_jax computed before following the reference).
SPREADS = ("channel_mean", "channel_sum")


def prototype_counts(
    descriptors: jax.Array,
    prototypes: jax.Array,
    rounding: str = "last",
    spread: str = "channel_mean",
    key: jax.Array | None = None,
) -> jax.Array:
    """How many of the N mixture samples each prototype gets (SPEC section 3).

    Each descriptor is assigned to its nearest prototype; r_m is the count of
    prototype m and s_m the mean over its descriptors and over the C channels
    of (D_i - P_m)^2 (`spread`, see `SPREADS`; 1 where it has none); a is the
    (population) variance of the s_m over m. Weights
    r_m + N (0.01 + a), normalised, give floor(weight_m N) samples; the
    remainder goes to the last prototype (`rounding="last"`, the reference),
    one each to the largest fractional parts (`"largest_remainder"`) or one
    each to prototypes drawn with probability equal to their fractional parts
    (`"stochastic"`, needs `key`); see `COUNT_ROUNDINGS`. Not differentiable
    (integer).

    Args:
      descriptors: `[N, C]`.
      prototypes: `[M, C]` (normalised here).
      rounding: one of `COUNT_ROUNDINGS` (static).
      spread: one of `SPREADS` (static).
      key: a `jax.random` key; required by (and only used by) `"stochastic"`.

    Returns:
      int32 `[M]`, non-negative, summing to N.
    """
    _check_pair(descriptors, prototypes)
    if rounding not in COUNT_ROUNDINGS:
        raise ValueError(f"rounding must be one of {COUNT_ROUNDINGS}, got {rounding!r}.")
    if rounding == "stochastic" and key is None:
        raise ValueError('rounding="stochastic" needs a key (a jax.random key), got None.')
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}.")
    descriptors = jax.lax.stop_gradient(descriptors)
    prototypes = l2_normalize(jax.lax.stop_gradient(prototypes))
    n, m = descriptors.shape[0], prototypes.shape[0]
    distances = _squared_distances(descriptors, prototypes)  # [N, M]
    owner = jax.nn.one_hot(jnp.argmin(distances, axis=1), m, dtype=descriptors.dtype)  # [N, M]
    count = jnp.sum(owner, axis=0)
    per_channel = distances / descriptors.shape[1] if spread == "channel_mean" else distances
    total = jnp.sum(owner * per_channel, axis=0)
    spread = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 1.0)
    weight = count + n * (0.01 + jnp.var(spread))
    weight = weight / jnp.sum(weight)
    exact = weight * n
    counts = jnp.floor(exact).astype(jnp.int32)
    remainder = n - jnp.sum(counts)  # In [0, M); traced.
    if rounding == "last":
        return counts.at[-1].add(remainder)
    if rounding == "stochastic":
        return counts + _systematic_extra_samples(key, exact - counts, remainder)
    # Rank of each prototype by fractional part, largest first (ties: lowest index).
    rank = jnp.argsort(jnp.argsort(-(exact - counts), stable=True))
    return counts + (rank < remainder).astype(jnp.int32)


def _systematic_extra_samples(key: jax.Array, fractions: jax.Array, total: jax.Array) -> jax.Array:
    """0/1 per entry, `total` ones in all, entry m one with probability `fractions[m]`.

    Systematic sampling: the fractions (each in [0, 1), summing to the
    integer `total`) are laid end to end in a random order on [0, total) and
    hit by the points u, u + 1, ..., u + total - 1 for one u ~ U[0, 1); an
    interval of length f < 1 holds a point with probability f and at most one.
    No library draws a fixed-size sample with given inclusion probabilities
    under jit (`jax.random.choice(replace=False, p=...)` draws successively,
    which does not give inclusion probabilities p).

    Args:
      key: a `jax.random` key.
      fractions: `[M]` in [0, 1).
      total: int scalar in [0, M), may be traced.

    Returns:
      int32 `[M]`.
    """
    key_order, key_offset = jax.random.split(key)
    size = fractions.shape[0]
    order = jax.random.permutation(key_order, size)
    ends = jnp.cumsum(fractions[order])
    # Rescale so the last end is `total` exactly (float sums drift by ~1e-7).
    ends = ends * (total / jnp.maximum(ends[-1], 1e-12))
    points = jax.random.uniform(key_offset) + jnp.arange(size)
    hit = jnp.searchsorted(ends, points, side="right")  # Interval holding each point.
    valid = ((jnp.arange(size) < total) & (hit < size)).astype(jnp.int32)
    extra_in_order = jnp.zeros(size, jnp.int32).at[jnp.where(valid > 0, hit, 0)].add(valid)
    return jnp.zeros(size, jnp.int32).at[order].set(extra_in_order)


def sample_prototype_mixture(
    key: jax.Array,
    prototypes: jax.Array,
    counts: jax.Array,
    num_samples: int,
    noise_std: float = 0.02,
) -> jax.Array:
    """`num_samples` points from the prototype mixture, with static shapes.

    Prototype m is repeated `counts[m]` times (no Python loop over
    prototypes: one `jnp.repeat` with a static total length), Gaussian noise
    of std `noise_std` is added and each point is L2-normalised.
    Differentiable w.r.t. `prototypes`.

    Args:
      key: a `jax.random` key.
      prototypes: `[M, C]` (normalised here).
      counts: int `[M]` summing to `num_samples` (`prototype_counts`); may be traced.
      num_samples: N, a Python int.
      noise_std: standard deviation of each mixture component.

    Returns:
      `[N, C]` unit-norm points, grouped by prototype (prototype 0 first).
    """
    _checks.check_rank("prototypes", prototypes, 2)
    _checks.check_rank("counts", counts, 1)
    if counts.shape[0] != prototypes.shape[0]:
        raise ValueError(
            f"counts must have one entry per prototype ({prototypes.shape[0]}), "
            f"got shape {counts.shape}."
        )
    _checks.check_positive("num_samples", num_samples)
    component = jnp.repeat(jnp.arange(prototypes.shape[0]), counts, total_repeat_length=num_samples)
    centres = l2_normalize(prototypes)[component]
    noise = noise_std * jax.random.normal(key, centres.shape, centres.dtype)
    return l2_normalize(centres + noise)


def sliced_wasserstein(x: jax.Array, y: jax.Array, directions: jax.Array) -> jax.Array:
    """Sliced Wasserstein distance between two equal-size point sets.

    Both sets are projected on each direction and sorted; the distance is the
    mean over the N sorted positions of the sum over directions of the
    squared difference. 0 for identical sets, invariant to the order of
    either set.

    Args:
      x, y: `[N, C]` point sets.
      directions: `[C, P]` projection directions (columns, usually unit norm).

    Returns:
      scalar >= 0.
    """
    _checks.check_rank("x", x, 2)
    _checks.check_rank("y", y, 2)
    _checks.check_rank("directions", directions, 2)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape [N, C], got {x.shape} and {y.shape}.")
    if directions.shape[0] != x.shape[1]:
        raise ValueError(
            f"directions must be [C, P] with C = {x.shape[1]}, got shape {directions.shape}."
        )
    x_sorted = jnp.sort(x @ directions, axis=0)
    y_sorted = jnp.sort(y @ directions, axis=0)
    return jnp.mean(jnp.sum((x_sorted - y_sorted) ** 2, axis=1))


def random_directions(key: jax.Array, channels: int, num_projections: int) -> jax.Array:
    """`[C, P]` directions drawn uniformly on the unit sphere."""
    return l2_normalize(jax.random.normal(key, (channels, num_projections)), axis=0)


def sliced_wasserstein_loss(
    key: jax.Array,
    descriptors: jax.Array,
    prototypes: jax.Array,
    num_projections: int = 100,
    noise_std: float = 0.02,
    count_rounding: str = "last",
    spread: str = "channel_mean",
) -> jax.Array:
    """The prototype loss L_sw: descriptors vs. a sample of the prototype mixture.

    The mixture's component sizes come from `prototype_counts` (no gradient,
    rounded by `count_rounding`);
    N points are sampled from it (`sample_prototype_mixture`) and compared to
    the descriptors with `sliced_wasserstein` on `num_projections` random unit
    directions. Differentiable w.r.t. `prototypes` and `descriptors`.

    Args:
      key: a `jax.random` key.
      descriptors: `[N, C]` (usually unit norm).
      prototypes: `[M, C]` (normalised here).
      num_projections: number of random directions P.
      noise_std: std of each mixture component.
      count_rounding: `prototype_counts`' `rounding` (static).
      spread: `prototype_counts`' `spread` (static).

    Returns:
      scalar >= 0.
    """
    _check_pair(descriptors, prototypes)
    _checks.check_positive("num_projections", num_projections)
    key_counts = None
    if count_rounding == "stochastic":  # Other roundings keep the reference's key stream.
        key, key_counts = jax.random.split(key)
    key_sample, key_directions = jax.random.split(key)
    counts = prototype_counts(descriptors, prototypes, count_rounding, spread, key_counts)
    target = sample_prototype_mixture(
        key_sample, prototypes, counts, descriptors.shape[0], noise_std
    )
    directions = random_directions(key_directions, descriptors.shape[1], num_projections)
    return sliced_wasserstein(descriptors, target, directions)
