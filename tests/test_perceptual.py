"""Tests of tusk_jax.perceptual and tusk_jax.convert_vgg16 (with random weights only).

Real VGG16 files cannot be downloaded here and neither torch nor h5py is
installed: the readers of .pth / .h5 files are not exercised; the conversions
are tested on numpy dicts laid out as torchvision's state_dict and Keras'
layers.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tusk_jax import convert_vgg16, perceptual

WIDTHS = (4, 8, 8, 8)  # Narrow random VGG16: same layers, fast compiles.


@pytest.fixture(scope="module")
def vgg():
    return perceptual.init_vgg16_params(jax.random.key(0), WIDTHS)


def images(seed, shape=(2, 16, 16, 3)):
    return jax.random.uniform(jax.random.key(seed), shape)


# --- The loss ------------------------------------------------------------------


@pytest.fixture(scope="module")
def loss_and_grads(vgg):
    """Loss and gradients (w.r.t. x and the VGG weights) at the default size 224."""
    fn = jax.jit(jax.value_and_grad(perceptual.perceptual_loss, argnums=(0, 1)))
    x, y = images(1), images(2)
    same = fn(vgg, x, x)
    different = fn(vgg, x, y)
    return jax.tree.map(np.asarray, (same, different))


def test_loss_is_zero_for_identical_images(loss_and_grads):
    (value, (_, grad_x)), _ = loss_and_grads
    assert value == 0
    assert np.all(np.isfinite(grad_x))


def test_loss_is_positive_for_different_images_with_finite_gradients(loss_and_grads):
    _, (value, (grad_vgg, grad_x)) = loss_and_grads
    assert value > 0
    assert np.all(np.isfinite(grad_x)) and np.abs(grad_x).max() > 0
    # The VGG weights are frozen.
    for leaf in jax.tree.leaves(grad_vgg):
        assert np.all(leaf == 0)


@pytest.mark.parametrize("reduction, divisor", [("sum", 1), ("mean", 4)])
def test_loss_is_the_sum_over_layers_of_the_mean_l1(vgg, reduction, divisor):
    x, y = images(3), images(4)
    size = 32  # Small resize target: this test checks the weighting, not the size.
    got = jax.jit(perceptual.perceptual_loss, static_argnums=(3, 4))(vgg, x, y, size, reduction)

    def features(images):
        z = (np.asarray(images) - np.asarray(perceptual.IMAGENET_MEAN)) / np.asarray(
            perceptual.IMAGENET_STD
        )
        z = jax.image.resize(z, (2, size, size, 3), "bilinear")
        return perceptual.VGG16Features(WIDTHS).apply({"params": vgg["params"]}, z)

    fx, fy = features(x), features(y)
    assert [f.shape for f in fx] == [(2, 32, 32, 4), (2, 16, 16, 8), (2, 8, 8, 8), (2, 4, 4, 8)]
    # The reference sums the four layers' L1 means; "mean" divides by 4.
    expected = sum(float(np.mean(np.abs(a - b))) for a, b in zip(fx, fy, strict=True)) / divisor
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_longer_side_is_resized_to_224(vgg):
    feats = jax.eval_shape(perceptual.vgg16_features, vgg, jnp.zeros((1, 16, 24, 3)))
    # 16 x 24 -> 149.3 x 224 -> 149 x 224, then three 2x2 max-pools (floor).
    assert [f.shape for f in feats] == [
        (1, 149, 224, 4),
        (1, 74, 112, 8),
        (1, 37, 56, 8),
        (1, 18, 28, 8),
    ]
    assert perceptual.resized_shape(80, 80) == (224, 224)
    assert perceptual.resized_shape(112, 56) == (224, 112)


def test_shape_mismatch_raises(vgg):
    with pytest.raises(ValueError, match="same shape"):
        perceptual.perceptual_loss(vgg, images(1), images(2, (2, 8, 8, 3)))


# --- The .npz file ----------------------------------------------------------------


def test_npz_round_trip(vgg, tmp_path):
    path = str(tmp_path / "vgg16.npz")
    perceptual.save_vgg16_params(path, vgg)
    with np.load(path) as data:
        assert set(data.files) == {
            f"{layer}/{leaf}" for layer in perceptual.VGG16_LAYERS for leaf in ("kernel", "bias")
        } | {"mean", "std"}
        assert data["conv1_1/kernel"].shape == (3, 3, 3, 4)
        assert data["conv4_3/kernel"].shape == (3, 3, 8, 8)
    loaded = perceptual.load_vgg16_params(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(vgg)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(vgg), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unset_path_names_the_config_field():
    with pytest.raises(ValueError, match=r"config\.loss\.vgg16_weights.*tusk_jax\.convert_vgg16"):
        perceptual.load_vgg16_params(None)


def test_missing_file_names_path_and_command(tmp_path):
    path = str(tmp_path / "nowhere" / "vgg16.npz")
    with pytest.raises(FileNotFoundError) as info:
        perceptual.load_vgg16_params(path)
    assert path in str(info.value)
    assert "python -m tusk_jax.convert_vgg16 --source=" in str(info.value)


def test_malformed_files_raise(vgg, tmp_path):
    not_npz = tmp_path / "vgg16.npz"
    not_npz.write_text("not an npz")
    with pytest.raises(ValueError, match="not a readable .npz.*convert_vgg16"):
        perceptual.load_vgg16_params(str(not_npz))

    arrays = perceptual.params_to_arrays(vgg)
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in arrays.items() if k != "conv3_2/bias"})
    with pytest.raises(ValueError, match=r"missing\.npz.*no array conv3_2/bias"):
        perceptual.load_vgg16_params(str(missing))

    oihw = tmp_path / "oihw.npz"
    np.savez(oihw, **{**arrays, "conv1_1/kernel": arrays["conv1_1/kernel"].transpose(3, 2, 0, 1)})
    with pytest.raises(ValueError, match=r"conv1_1/kernel has shape \(4, 3, 3, 3\).*HWIO"):
        perceptual.load_vgg16_params(str(oihw))


# --- Conversion -------------------------------------------------------------------


def correlate_chw(x, weight, bias):
    """PyTorch Conv2d(padding=1) by hand: x [Cin, H, W], weight OIHW -> [Cout, H, W]."""
    _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((weight.shape[0], h, w))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum(
                "oi,ihw->ohw", weight[:, :, dy, dx], padded[:, dy : dy + h, dx : dx + w]
            )
    return out + bias[:, None, None]


def random_torchvision_state_dict(seed):
    rng = np.random.default_rng(seed)
    state_dict, cin = {}, 3
    for layer, index in convert_vgg16.TORCHVISION_FEATURE_INDEX.items():
        cout = WIDTHS[int(layer[4]) - 1]
        state_dict[f"features.{index}.weight"] = rng.normal(size=(cout, cin, 3, 3)) / 3
        state_dict[f"features.{index}.bias"] = rng.normal(size=(cout,))
        cin = cout
    state_dict["classifier.0.weight"] = rng.normal(size=(2, 2))  # Ignored.
    return state_dict


def test_torchvision_conversion_matches_pytorch_convolution():
    state_dict = random_torchvision_state_dict(0)
    arrays = convert_vgg16.convert_torchvision_state_dict(state_dict)
    params = perceptual.arrays_to_params(arrays)
    np.testing.assert_array_equal(
        params["params"]["conv2_1"]["kernel"][1, 2, 3, 4],
        np.float32(state_dict["features.5.weight"][4, 3, 1, 2]),
    )
    np.testing.assert_allclose(params["mean"], perceptual.IMAGENET_MEAN)
    np.testing.assert_allclose(params["std"], perceptual.IMAGENET_STD)
    # relu1_2 by hand in PyTorch's layout equals the Flax module's.
    x = np.random.default_rng(1).normal(size=(6, 5, 3)).astype(np.float32)
    h = np.maximum(correlate_chw(x.transpose(2, 0, 1), *_torch_layer(state_dict, 0)), 0)
    h = np.maximum(correlate_chw(h, *_torch_layer(state_dict, 2)), 0)
    feats = perceptual.VGG16Features(WIDTHS).apply({"params": params["params"]}, x[None])
    np.testing.assert_allclose(feats[0][0], h.transpose(1, 2, 0), rtol=1e-4, atol=1e-4)


def _torch_layer(state_dict, index):
    return state_dict[f"features.{index}.weight"], state_dict[f"features.{index}.bias"]


def test_keras_conversion_reproduces_caffe_preprocessing():
    """(image - mean) / std with the converted conv1_1 equals Keras' BGR, mean-pixel input."""
    state_dict = random_torchvision_state_dict(2)
    layers = {
        convert_vgg16.keras_layer_name(layer): (
            state_dict[f"features.{index}.weight"].transpose(2, 3, 1, 0),  # Keras HWIO.
            state_dict[f"features.{index}.bias"],
        )
        for layer, index in convert_vgg16.TORCHVISION_FEATURE_INDEX.items()
    }
    arrays = convert_vgg16.convert_keras_layers(layers)
    params = perceptual.arrays_to_params(arrays)
    image = np.random.default_rng(3).uniform(size=(6, 5, 3))  # RGB in [0, 1].
    # Keras / Caffe: RGB -> BGR, 0-255, minus the BGR mean pixel.
    caffe = 255 * image[..., ::-1] - np.asarray(convert_vgg16.CAFFE_MEAN_BGR)
    kernel, bias = layers["block1_conv1"]
    expected = correlate_chw(caffe.transpose(2, 0, 1), kernel.transpose(3, 2, 0, 1), bias)
    ours = (image - params["mean"]) / params["std"]
    conv1_1 = params["params"]["conv1_1"]
    got = correlate_chw(
        ours.transpose(2, 0, 1), conv1_1["kernel"].transpose(3, 2, 0, 1), conv1_1["bias"]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(
        params["params"]["conv3_3"]["kernel"], np.float32(layers["block3_conv3"][0])
    )


def test_conversion_errors(tmp_path):
    state_dict = random_torchvision_state_dict(0)
    del state_dict["features.19.bias"]
    with pytest.raises(ValueError, match=r"features\.19\.bias.*conv4_2"):
        convert_vgg16.convert_torchvision_state_dict(state_dict)
    theano = {
        convert_vgg16.keras_layer_name(layer): (np.zeros((8, 8, 3, 3)), np.zeros(8))
        for layer in perceptual.VGG16_LAYERS
    }
    with pytest.raises(ValueError, match="th_dim_ordering"):
        convert_vgg16.convert_keras_layers(theano)
    other = tmp_path / "vgg16.onnx"
    other.write_text("")
    with pytest.raises(ValueError, match="torchvision .pth or a Keras .h5"):
        convert_vgg16.convert(str(other), str(tmp_path / "out.npz"))


def test_reading_pth_without_torch_says_what_to_install(tmp_path):
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed; the message for its absence cannot be seen")
    except ImportError:
        pass
    source = tmp_path / "vgg16-397923af.pth"
    source.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torch"):
        convert_vgg16.convert(str(source), str(tmp_path / "out.npz"))


def test_command_line_reports_missing_source(tmp_path):
    source = str(tmp_path / "vgg16-397923af.pth")
    result = subprocess.run(
        [sys.executable, "-m", "tusk_jax.convert_vgg16", f"--source={source}"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert result.returncode != 0
    assert f"--source file {source!r} does not exist" in result.stderr
