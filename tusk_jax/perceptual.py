"""Perceptual reconstruction loss with frozen VGG16 features (SPEC section 3).

This module owns the VGG16 feature extractor (the 10 conv layers of VGG16 up
to relu4_3, as a Flax Linen module), the `.npz` weight format and its loader,
and `perceptual_loss`. The weights cannot be downloaded by this project; make
the `.npz` once from the standard torchvision or Keras file with

    python -m tusk_jax.convert_vgg16 --source=vgg16-397923af.pth --output=vgg16.npz
    python -m tusk_jax.convert_vgg16 \
        --source=vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 --output=vgg16.npz

and name it in the config: `--config.loss.vgg16_weights=/path/to/vgg16.npz`.

The `.npz` format (float32 arrays, no pickles):
- `conv{b}_{i}/kernel`: `[3, 3, Cin, Cout]` (HWIO), `conv{b}_{i}/bias`: `[Cout]`,
  for conv1_1, conv1_2, conv2_1, conv2_2, conv3_1..conv3_3, conv4_1..conv4_3
  (VGG16's widths 64, 128, 256, 512; conv1_1 reads RGB).
- `mean`, `std`: `[3]` RGB, in units of [0, 1] pixel values: the network
  input is `(image - mean) / std`. torchvision weights use the ImageNet
  statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); Keras (Caffe)
  weights use mean (123.68, 116.779, 103.939) / 255 and std 1 / 255 (their
  BGR input order is folded into conv1_1 by the converter). Files without
  `mean`/`std` get the ImageNet statistics.

In memory the weights are a dict `{'params': {layer: {'kernel', 'bias'}},
'mean': [3], 'std': [3]}` (`VGG16Params`).

The loss: both images are normalised with `mean`/`std`, resized bilinearly
(`jax.image.resize`) so that the longer side is 224 pixels (aspect ratio kept,
shorter side rounded), and run through VGG16; the loss is the sum (the
reference; optionally the mean) over the four layers relu1_2, relu2_2,
relu3_3 and relu4_3 of the mean absolute difference of the features (mean
over batch, rows, columns and channels), so every layer has the same weight
whatever its size. The VGG weights get no
gradient (`lax.stop_gradient`).
"""

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

VGG16Params = dict[str, Any]

# Conv layer names of each VGG16 block up to relu4_3; a 2x2 max-pool precedes
# blocks 2-4. The output of the last conv of each block (after ReLU) is a
# perceptual feature: relu1_2, relu2_2, relu3_3, relu4_3.
VGG16_BLOCKS = (
    ("conv1_1", "conv1_2"),
    ("conv2_1", "conv2_2"),
    ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"),
)
VGG16_LAYERS = tuple(name for block in VGG16_BLOCKS for name in block)
VGG16_WIDTHS = (64, 128, 256, 512)
FEATURE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224

_HOW_TO_MAKE = (
    "Make it from the torchvision or Keras VGG16 weights with "
    "`python -m tusk_jax.convert_vgg16 --source=vgg16-397923af.pth --output=vgg16.npz` "
    "(or --source=vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5) and set "
    "config.loss.vgg16_weights to the .npz path; see tusk_jax/perceptual.py."
)


class VGG16Features(nn.Module):
    """VGG16 conv layers up to relu4_3: `[N, H, W, 3] -> 4 maps` at 1, 1/2, 1/4, 1/8 size.

    Attributes:
      widths: channels of blocks 1-4 (VGG16: 64, 128, 256, 512; tests use
        narrower random networks).
    """

    widths: Sequence[int] = VGG16_WIDTHS
    dtype: Any = jnp.float32  # Compute dtype (the parameters stay float32).

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        features = []
        for block, names in enumerate(VGG16_BLOCKS):
            if block:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for name in names:
                layer = nn.Conv(
                    self.widths[block], (3, 3), padding="SAME", dtype=self.dtype, name=name
                )
                x = nn.relu(layer(x))
            features.append(x)
        return features


