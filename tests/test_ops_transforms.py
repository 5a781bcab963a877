"""Every op gives its eager value under jit(vmap(...)) and under pmap (2 CPU devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tusk_jax import ops

KEYS = jax.random.split(jax.random.PRNGKey(0), 2)
SCORES = jax.random.uniform(jax.random.PRNGKey(1), (2, 12, 12))
FEATURES = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 12, 4))
XY = jax.random.uniform(jax.random.PRNGKey(3), (2, 5, 2), minval=-1.0, maxval=12.0)
DESCRIPTORS = ops.l2_normalize(jax.random.normal(jax.random.PRNGKey(4), (2, 20, 4)))
PROTOTYPES = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 4))
TPS = dict(scale=0.95, scale_var=0.05, tps=0.1, off=0.01, rot=0.25)
POINTS, DISPLACEMENT = jax.vmap(functools.partial(ops.random_tps, **TPS))(KEYS)
GRIDS = jax.vmap(ops.tps_sampling_grid, in_axes=(0, 0, None, None))(POINTS, DISPLACEMENT, 12, 12)
IMAGES = jax.random.uniform(jax.random.PRNGKey(6), (2, 10, 10, 3))

# (name, function of per-example arguments, batched arguments)
CASES = [
    ("non_max_suppression", lambda s: ops.non_max_suppression(s, 5), (SCORES,)),
    ("top_k_peaks", lambda s: ops.top_k_peaks(s, 3, 5), (SCORES,)),
    (
        "soft_argmax_refine",
        lambda s: ops.soft_argmax_refine(s, ops.top_k_peaks(s, 3, 5)[0], 5, 0.2),
        (SCORES,),
    ),
    ("detect_keypoints", lambda s: ops.detect_keypoints(s, 3, 5), (SCORES,)),
    ("bilinear_sample", ops.bilinear_sample, (FEATURES, XY)),
    ("gaussian_splat", lambda xy: ops.gaussian_splat(xy, 12, 12), (XY,)),
    ("random_tps", lambda k: ops.random_tps(k, **TPS), (KEYS,)),
    ("tps_transform", ops.tps_transform, (POINTS, DISPLACEMENT, POINTS)),
    ("tps_sampling_grid", lambda p, d: ops.tps_sampling_grid(p, d, 12, 12), (POINTS, DISPLACEMENT)),
    ("warp", ops.warp, (FEATURES, GRIDS)),
    ("warp_constant", lambda v, g: ops.warp(v, g, "constant", 0.5), (FEATURES, GRIDS)),
    ("make_training_pair", lambda k, im: ops.make_training_pair(k, im, **TPS), (KEYS, IMAGES)),
    ("kmeans_loss", ops.kmeans_loss, (DESCRIPTORS, PROTOTYPES)),
    ("prototype_counts", ops.prototype_counts, (DESCRIPTORS, PROTOTYPES)),
    (
        "sample_prototype_mixture",
        lambda k, p, d: ops.sample_prototype_mixture(k, p, ops.prototype_counts(d, p), 20),
        (KEYS, PROTOTYPES, DESCRIPTORS),
    ),
    (
        "sliced_wasserstein",
        lambda x, y: ops.sliced_wasserstein(x, y, jnp.ones((4, 3)) / 2.0),
        (DESCRIPTORS, DESCRIPTORS[::-1]),
    ),
    ("sliced_wasserstein_loss", ops.sliced_wasserstein_loss, (KEYS, DESCRIPTORS, PROTOTYPES)),
]


@functools.cache
def eager(name):
    """Per-example eager values of a case, computed once for both tests."""
    _, fn, args = next(case for case in CASES if case[0] == name)
    return [fn(*(a[i] for a in args)) for i in range(2)]


def assert_matches(batched, per_example):
    for i, expected in enumerate(per_example):
        got = jax.tree.map(lambda x, i=i: x[i], batched)
        jax.tree.map(
            lambda g, e: np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5), got, expected
        )


@pytest.mark.parametrize("name, fn, args", CASES, ids=[c[0] for c in CASES])
def test_jit_vmap_equals_eager(name, fn, args):
    assert_matches(jax.jit(jax.vmap(fn))(*args), eager(name))


@pytest.mark.parametrize("name, fn, args", CASES, ids=[c[0] for c in CASES])
def test_pmap_equals_eager(name, fn, args):
    assert jax.local_device_count() == 2, "tests/conftest.py should give 2 CPU devices"
    assert_matches(jax.pmap(fn)(*args), eager(name))
