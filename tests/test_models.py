"""Tests of tusk_jax.models: parameter counts, output meaning, gradients, config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from tusk_jax.models import TUSK, ModelConfig, create_model

SIZE = 16
BATCH = 2


def small_config(decoder_mode="plain", num_keypoints=3):
    config = get_base_config()
    config.model.base_width = 8
    config.model.depth = 2
    config.model.feature_dim = 8
    config.model.num_groups = 4
    config.model.num_keypoints = num_keypoints
    config.model.window = 5
    config.model.decoder_mode = decoder_mode
    return config


def images(seed=0):
    return jax.random.uniform(jax.random.key(seed), (BATCH, SIZE, SIZE, 3))


def bilinear(values, x, y):
    """`values` [H, W, ...] read at (x, y) pixels (inside the image), by hand."""
    ix, iy = min(int(np.floor(x)), values.shape[1] - 2), min(int(np.floor(y)), values.shape[0] - 2)
    fx, fy = x - ix, y - iy
    return (
        values[iy, ix] * (1 - fx) * (1 - fy)
        + values[iy, ix + 1] * fx * (1 - fy)
        + values[iy + 1, ix] * (1 - fx) * fy
        + values[iy + 1, ix + 1] * fx * fy
    )


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --- Parameter counts, from the layer shapes of SPEC 2 -------------------------


def conv(k, cin, cout):
    return k * k * cin * cout + cout  # kernel + bias


def group_norm(c):
    return 2 * c  # scale + bias


def conv_stage(cin, cout):
    return conv(3, cin, cout) + group_norm(cout) + conv(3, cout, cout) + group_norm(cout)


def unet(cin, cout, c, depth):
    total = 0
    for level in range(depth):  # Down path (the last level is the bottleneck).
        total += conv_stage(cin if level == 0 else c * 2 ** (level - 1), c * 2**level)
    for level in range(depth - 1):  # Up path: [up-sampled, skip] -> c * 2**level.
        total += conv_stage(c * 2 ** (level + 1) + c * 2**level, c * 2**level)
    return total + conv(1, c, cout)


def expected_counts(c, depth, feature_dim, mode):
    head = conv(3, feature_dim, feature_dim) + group_norm(feature_dim)
    head += conv(3, feature_dim, 1) + group_norm(1)
    encoder = unet(3, feature_dim, c, depth) + head
    decoder = unet(feature_dim, 3 if mode == "plain" else 4, c, depth)
    return encoder, decoder


@pytest.mark.parametrize(
    "c, depth, mode, pinned",
    [
        # Pinned values were printed by the code once and agree with the
        # formula; pinning them too catches the formula and the code drifting
        # together. Paper / reference configuration: c = C = 32, depth 4.
        (32, 4, "plain", (1_960_323, 1_958_115)),
        (32, 4, "alpha", (1_960_323, 1_958_148)),
        (8, 3, "plain", None),
        (8, 3, "alpha", None),
    ],
)
def test_parameter_counts(c, depth, mode, pinned):
    config = get_base_config()
    config.model.base_width = c
    config.model.depth = depth
    config.model.feature_dim = 32 if c == 32 else 8
    config.model.num_groups = 4
    config.model.decoder_mode = mode
    shapes = jax.eval_shape(
        create_model(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)
    )
    assert set(shapes) == {"params"}
    assert set(shapes["params"]) == {"encoder", "decoder"}
    got = (count(shapes["params"]["encoder"]), count(shapes["params"]["decoder"]))
    assert got == expected_counts(c, depth, config.model.feature_dim, mode)
    if pinned is not None:
        assert got == pinned


def test_whole_config_is_accepted(plain_run):
    """create_model reads config.model: same fields and parameters as from config.model."""
    _, _, variables, _ = plain_run
    config = small_config()
    assert ModelConfig.from_config(config) == ModelConfig.from_config(config.model)
    shapes = jax.eval_shape(create_model(config).init, init_key(1), images())
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, variables)


# --- Outputs -------------------------------------------------------------------


def init_key(seed):
    # The "rbg" PRNG compiles the ~25 random kernel initialisers about 4x
    # faster than the default threefry on CPU (30 s -> 10 s per model here).
    return jax.random.key(seed, impl="rbg")


def build(mode):
    model = create_model(small_config(mode))
    variables = jax.jit(model.init)(init_key(1), images())
    out = jax.jit(model.apply)(variables, images())
    return mode, model, variables, jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def plain_run():
    return build("plain")


@pytest.fixture(scope="module")
def alpha_run():
    return build("alpha")


@pytest.fixture(params=["plain", "alpha"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_output_shapes_and_ranges(run):
    mode, _, _, out = run
    k, c = 3, 8
    expected = {
        "score_map": (BATCH, SIZE, SIZE),
        "feature_map": (BATCH, SIZE, SIZE, c),
        "keypoints": (BATCH, k, 2),
        "confidence": (BATCH, k),
        "descriptors": (BATCH, k, c),
        "reconstruction": (BATCH, SIZE, SIZE, 3),
    }
    if mode == "alpha":
        expected.update(rgb=(BATCH, k, SIZE, SIZE, 3), alpha=(BATCH, k, SIZE, SIZE))
    assert {key: value.shape for key, value in out.items()} == expected
    for value in out.values():
        assert np.all(np.isfinite(value))
    score = out["score_map"]
    assert score.min() >= 0 and score.max() <= 1
    # The final GroupNorm(1 group) gives each image's logits zero mean and unit
    # variance before the learned scale (init 1) and bias (init 0).
    logits = np.log(score) - np.log1p(-score)
    np.testing.assert_allclose(logits.mean(axis=(1, 2)), 0, atol=1e-3)
    np.testing.assert_allclose(logits.std(axis=(1, 2)), 1, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(out["descriptors"], axis=-1), 1, rtol=1e-5)
    xy = out["keypoints"]
    assert xy.min() >= 0 and xy.max() <= SIZE - 1
    # Confidence is the score map read (bilinearly) at the keypoint.
    for b in range(BATCH):
        for (x, y), conf in zip(xy[b], out["confidence"][b], strict=True):
            np.testing.assert_allclose(conf, bilinear(score[b], x, y), rtol=1e-5)
    recon = out["reconstruction"]
    assert recon.min() >= 0 and recon.max() <= 1
    if mode == "alpha":
        np.testing.assert_allclose(out["alpha"].sum(axis=1), 1, rtol=1e-5)
        assert out["rgb"].min() >= 0 and out["rgb"].max() <= 1
        np.testing.assert_allclose(
            recon, np.sum(out["alpha"][..., None] * out["rgb"], axis=1), rtol=1e-5, atol=1e-6
        )


@pytest.fixture(scope="module")
def alpha_five(alpha_run):
    """The K = 3 alpha model applied with K = 5 (parameters do not depend on K)."""
    _, model, variables, _ = alpha_run
    out = jax.jit(model.apply, static_argnums=2)(variables, images(), 5)
    return jax.tree.map(np.asarray, out)


def test_more_keypoints_at_apply_time(alpha_five):
    out = alpha_five
    assert out["keypoints"].shape == (BATCH, 5, 2)
    assert out["descriptors"].shape == (BATCH, 5, 8)
    assert out["rgb"].shape == (BATCH, 5, SIZE, SIZE, 3)
    assert out["alpha"].shape == (BATCH, 5, SIZE, SIZE)
    np.testing.assert_allclose(out["alpha"].sum(axis=1), 1, rtol=1e-5)
    # Five distinct NMS peaks.
    for b in range(BATCH):
        assert len({tuple(p) for p in np.round(out["keypoints"][b], 3)}) == 5


def test_methods_compose_to_call(alpha_run, alpha_five):
    """encode -> extract -> decode (as the train step calls them) equals __call__."""
    _, model, variables, _ = alpha_run
    out = alpha_five

    @jax.jit
    def by_methods(variables, x):
        score, feats = model.apply(variables, x, method=TUSK.encode)
        kp = model.apply(variables, score, feats, 5, method=TUSK.extract)
        dec = model.apply(
            variables,
            kp["keypoints"],
            kp["confidence"],
            kp["descriptors"],
            SIZE,
            SIZE,
            method=TUSK.decode,
        )
        return {"score_map": score, "feature_map": feats, **kp, **dec}

    parts = by_methods(variables, images())
    assert set(parts) == set(out)
    for key in out:
        np.testing.assert_allclose(parts[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    "border, sampling", [("inside", "bilinear"), ("zeros", "nearest"), ("zeros", "bilinear")]
)
def test_extract_reads_peaks_and_features(border, sampling):
    """Lit pixels become keypoints; descriptors are the normalised features there."""
    config = small_config()  # window 5, temperature 0.2
    config.model.soft_argmax_border = border
    config.model.descriptor_sampling = sampling
    model = create_model(config)
    score = np.zeros((1, SIZE, SIZE), np.float32)
    # (x, y) and value; the corner peak's window is clipped by the border.
    peaks = [((3, 12), 1.0), ((10, 4), 0.9), ((0, 0), 0.8)]
    for (x, y), value in peaks:
        score[0, y, x] = value
    feats = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 8)).astype(np.float32)
    extract = jax.jit(lambda s, f: model.apply({}, s, f, 3, method=TUSK.extract))
    out = jax.tree.map(np.asarray, extract(score, feats))
    # Inside the image the 5x5 window is symmetric: the soft-argmax stays on
    # the peak. In the corner with the border left out only the 3x3 pixels
    # inside count: weight exp(0.8 / 0.2) on (0, 0) and 1 on the 8 others,
    # whose x sum to 9. Zero-padded, the outside pixels weigh 1 like the
    # inside zeros: the window is symmetric again.
    corner = 9 / (np.exp(0.8 / 0.2) + 8) if border == "inside" else 0.0
    expected_xy = np.array([[3, 12], [10, 4], [corner, corner]], np.float32)
    np.testing.assert_allclose(out["keypoints"][0], expected_xy, atol=1e-5)
    for i, (x, y) in enumerate(expected_xy):
        np.testing.assert_allclose(out["confidence"][0, i], bilinear(score[0], x, y), rtol=1e-5)
        sample = bilinear(feats[0], x, y) if sampling == "bilinear" else feats[0, int(y), int(x)]
        np.testing.assert_allclose(
            out["descriptors"][0, i], sample / np.linalg.norm(sample), rtol=1e-4, atol=1e-6
        )
    np.testing.assert_allclose(out["confidence"][0, :2], [1.0, 0.9], rtol=1e-6)


@pytest.mark.parametrize("sampling", ["nearest", "bilinear_stop_gradient", "bilinear"])
def test_descriptor_sampling_location_and_gradient(sampling):
    """`nearest` reads the truncated pixel; only `bilinear` passes a gradient to the location."""
    from tusk_jax.models import sample_descriptors

    feats = jnp.asarray(np.random.default_rng(1).normal(size=(6, 7, 3)).astype(np.float32))
    xy = jnp.array([[2.7, 3.2], [0.4, 4.9]])
    got = np.asarray(sample_descriptors(feats, xy, sampling))
    if sampling == "nearest":  # Truncated: (2, 3) and (0, 4).
        np.testing.assert_array_equal(got, np.asarray(feats)[[3, 4], [2, 0]])
    else:
        expected = [bilinear(np.asarray(feats), x, y) for x, y in np.asarray(xy)]
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    grad = jax.grad(lambda p: jnp.sum(sample_descriptors(feats, p, sampling) ** 2))(xy)
    assert np.all(np.isfinite(grad))
    assert (np.abs(np.asarray(grad)).sum() > 0) == (sampling == "bilinear")


def test_upsample_align_corners_keeps_the_corner_values():
    """align_corners=True: output corners equal input corners; samples in between are linear."""
    from tusk_jax.unet import upsample2x

    # [1, 2, 3, 1]: columns 0, 1, 2.
    x = jnp.arange(3.0)[None, None, :, None] * jnp.ones((1, 2, 1, 1))
    up = np.asarray(upsample2x(x, align_corners=True))[0, 0, :, 0]
    # 6 outputs at input positions i * (3 - 1) / (6 - 1) = 0, 0.4, ..., 2.
    np.testing.assert_allclose(up, np.arange(6) * 0.4, rtol=1e-6, atol=1e-7)
    half_pixel = np.asarray(upsample2x(x, align_corners=False))[0, 0, :, 0]
    np.testing.assert_allclose(half_pixel, [0, 0.25, 0.75, 1.25, 1.75, 2], atol=1e-6)


def test_upsample_with_symbolic_sizes_equals_the_concrete_one():
    """Under jax.export shape polymorphism the align-corners weights are traced, not numpy."""
    from tusk_jax.unet import upsample2x

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("n, h, w, c"), jnp.float32)
    program = jax.export.export(jax.jit(upsample2x), platforms=["cpu"])(spec)
    for shape in ((1, 1, 1, 2), (2, 3, 5, 1), (1, 8, 13, 3)):
        x = np.random.default_rng(sum(shape)).random(shape, np.float32)
        np.testing.assert_allclose(program.call(x), upsample2x(x), atol=1e-6, rtol=0)


def test_group_norm_groups_and_pytorch_init():
    """Stage GroupNorm groups are capped at the width; conv weights start in +-1/sqrt(fan_in)."""
    from tusk_jax.unet import stage_groups

    assert [stage_groups(32, w) for w in (8, 16, 32, 64)] == [8, 16, 32, 32]
    config = small_config()
    variables = jax.jit(create_model(config).init)(jax.random.key(0), images())
    kernel = np.asarray(variables["params"]["encoder"]["unet"]["down0"]["conv0"]["kernel"])
    bias = np.asarray(variables["params"]["encoder"]["unet"]["down0"]["conv0"]["bias"])
    bound = 1 / np.sqrt(3 * 3 * 3)  # fan_in of a 3x3 conv on RGB.
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.5 * bound
    config.model.init = "lecun"
    variables = jax.jit(create_model(config).init)(jax.random.key(0), images())
    assert not np.any(variables["params"]["encoder"]["unet"]["down0"]["conv0"]["bias"])


def test_reconstruction_gradient_reaches_encoder(plain_run):
    """MSE of the reconstruction moves the encoder through keypoints and descriptors."""
    _, model, variables, _ = plain_run
    x = images(3)

    def loss(params):
        return jnp.mean((model.apply({"params": params}, x)["reconstruction"] - x) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    enc = grads["encoder"]
    # The heatmap head only reaches the loss through the score map (keypoint
    # locations and confidences); the U-Net output conv also through the
    # descriptors. Both must receive a gradient.
    assert np.abs(enc["head_conv1"]["kernel"]).max() > 0
    assert np.abs(enc["unet"]["out"]["kernel"]).max() > 0
    assert np.abs(enc["unet"]["down0"]["conv0"]["kernel"]).max() > 0
    assert np.abs(grads["decoder"]["unet"]["out"]["kernel"]).max() > 0


# --- Config checks ---------------------------------------------------------------


def test_image_size_not_divisible_raises():
    config = small_config()
    config.model.depth = 3  # Sides must be multiples of 4.
    model = create_model(config)
    with pytest.raises(ValueError, match=r"18x16.*2\*\*\(depth-1\) = 4.*depth 3"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 18, 16, 3)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_groups", 3, "num_groups=3 must divide the U-Net stage width 8"),
        ("head_groups", 3, "head_groups=3 must divide model.feature_dim=8"),
        ("init", "xavier", "init must be one of"),
        ("decoder_mode", "rgba", "decoder_mode must be one of"),
        ("window", 4, "window must be a positive odd int"),
    ],
)
def test_bad_config_raises(field, value, message):
    config = small_config()
    config.model[field] = value
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(create_model(config).init, jax.random.key(0), images())