def init_vgg16_params(key: jax.Array, widths: Sequence[int] = VGG16_WIDTHS) -> VGG16Params:
    """Random VGG16 weights in the `VGG16Params` layout (for tests; no pre-training).

    Args:
      key: PRNG key.
      widths: channels of the four blocks.

    Returns:
      `{'params': ..., 'mean': ImageNet mean [3], 'std': ImageNet std [3]}`.
    """
    variables = VGG16Features(tuple(widths)).init(key, jnp.zeros((1, 8, 8, 3), jnp.float32))
    return {
        "params": jax.tree.map(np.asarray, dict(variables["params"])),
        "mean": np.asarray(IMAGENET_MEAN, np.float32),
        "std": np.asarray(IMAGENET_STD, np.float32),
    }


def params_to_arrays(vgg_params: VGG16Params) -> dict[str, np.ndarray]:
    """Flattens `VGG16Params` to the `.npz` key names (`conv1_1/kernel`, ..., `mean`, `std`)."""
    arrays = {
        f"{layer}/{leaf}": np.asarray(vgg_params["params"][layer][leaf], np.float32)
        for layer in VGG16_LAYERS
        for leaf in ("kernel", "bias")
    }
    arrays["mean"] = np.asarray(vgg_params["mean"], np.float32)
    arrays["std"] = np.asarray(vgg_params["std"], np.float32)
    return arrays


def arrays_to_params(arrays: dict[str, np.ndarray], source: str = "arrays") -> VGG16Params:
    """Checks `.npz`-style arrays and builds `VGG16Params`.

    Args:
      arrays: `conv{b}_{i}/kernel` `[3, 3, Cin, Cout]`, `conv{b}_{i}/bias`
        `[Cout]` for every layer of `VGG16_LAYERS`; optional `mean`, `std` `[3]`.
      source: name used in error messages (the file path).

    Raises:
      ValueError: naming `source` and the key when a layer is missing or has a
        shape inconsistent with VGG16's layer chain.
    """
    params = {}
    in_channels = 3
    for block, names in enumerate(VGG16_BLOCKS):
        for name in names:
            for leaf in ("kernel", "bias"):
                if f"{name}/{leaf}" not in arrays:
                    raise ValueError(
                        f"VGG16 weights {source} have no array {name}/{leaf} (keys found: "
                        f"{sorted(arrays)[:6]}...). {_HOW_TO_MAKE}"
                    )
            kernel = np.asarray(arrays[f"{name}/kernel"], np.float32)
            bias = np.asarray(arrays[f"{name}/bias"], np.float32)
            if kernel.ndim != 4 or kernel.shape[:3] != (3, 3, in_channels):
                raise ValueError(
                    f"VGG16 weights {source}: {name}/kernel has shape {kernel.shape}, expected "
                    f"[3, 3, {in_channels}, Cout] (HWIO). {_HOW_TO_MAKE}"
                )
            if bias.shape != (kernel.shape[3],):
                raise ValueError(
                    f"VGG16 weights {source}: {name}/bias has shape {bias.shape}, expected "
                    f"[{kernel.shape[3]}]. {_HOW_TO_MAKE}"
                )
            if name.endswith("_1"):
                block_width = kernel.shape[3]
            elif kernel.shape[3] != block_width:
                raise ValueError(
                    f"VGG16 weights {source}: {name}/kernel has {kernel.shape[3]} outputs, the "
                    f"other convs of block {block + 1} have {block_width}. {_HOW_TO_MAKE}"
                )
            params[name] = {"kernel": kernel, "bias": bias}
            in_channels = kernel.shape[3]
    stats = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = np.asarray(arrays[key] if key in arrays else default, np.float32)
        if value.shape != (3,) or (key == "std" and np.any(value <= 0)):
            raise ValueError(
                f"VGG16 weights {source}: {key} must be 3 RGB values (std > 0), got {value}."
            )
        stats[key] = value
    return {"params": params, **stats}


def save_vgg16_params(path: str, vgg_params: VGG16Params) -> None:
    """Writes `VGG16Params` to an `.npz` file in the documented format."""
    with open(path, "wb") as f:
        np.savez(f, **params_to_arrays(vgg_params))


