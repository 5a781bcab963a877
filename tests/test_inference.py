"""tusk_jax.inference: image handling, padding, keypoint coordinates, restoring runs.

Coordinate tests use a stand-in encoder whose score map is the image's
brightest channel and whose features are the image itself, so a lit pixel's
keypoint, confidence and prototype are known exactly. The real (randomly
initialised) network checks that the padded path agrees with `TUSK.__call__`.
Restoring uses a freshly initialised state saved by `checkpointing` (no
training): the trained end-to-end runs live in test_evaluate / test_detect.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tetrominoes
from tusk_jax import checkpointing, config_lib, detection_io, inference, models, ops

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def fake_encode(module, images):
    """Score map = brightest channel, features = RGB: a lit pixel is a keypoint of its colour."""
    del module
    return jnp.max(images, axis=-1), images


@pytest.fixture
def lit_detector(monkeypatch):
    """A Detector on the stand-in encoder; prototypes are red, green, blue (ids 0, 1, 2)."""
    monkeypatch.setattr(models.TUSK, "encode", fake_encode)
    config = tetrominoes.get_config("test")  # depth 3: sides padded to multiples of 4; window 5.
    return inference.Detector(config, {"params": {}}, np.eye(3, dtype=np.float32))


def dots(height, width, points, dtype=np.float32):
    """Black `[H, W, 3]` image with one lit pixel per ((x, y), colour)."""
    image = np.zeros((height, width, 3), np.float32)
    for (x, y), color in points:
        image[y, x] = color
    if dtype == np.uint8:
        return (image * 255).astype(np.uint8)
    return image


# --- Coordinates, padding, image forms (stand-in encoder) -----------------------------


def test_lit_pixels_give_their_coordinates_on_an_odd_sized_image(lit_detector):
    # 13 x 19 pads to 16 x 20; the dots are at least 2 px (half the window) from the edges.
    points = [((3, 2), RED), ((15, 9), GREEN), ((8, 10), BLUE)]
    (found,) = lit_detector.detect(dots(13, 19, points), num_keypoints=3)
    order = np.lexsort((found.keypoints[:, 1], found.keypoints[:, 0]))
    np.testing.assert_allclose(found.keypoints[order], [[3, 2], [8, 10], [15, 9]], atol=1e-5)
    np.testing.assert_array_equal(found.prototype[order], [0, 2, 1])
    np.testing.assert_allclose(found.confidence, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.abs(found.descriptors[order]), np.eye(3)[[0, 2, 1]], atol=1e-6)


def test_padding_adds_no_keypoint_and_no_shift(lit_detector):
    # A dot on the last column and row: reflection copies it into the padding. The
    # keypoints must equal those computed on the unpadded 13 x 19 maps directly.
    image = dots(13, 19, [((18, 12), RED), ((17, 3), GREEN)])
    (found,) = lit_detector.detect(image, num_keypoints=4)
    assert np.all(found.keypoints[:, 0] <= 18) and np.all(found.keypoints[:, 1] <= 12)
    assert np.all(found.keypoints >= 0)
    detect = jax.jit(ops.detect_keypoints, static_argnums=(1, 2))
    expected_xy, expected_conf = detect(jnp.max(jnp.asarray(image), -1), 4, 5)
    np.testing.assert_allclose(found.keypoints, expected_xy, atol=1e-5)
    np.testing.assert_allclose(found.confidence, expected_conf, atol=1e-6)
    # The corner dot is found (pulled inward by less than a pixel by the patch soft-argmax).
    assert np.min(np.abs(found.keypoints - [18, 12]).sum(axis=1)) < 0.5


@pytest.mark.parametrize("size", [1, 2, 3, 5, 13])
def test_reflection_padding_is_numpys_reflect(size):
    # Pads of 0 to 9 rows, longer than the image too (numpy repeats the reflection);
    # one row (nothing to reflect) is repeated. Also traced with a symbolic size.
    rows = np.arange(size)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("n"), jnp.int32)
    for padded in range(size, size + 10):
        expected = np.pad(rows, (0, padded - size), mode="reflect" if size > 1 else "edge")
        got = np.asarray(detection_io.reflection_indices(size, padded))
        np.testing.assert_array_equal(rows[got], expected)
    program = jax.export.export(
        jax.jit(lambda x: detection_io.reflection_indices(x.shape[0], x.shape[0] + 9)),
        platforms=["cpu"],
    )(spec)
    expected = np.pad(rows, (0, 9), mode="reflect" if size > 1 else "edge")
    np.testing.assert_array_equal(rows[np.asarray(program.call(rows))], expected)


def test_more_keypoints_than_trained(lit_detector):
    assert lit_detector.num_keypoints == 3
    points = [((2 + 4 * i, 3 + (i % 2) * 6), RED) for i in range(6)]
    (found,) = lit_detector.detect(dots(16, 28, points), num_keypoints=6)
    assert len(found) == 6
    got = sorted(map(tuple, np.round(found.keypoints).astype(int).tolist()))
    assert got == sorted(p for p, _ in points)
    np.testing.assert_allclose(found.keypoints, np.round(found.keypoints), atol=1e-5)


def test_uint8_grayscale_and_float_agree(lit_detector):
    points = [((4, 5), (1.0, 1.0, 1.0)), ((9, 2), (1.0, 1.0, 1.0))]
    rgb = dots(11, 14, points)
    forms = [
        rgb,
        dots(11, 14, points, np.uint8),
        rgb[..., 0],
        (rgb[..., :1] * 255).astype(np.uint8),
    ]
    results = [lit_detector.detect(form, num_keypoints=2)[0] for form in forms]
    for found in results[1:]:
        np.testing.assert_allclose(found.keypoints, results[0].keypoints, atol=1e-6)
        np.testing.assert_allclose(found.confidence, results[0].confidence, atol=1e-6)


def test_list_of_sizes_and_batch_equal_single_calls(lit_detector):
    images = [
        dots(9, 10, [((4, 4), RED)]),
        dots(17, 6, [((3, 12), GREEN)]),
        dots(9, 10, [((6, 3), BLUE)]),
    ]
    together = lit_detector.detect(images, num_keypoints=1)
    alone = [lit_detector.detect(image, num_keypoints=1)[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.prototype, b.prototype)
    np.testing.assert_allclose([d.keypoints[0] for d in together], [[4, 4], [3, 12], [6, 3]])
    batch = lit_detector.detect(np.stack([images[0], images[2]]), num_keypoints=1)
    assert len(batch) == 2
    np.testing.assert_array_equal(batch[1].keypoints, together[2].keypoints)


def test_min_confidence_drops_weak_keypoints(lit_detector):
    image = dots(12, 12, [((3, 3), RED), ((8, 8), (0.3, 0.0, 0.0))])
    (everything,) = lit_detector.detect(image, num_keypoints=2)
    (strong,) = lit_detector.detect(image, num_keypoints=2, min_confidence=0.5)
    assert len(everything) == 2 and len(strong) == 1
    np.testing.assert_allclose(strong.keypoints, [[3, 3]], atol=1e-5)
    assert strong.descriptors.shape == (1, 3) and strong.prototype.shape == (1,)


def test_scale_maps_keypoints_back_to_the_given_pixels(lit_detector):
    image = dots(11, 13, [((5, 4), RED)])
    (found,) = lit_detector.detect(image, num_keypoints=1, scale=2.0)
    np.testing.assert_allclose(found.keypoints[0], [5, 4], atol=0.3)


def test_to_json_round_trips(lit_detector):
    (found,) = lit_detector.detect(dots(8, 8, [((2, 5), BLUE)]), num_keypoints=1)
    record = json.loads(json.dumps(found.to_json()))
    assert record[0]["x"] == pytest.approx(2.0, abs=1e-5)
    assert record[0]["y"] == pytest.approx(5.0, abs=1e-5)
    assert record[0]["prototype"] == 2
    assert len(record[0]["descriptor"]) == 3


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((8, 8, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((8, 8, 3), np.int16), "uint8 or float"),
        (np.zeros((8, 8, 4), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((2, 1, 3), np.uint8), "fewer pixels than num_keypoints"),
        (np.full((8, 8), np.nan, np.float32), "non-finite"),
    ],
)
def test_bad_images_raise(lit_detector, image, message):
    with pytest.raises(ValueError, match=message):
        lit_detector.detect(image, num_keypoints=3)


@pytest.mark.parametrize("k", [0, -2, 2.5, True])
def test_bad_num_keypoints_raise(lit_detector, k):
    with pytest.raises(ValueError, match="num_keypoints"):
        lit_detector.detect(np.zeros((8, 8, 3), np.float32), num_keypoints=k)


# --- The real network ----------------------------------------------------------------


def random_state(config, seed=0):
    """A host `TrainState` of the config's shapes with random floats (no init compile)."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return leaf

    return jax.tree.map(fill, checkpointing.state_template(config))


