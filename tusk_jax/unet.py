"""The U-Net shared by TUSK's encoder and decoder (the reference's `UNet`), and its parts.

- `UNet`: `depth` resolutions with c, 2c, 4c, ... channels (c = `base_width`).
  Each stage is two [3x3 conv + GroupNorm + ReLU]; 2x2 max-pool between the
  down stages; the up path doubles the resolution bilinearly
  (`align_corners=True` by default, as the reference), concatenates
  [up-sampled, skip] on the channel axis and applies a stage of the skip's
  width; a final 1x1 conv gives the output channels. GroupNorm has
  min(`num_groups`, width) groups (32 in the reference).
- Conv kernels and biases start as PyTorch's defaults (uniform in
  +-1/sqrt(fan_in)) unless `init='lecun'` (Flax's LeCun-normal kernels, zero
  biases). GroupNorm epsilon is 1e-5 as in PyTorch.
- Mixed precision (`dtype`, see `compute_dtype`): convolutions, GroupNorm
  and up-sampling compute in that dtype; parameters stay float32 (Flax's
  `param_dtype`), GroupNorm statistics are reduced in float32, and the
  output is whatever the last conv gives (the callers cast it back).

Arrays are NHWC.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Conv initialisation: PyTorch's defaults (the reference) | Flax's defaults.
INITS = ("pytorch", "lecun")
# `model.dtype`: the networks' compute dtype (parameters are float32 either way).
DTYPES = ("float32", "bfloat16")
_GROUP_NORM_EPSILON = 1e-5  # PyTorch's default, used by the reference.


def compute_dtype(name: str) -> Any:
    """The jnp dtype of a `model.dtype` name (one of `DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"config model.dtype must be one of {DTYPES}, got {name!r}.")
    return jnp.dtype(name)


def stage_groups(num_groups: int, width: int) -> int:
    """GroupNorm groups of a U-Net stage of `width` channels: `num_groups` capped at the width."""
    return min(num_groups, width)


def pytorch_uniform(fan_in: int):
    """Initialiser uniform in +-1/sqrt(fan_in): PyTorch's default for conv kernels and biases."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(
    x: jax.Array, features: int, kernel: int, init: str, name: str, dtype: Any = jnp.float32
) -> jax.Array:
    """A `kernel` x `kernel` SAME conv of `x` `[..., Cin]`, initialised as `init` says (`INITS`).

    Called inside a compact method: the conv is a submodule `name` of the
    caller (the parameter tree depends on neither `init` nor `dtype`). It
    computes in `dtype` with float32 parameters.
    """
    initializers = {}
    if init == "pytorch":
        initializer = pytorch_uniform(x.shape[-1] * kernel * kernel)
        initializers = {"kernel_init": initializer, "bias_init": initializer}
    layer = nn.Conv(
        features, (kernel, kernel), padding="SAME", name=name, dtype=dtype, **initializers
    )
    return layer(x)


def group_norm(x: jax.Array, groups: int, name: str, dtype: Any = jnp.float32) -> jax.Array:
    """GroupNorm of `x` `[..., C]` with `groups` groups, PyTorch's epsilon, output in `dtype`."""
    return nn.GroupNorm(groups, epsilon=_GROUP_NORM_EPSILON, dtype=dtype, name=name)(x)


def check_image_size(height: int, width: int, depth: int) -> None:
    """Raises ValueError unless both image sides are divisible by 2**(depth - 1)."""
    factor = 2 ** (depth - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} (HxW) is not divisible by 2**(depth-1) = {factor} "
            f"for a U-Net of depth {depth} (config model.depth); resize or crop the images "
            "or lower the depth."
        )


class ConvStage(nn.Module):
    """Two [3x3 conv + GroupNorm + ReLU]: `[N, H, W, Cin] -> [N, H, W, features]`."""

    features: int
    num_groups: int
    init: str = "pytorch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups = stage_groups(self.num_groups, self.features)
        for i in range(2):
            x = conv(x, self.features, 3, self.init, name=f"conv{i}", dtype=self.dtype)
            x = nn.relu(group_norm(x, groups, name=f"norm{i}", dtype=self.dtype))
        return x


def _align_corners_matrix(size: int) -> np.ndarray:
    """`[2 size, size]` linear interpolation weights of 2x up-sampling with align_corners=True.

    Output sample i sits at input coordinate i (size - 1) / (2 size - 1): the
    first and last samples of both grids coincide (PyTorch's
    `Upsample(scale_factor=2, mode='bilinear', align_corners=True)`).
    """
    out = 2 * size
    position = np.arange(out) * (size - 1) / max(out - 1, 1)
    low = np.clip(np.floor(position).astype(int), 0, size - 1)
    high = np.minimum(low + 1, size - 1)
    frac = position - low
    matrix = np.zeros((out, size), np.float32)
    matrix[np.arange(out), low] += 1.0 - frac
    matrix[np.arange(out), high] += frac
    return matrix


def _align_corners_weights(size) -> jax.Array:
    """`_align_corners_matrix(size)`; traced with jnp where `size` is symbolic (`jax.export`).

    The traced matrix computes the positions in float32 rather than float64:
    its weights may differ from the numpy one's in the last bits.
    """
    if isinstance(size, int):
        return jnp.asarray(_align_corners_matrix(size))
    out = 2 * size
    index = jnp.arange(out, dtype=jnp.int32)
    size_value = jnp.asarray(size, jnp.int32)
    # Integer numerator first: integral positions (both ends) stay exact.
    position = (index * (size_value - 1)).astype(jnp.float32) / jnp.maximum(out - 1, 1).astype(
        jnp.float32
    )
    low = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, size_value - 1)
    high = jnp.minimum(low + 1, size_value - 1)
    frac = position - low.astype(jnp.float32)
    column = jnp.arange(size, dtype=jnp.int32)[None, :]
    return (1.0 - frac)[:, None] * (column == low[:, None]) + frac[:, None] * (
        column == high[:, None]
    )


def upsample2x(x: jax.Array, align_corners: bool = True) -> jax.Array:
    """Bilinear 2x up-sampling, `[N, H, W, C] -> [N, 2H, 2W, C]`, in the dtype of `x`.

    align_corners=True: the corner pixel centres of input and output coincide
    (the reference); False: half-pixel centres (`jax.image.resize`).
    """
    n, h, w, c = x.shape
    if not align_corners:
        return jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear").astype(x.dtype)
    rows = _align_corners_weights(h).astype(x.dtype)
    cols = _align_corners_weights(w).astype(x.dtype)
    return jnp.einsum("ph,qw,nhwc->npqc", rows, cols, x)


class UNet(nn.Module):
    """U-Net: `[N, H, W, Cin] -> [N, H, W, out_channels]` (no output activation).

    `depth` resolutions with `base_width * 2**level` channels at level
    0..depth-1; H and W must be divisible by 2**(depth - 1). Computes in
    `dtype` (the output too) with float32 parameters.
    """

    base_width: int
    depth: int
    out_channels: int
    num_groups: int
    init: str = "pytorch"
    align_corners: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_image_size(x.shape[1], x.shape[2], self.depth)
        skips = []
        for level in range(self.depth):
            width = self.base_width * 2**level
            x = ConvStage(width, self.num_groups, self.init, self.dtype, name=f"down{level}")(x)
            if level < self.depth - 1:
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for level in reversed(range(self.depth - 1)):
            x = jnp.concatenate([upsample2x(x, self.align_corners), skips[level]], axis=-1)
            width = self.base_width * 2**level
            x = ConvStage(width, self.num_groups, self.init, self.dtype, name=f"up{level}")(x)
        return conv(x, self.out_channels, 1, self.init, name="out", dtype=self.dtype)
