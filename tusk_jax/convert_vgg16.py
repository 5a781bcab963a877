r"""Converts standard VGG16 weights to the `.npz` read by `tusk_jax.perceptual`.

The perceptual loss (SPEC section 3) needs ImageNet-trained VGG16 weights,
which this project cannot download. Get one of these files by hand and
convert it once:

1. torchvision (needs `pip install torch`): the state_dict
   `vgg16-397923af.pth`, downloaded by `torchvision.models.vgg16(weights=
   "IMAGENET1K_V1")` into `~/.cache/torch/hub/checkpoints/` or from
   https://download.pytorch.org/models/vgg16-397923af.pth :

       python -m tusk_jax.convert_vgg16 --source=vgg16-397923af.pth --output=vgg16.npz

   Keys `features.{0,2,5,7,10,12,14,17,19,21}.{weight,bias}` become
   conv1_1 ... conv4_3; kernels go from PyTorch's OIHW to Flax's HWIO
   (`transpose(2, 3, 1, 0)`, no spatial flip: both frameworks compute a
   cross-correlation); input statistics are ImageNet's mean / std.

2. Keras (needs `pip install h5py`): `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`,
   downloaded by `keras.applications.VGG16(include_top=False)` into
   `~/.keras/models/`:

       python -m tusk_jax.convert_vgg16 \
           --source=vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 --output=vgg16.npz

   Groups `block{b}_conv{i}` become conv{b}_{i}; kernels are already HWIO.
   These Caffe-trained weights expect BGR input in 0-255 minus the mean
   pixel (103.939, 116.779, 123.68): the converter reverses conv1_1's input
   channels to RGB and stores mean = (123.68, 116.779, 103.939) / 255 and
   std = 1/255, so `(image - mean) / std` feeds exactly what Keras fed.
   (`th_dim_ordering` files, with flipped Theano kernels, are refused.)

The output holds only the 10 conv layers up to relu4_3; its format is
documented in `tusk_jax/perceptual.py`. Set `config.loss.vgg16_weights` to it.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from tusk_jax import cli, perceptual

# torchvision `vgg16().features` indices of the conv layers up to relu4_3.
TORCHVISION_FEATURE_INDEX = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
}
# Keras' Caffe preprocessing: mean pixel in BGR order, 0-255 units.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def keras_layer_name(layer: str) -> str:
    """`conv3_2` -> Keras' `block3_conv2`."""
    block, index = layer[len("conv") :].split("_")
    return f"block{block}_conv{index}"