@pytest.fixture(scope="module")
def real_detector():
    config = tetrominoes.get_config("test")  # 16 x 16, alpha decoder, K = 3, M = 6.
    state = random_state(config)
    return inference.Detector(config, state.params, state.prototypes, batch_size=4)


def images(count, height, width, seed=0):
    return np.random.default_rng(seed).random((count, height, width, 3), dtype=np.float32)


def test_detect_and_reconstruct_match_the_model_at_a_divisible_size(real_detector):
    batch = images(2, 16, 16)
    out = real_detector.apply(batch)
    found = real_detector.detect(batch)
    rebuilt = real_detector.reconstruct(batch)
    for i in range(2):
        np.testing.assert_allclose(found[i].keypoints, out["keypoints"][i], atol=1e-4)
        np.testing.assert_array_equal(found[i].prototype, out["prototype"][i])
        np.testing.assert_allclose(rebuilt[i], out["reconstruction"][i], atol=1e-5)
    # `prototype` is the nearest (normalised) prototype of each descriptor.
    d = out["descriptors"].reshape(-1, out["descriptors"].shape[-1])
    nearest = np.argmin(((d[:, None] - real_detector.prototypes[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(out["prototype"].reshape(-1), nearest)


def test_reconstruct_odd_size_with_layers(real_detector):
    (layers,) = real_detector.reconstruct(images(1, 13, 18)[0], num_keypoints=5, return_layers=True)
    assert layers["reconstruction"].shape == (13, 18, 3)
    assert layers["rgb"].shape == (5, 13, 18, 3) and layers["alpha"].shape == (5, 13, 18)
    np.testing.assert_allclose(layers["alpha"].sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        layers["reconstruction"], (layers["alpha"][..., None] * layers["rgb"]).sum(0), atol=1e-5
    )
    assert np.all(layers["keypoints"][:, 0] <= 17) and np.all(layers["keypoints"][:, 1] <= 12)


def test_many_keypoints_and_any_count_of_images(real_detector):
    # Three 16 x 16 images share one padded batch of 4; the 7 x 30 one pads to 8 x 32.
    found = real_detector.detect(list(images(3, 16, 16)) + [images(1, 7, 30)[0]], num_keypoints=20)
    assert [len(d) for d in found] == [20] * 4
    assert all(d.descriptors.shape == (20, 8) for d in found)
    np.testing.assert_allclose(np.linalg.norm(found[3].descriptors, axis=1), 1.0, atol=1e-5)
    assert np.all(found[3].keypoints[:, 0] <= 29) and np.all(found[3].keypoints[:, 1] <= 6)


def test_render_prototypes_decodes_one_centred_keypoint(real_detector):
    renders = real_detector.render_prototypes(size=16)
    assert renders["reconstruction"].shape == (6, 16, 16, 3)
    model = real_detector.model
    decode = jax.jit(
        lambda v, xy, c, d: model.apply(v, xy, c, d, 16, 16, method=models.TUSK.decode)
    )
    direct = decode(
        real_detector.variables,
        np.full((1, 1, 2), 7.5, np.float32),  # The centre of 16 x 16 pixels.
        np.ones((1, 1), np.float32),
        real_detector.prototypes[3][None, None],
    )["reconstruction"][0]
    np.testing.assert_allclose(renders["reconstruction"][3], direct, atol=1e-5)


# --- Restoring a run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with config.json and a (freshly initialised) checkpoint of step 7."""
    config = tetrominoes.get_config("test")
    workdir = str(tmp_path_factory.mktemp("saved_run"))
    state = random_state(config, seed=1).replace(step=np.int32(7))
    config_lib.save_config(config, workdir)
    manager = checkpointing.create_manager(workdir)
    checkpointing.save(manager, 7, state, {"step": 7})
    manager.wait_until_finished()
    manager.close()
    return config, workdir, state


def test_load_restores_the_saved_state(saved_run):
    config, workdir, state = saved_run
    detector = inference.load(workdir)
    assert detector.step == 7 and detector.workdir == workdir
    expected = state.prototypes / np.linalg.norm(state.prototypes, axis=1, keepdims=True)
    np.testing.assert_allclose(detector.prototypes, expected, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(detector.variables), state.params)
    assert detector.config.model.to_dict() == config.model.to_dict()


def test_missing_step_config_or_checkpoint(saved_run, tmp_path):
    _, workdir, _ = saved_run
    with pytest.raises(FileNotFoundError, match=r"step 3.*\[7\]"):
        inference.load(workdir, step=3)
    with pytest.raises(FileNotFoundError, match="config.json"):
        inference.load(str(tmp_path))
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        inference.load(str(tmp_path))


def test_a_config_of_another_model_is_refused(saved_run):
    _, workdir, _ = saved_run
    other = tetrominoes.get_config("cpu")
    with pytest.raises(ValueError, match=r"another config(.|\n)*model\.base_width: 16"):
        inference.load(workdir, config=other)
    same = tetrominoes.get_config("test")
    with same.unlocked():
        same.dataset.data_dir = "/elsewhere"  # Data paths may differ.
    assert checkpointing.resolve_config(workdir, same).dataset.data_dir == "/elsewhere"


def test_checkpoint_that_does_not_fit_the_saved_config(saved_run, tmp_path):
    _, workdir, _ = saved_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    path = os.path.join(copy, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["model"]["base_width"] = 16
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(
        ValueError,
        match=r"does not fit(.|\n)*params/params/decoder/unet/down0/conv0/kernel: "
        r"shape \(3, 3, 8, 8\) in the checkpoint vs \(3, 3, 8, 16\)",
    ):
        inference.load(copy)