def load_vgg16_params(path: str | None) -> VGG16Params:
    """Loads VGG16 weights from an `.npz` made by `tusk_jax.convert_vgg16`.

    Args:
      path: the file (usually `config.loss.vgg16_weights`).

    Returns:
      `VGG16Params` (numpy float32 arrays).

    Raises:
      ValueError: if `path` is unset or the file is not a valid VGG16 `.npz`.
      FileNotFoundError: if the file does not exist.
      Each message names the path and the command that makes the file.
    """
    if not path:
        raise ValueError(
            "The perceptual loss needs VGG16 weights but config.loss.vgg16_weights is not "
            f"set. {_HOW_TO_MAKE}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG16 weights file {path!r} does not exist. {_HOW_TO_MAKE}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as e:  # np.load raises several types for non-npz files.
        raise ValueError(
            f"VGG16 weights file {path!r} is not a readable .npz ({e}). {_HOW_TO_MAKE}"
        ) from e
    params = arrays_to_params(arrays, source=repr(path))
    widths = tuple(params["params"][names[0]]["kernel"].shape[3] for names in VGG16_BLOCKS)
    if widths != VGG16_WIDTHS:
        logging.warning("VGG16 weights %s have block widths %s, not VGG16's.", path, widths)
    logging.info("Loaded VGG16 weights from %s (block widths %s).", path, widths)
    return params


def _widths(vgg_params: VGG16Params) -> tuple[int, ...]:
    return tuple(vgg_params["params"][names[0]]["kernel"].shape[-1] for names in VGG16_BLOCKS)


def resized_shape(height: int, width: int, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) scaled so that the longer side is `image_size` (rounded)."""
    scale = image_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def vgg16_features(
    vgg_params: VGG16Params,
    images: jax.Array,
    image_size: int = DEFAULT_IMAGE_SIZE,
    dtype: str = "float32",
) -> list[jax.Array]:
    """VGG16 features relu1_2, relu2_2, relu3_3, relu4_3 of images.

    Args:
      vgg_params: `VGG16Params` (gradients are stopped).
      images: `[B, H, W, 3]` RGB in [0, 1].
      image_size: longer side after the bilinear resize (224 as in the
        reference; smaller only to make tests fast).
      dtype: compute dtype of the convolutions ("float32" | "bfloat16").

    Returns:
      4 maps `[B, h / 2**l, w / 2**l, width_l]`, l = 0..3, (h, w) the resized
      size (pooling floors odd sizes).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}.")
    vgg_params = jax.lax.stop_gradient(vgg_params)
    x = (images - vgg_params["mean"]) / vgg_params["std"]
    h, w = resized_shape(images.shape[1], images.shape[2], image_size)
    x = jax.image.resize(x, (x.shape[0], h, w, 3), method="bilinear")
    model = VGG16Features(_widths(vgg_params), jnp.dtype(dtype))
    return model.apply({"params": vgg_params["params"]}, x)


# How the four layers' L1 terms combine: the reference sums them.
REDUCTIONS = ("sum", "mean")


def perceptual_loss(
    vgg_params: VGG16Params,
    x: jax.Array,
    y: jax.Array,
    image_size: int = DEFAULT_IMAGE_SIZE,
    reduction: str = "sum",
    dtype: str = "float32",
) -> jax.Array:
    """Sum (the reference) or mean over relu1_2, relu2_2, relu3_3, relu4_3 of the mean L1.

    Args:
      vgg_params: `VGG16Params`, frozen.
      x, y: `[B, H, W, 3]` RGB in [0, 1] (e.g. image and reconstruction).
      image_size: longer side after resizing (224).
      reduction: "sum" or "mean" over the four layers (`REDUCTIONS`).
      dtype: compute dtype of VGG16 (`model.dtype`); the L1 terms are float32.

    Returns:
      scalar float32: sum_l mean |V_l(x) - V_l(y)| ("sum"; "mean" divides by
      4); 0 iff the features agree.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}.")
    features = vgg16_features(vgg_params, jnp.concatenate([x, y], axis=0), image_size, dtype)
    batch = x.shape[0]
    features = [f.astype(jnp.float32) for f in features]
    per_layer = [jnp.mean(jnp.abs(f[:batch] - f[batch:])) for f in features]
    total = jnp.sum(jnp.stack(per_layer))
    return total if reduction == "sum" else total / len(per_layer)