def convert_torchvision_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision VGG16 state_dict (numpy values) -> `.npz` arrays.

    Args:
      state_dict: `features.{i}.weight` `[Cout, Cin, 3, 3]` (OIHW) and
        `features.{i}.bias` `[Cout]`; other keys (the classifier) are ignored.

    Returns:
      dict of the `tusk_jax.perceptual` `.npz` format: `conv{b}_{i}/kernel`
      `[3, 3, Cin, Cout]` (HWIO), `conv{b}_{i}/bias`, `mean`, `std` (ImageNet).

    Raises:
      ValueError: if a key is missing or a weight is not 4-D.
    """
    arrays = {}
    for layer, index in TORCHVISION_FEATURE_INDEX.items():
        for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
            key = f"features.{index}.{suffix}"
            if key not in state_dict:
                raise ValueError(
                    f"state_dict has no {key!r} (for {layer}); expected torchvision's "
                    "vgg16-397923af.pth."
                )
            value = np.asarray(state_dict[key], np.float32)
            if leaf == "kernel":
                if value.ndim != 4:
                    raise ValueError(f"{key} has shape {value.shape}, expected [Cout, Cin, 3, 3].")
                value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
            arrays[f"{layer}/{leaf}"] = value
    arrays["mean"] = np.asarray(perceptual.IMAGENET_MEAN, np.float32)
    arrays["std"] = np.asarray(perceptual.IMAGENET_STD, np.float32)
    return arrays


def convert_keras_layers(layers: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """Keras VGG16 (tf dim ordering) layer weights -> `.npz` arrays.

    Args:
      layers: `block{b}_conv{i}` -> (kernel `[3, 3, Cin, Cout]` HWIO, bias
        `[Cout]`); other layers are ignored.

    Returns:
      dict of the `tusk_jax.perceptual` `.npz` format, conv1_1's input
      channels reordered BGR -> RGB and the Caffe statistics as mean / std.

    Raises:
      ValueError: if a layer is missing or a kernel is not `[3, 3, Cin, Cout]`.
    """
    arrays = {}
    for layer in perceptual.VGG16_LAYERS:
        name = keras_layer_name(layer)
        if name not in layers:
            raise ValueError(f"Keras weights have no layer {name!r} (for {layer}).")
        kernel, bias = (np.asarray(w, np.float32) for w in layers[name])
        if kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
            raise ValueError(
                f"{name} kernel has shape {kernel.shape}, expected [3, 3, Cin, Cout]; use the "
                "tf_dim_ordering file, not th_dim_ordering."
            )
        if layer == "conv1_1":
            kernel = kernel[:, :, ::-1, :]  # Inputs BGR -> RGB.
        arrays[f"{layer}/kernel"] = np.ascontiguousarray(kernel)
        arrays[f"{layer}/bias"] = bias
    arrays["mean"] = np.asarray(CAFFE_MEAN_BGR[::-1], np.float32) / 255.0
    arrays["std"] = np.full((3,), 1.0 / 255.0, np.float32)
    return arrays


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state_dict file into numpy (imports torch lazily)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs PyTorch: `pip install torch` (CPU build is enough)."
        ) from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in state_dict.items()}


def read_keras_h5(path: str) -> dict[str, list[np.ndarray]]:
    """Reads the conv layers of a Keras VGG16 `.h5` into `{layer: [kernel, bias]}` (lazy h5py)."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError(f"Reading {path} needs h5py: `pip install h5py`.") from e
    layers = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for layer in perceptual.VGG16_LAYERS:
            name = keras_layer_name(layer)
            if name not in root:
                continue
            datasets = []

            def collect(_, obj, found=datasets):
                if isinstance(obj, h5py.Dataset):
                    found.append(np.asarray(obj))

            root[name].visititems(collect)
            kernels = [d for d in datasets if d.ndim == 4]
            biases = [d for d in datasets if d.ndim == 1]
            if len(kernels) != 1 or len(biases) != 1:
                raise ValueError(f"{path}: layer {name} does not hold one kernel and one bias.")
            layers[name] = [kernels[0], biases[0]]
    return layers


def convert(source: str, output: str) -> dict[str, np.ndarray]:
    """Converts `source` (`.pth`/`.pt` torchvision or `.h5` Keras) and writes `output` (.npz)."""
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--source file {source!r} does not exist.")
    extension = os.path.splitext(source)[1].lower()
    if extension in (".pth", ".pt"):
        arrays = convert_torchvision_state_dict(read_torch_state_dict(source))
    elif extension in (".h5", ".hdf5"):
        arrays = convert_keras_layers(read_keras_h5(source))
    else:
        raise ValueError(
            f"--source {source!r}: expected a torchvision .pth or a Keras .h5 VGG16 file."
        )
    perceptual.arrays_to_params(arrays, source=repr(source))  # Checks the layer chain.
    with open(output, "wb") as f:
        np.savez(f, **arrays)
    logging.info("Wrote %d VGG16 arrays from %s to %s.", len(arrays), source, output)
    return arrays


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    convert(flags.FLAGS.source, flags.FLAGS.output)


if __name__ == "__main__":
    # Flags are defined here, not at import, so importing this module from
    # tests or the trainer adds no global flags.
    flags.DEFINE_string("source", None, "vgg16-397923af.pth (torchvision) or Keras .h5 file.")
    flags.DEFINE_string("output", "vgg16.npz", "Output .npz for config.loss.vgg16_weights.")
    flags.mark_flag_as_required("source")
    app.run(main)
