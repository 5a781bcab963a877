"""Images in, detections out: the part of the detector API that needs only numpy and jax.

This module owns what `tusk_jax.inference.Detector` (the model in process)
and `tusk_jax.exported.ExportedDetector` (a `jax.export` artifact, loaded
without flax) share, so that both read images and report keypoints alike:

- images in: `as_rgb_float` / `as_image_list` (any count and size, `[H, W]`,
  `[H, W, 1]` or `[H, W, 3]`, uint8 0..255 or float in [0, 1], grey repeated
  to RGB), `pad_to_multiple` / `padded_size` (reflection padding for the U-Net,
  run inside the network program),
  `resize_image` / `resize_to` (bilinear, antialiased), `stack_batch` (images
  to a network batch of few distinct sizes);
- running: `run_by_size` (a network program on images grouped by size) and
  `detect_images` (`detect`'s body: `scale`, the program, `to_detections`),
  so both detectors pre- and post-process alike by construction;
- detections out: `Detections` (one image's keypoints, confidences,
  prototype ids, descriptors) and `to_detections` (a network output mapped
  back to the given image's pixels, weak keypoints dropped).

Keypoints are (x, y) pixels with pixel centres at integers (SPEC section 1).
It must import nothing but numpy, jax and the standard library: the exported
detector's loader depends on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

# ----------------------------------------------------------------------------
# Images in.
# ----------------------------------------------------------------------------


def as_rgb_float(image: ArrayLike, name: str = "image") -> np.ndarray:
    """One image -> float32 `[H, W, 3]` in [0, 1].

    Args:
      image: `[H, W]`, `[H, W, 1]` or `[H, W, 3]`; uint8 (0..255) or float in
        [0, 1] (values within 1e-3 outside are clipped).
      name: named in error messages.

    Raises:
      ValueError: other ranks, channel counts, dtypes or value ranges.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be [H, W], [H, W, 1] or [H, W, 3], got shape {array.shape}.")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {array.shape}.")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} has non-finite values.")
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise ValueError(
                f"{name}: float images must be in [0, 1], got values in [{low:g}, {high:g}] "
                "(pass uint8 for 0..255)."
            )
        array = np.clip(array, 0.0, 1.0)
    else:
        raise ValueError(f"{name} must be uint8 or float, got dtype {array.dtype}.")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def as_image_list(images: ArrayLike | Sequence[ArrayLike]) -> list[np.ndarray]:
    """Images in any accepted form -> list of float32 `[H, W, 3]`.

    A list or tuple holds images (sizes may differ); a 4-D array is a batch
    `[B, H, W, C]`; a 2-D or 3-D array is one image.
    """
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        array = np.asarray(images)
        items = list(array) if array.ndim == 4 else [array]
    return [as_rgb_float(image, f"images[{i}]") for i, image in enumerate(items)]


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= `size` (an int, or a symbolic dimension)."""
    return -(-size // multiple) * multiple


def reflection_indices(size, padded: int | None = None) -> jax.Array:
    """Source indices that pad `size` rows (or columns) at the end to `padded` by reflection.

    Index i < size is i itself; beyond, the rows mirror about the last one
    (numpy's `np.pad(mode="reflect")`, repeating the reflection when the pad
    is longer than the image); a side of one pixel (nothing to reflect) is
    repeated. `size` and `padded` may be symbolic (`jax.export` shape
    polymorphism).

    Args:
      size: the side in pixels (>= 1).
      padded: the padded side (>= size); None: `size`.

    Returns:
      int32 `[padded]`.
    """
    index = jnp.arange(size if padded is None else padded, dtype=jnp.int32)
    size = jnp.asarray(size, jnp.int32)
    period = jnp.maximum(2 * (size - 1), 1)
    folded = index % period
    return jnp.where(folded < size, folded, period - folded)


def pad_to_multiple(images: jax.Array, multiple: int) -> jax.Array:
    """Pads `[B, h, w, C]` at the bottom and right to sides divisible by `multiple`.

    The pad is `reflection_indices`'s; pixel (x, y) keeps its coordinates.
    Traceable with symbolic h, w (the padded sides are then symbolic
    multiples of `multiple`), which is how the exported detector serves any
    image size with the in-process detector's padding.

    Returns:
      `[B, padded_size(h), padded_size(w), C]`, the input if no pad is needed.
    """
    height, width = images.shape[1], images.shape[2]
    padded_height, padded_width = padded_size(height, multiple), padded_size(width, multiple)
    if (padded_height, padded_width) == (height, width):
        return images
    images = jnp.take(images, reflection_indices(height, padded_height), axis=1)
    return jnp.take(images, reflection_indices(width, padded_width), axis=2)


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of `[h, w, 3]` in [0, 1] to `[height, width, 3]`.

    Each axis is scaled on its own (the aspect ratio changes if the sizes'
    ratios differ). Pixel centres map as x' = (x + 0.5) * width / w - 0.5
    (half-pixel centres), the inverse of `rescale_keypoints`. An image of the
    size already is returned as it is.
    """
    if image.shape[:2] == (height, width):
        return image
    resized = jax.image.resize(jnp.asarray(image), (height, width, 3), "linear", antialias=True)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """`resize_to` by a factor: `[H, W, 3]` -> sides round(H * scale), round(W * scale) (>= 1)."""
    h, w = image.shape[:2]
    return resize_to(image, max(1, round(h * scale)), max(1, round(w * scale)))


def stack_batch(images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Images of one size `[H, W, 3]` -> a float32 batch `[R, H, W, 3]`, zero rows after them.

    R is the number of images rounded up to a power of two, at most
    `batch_size` (so a jitted network compiles for few batch sizes); the
    images must number at most `batch_size`.
    """
    count = len(images)
    if not 1 <= count <= batch_size:
        raise ValueError(f"stack_batch takes 1 to batch_size={batch_size} images, got {count}.")
    rows = min(1 << (count - 1).bit_length(), batch_size)
    batch = np.zeros((rows, *images[0].shape), np.float32)
    batch[:count] = np.stack(images)
    return batch


# ----------------------------------------------------------------------------
# Running a network program on images of many sizes.
# ----------------------------------------------------------------------------


def run_by_size(
    images: Sequence[np.ndarray],
    program: Callable[[np.ndarray], Mapping[str, ArrayLike]],
    batch_size: int,
    num_keypoints: int,
) -> list[dict[str, np.ndarray]]:
    """`program` on images grouped by size, in batches of `stack_batch`; one dict per image.

    Args:
      images: float32 `[h, w, 3]` each, any sizes.
      program: a batch `[R, h, w, 3]` -> dict of `[R, ...]` arrays (the
        network at the batch's own size: `inference.Detector`'s jitted body
        or an exported detector's program).
      batch_size: images per call (see `stack_batch`).
      num_keypoints: K; every image needs at least K pixels.

    Returns:
      One numpy dict per image, in order.

    Raises:
      ValueError: an image has fewer pixels than K (named by its index).
    """
    results: list[dict | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        h, w = image.shape[:2]
        if h * w < num_keypoints:
            raise ValueError(
                f"images[{index}] ({h}x{w}) has fewer pixels than num_keypoints={num_keypoints}."
            )
        groups.setdefault((h, w), []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            out = jax.device_get(program(stack_batch([images[i] for i in chunk], batch_size)))
            for row, index in enumerate(chunk):
                results[index] = {name: value[row] for name, value in out.items()}
    return results


def detect_images(
    images: ArrayLike | Sequence[ArrayLike],
    run: Callable[[list[np.ndarray]], list[Mapping[str, ArrayLike]]],
    min_confidence: float = 0.0,
    scale: float = 1.0,
) -> list[Detections]:
    """`Detector.detect`'s body: images read, resized by `scale`, run, mapped back.

    Args:
      images: as `as_image_list` takes them.
      run: float32 images `[h, w, 3]` -> one network output dict per image
        (`run_by_size` of a program), keypoints in the pixels of the image it
        was given.
      min_confidence: keypoints with a lower confidence are left out.
      scale: each image is resized by this factor (`resize_image`) before
        `run`; the keypoints are mapped back to the given image's pixels.

    Returns:
      One `Detections` per image, in order.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}.")
    originals = as_image_list(images)
    inputs = [resize_image(image, scale) for image in originals] if scale != 1 else originals
    outputs = run(inputs)
    return [
        to_detections(out, network_input.shape[:2], original.shape[:2], min_confidence)
        for original, network_input, out in zip(originals, inputs, outputs, strict=True)
    ]


# ----------------------------------------------------------------------------
# Detections out.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Detections:
    """The keypoints found in one image.

    Attributes:
      keypoints: `[N, 2]` float32 (x, y) pixels of the image as given (pixel
        centres at integers), best first (decreasing peak score).
      confidence: `[N]` float32 in [0, 1], the score map at each keypoint.
      prototype: `[N]` int32, the nearest prototype of each descriptor.
      descriptors: `[N, C]` float32, unit L2 norm.
    """

    keypoints: np.ndarray
    confidence: np.ndarray
    prototype: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    def to_json(self) -> list[dict]:
        """One dict per keypoint: x, y, confidence, prototype, descriptor (plain Python)."""
        return [
            {
                "x": float(xy[0]),
                "y": float(xy[1]),
                "confidence": float(c),
                "prototype": int(p),
                "descriptor": [float(v) for v in d],
            }
            for xy, c, p, d in zip(
                self.keypoints, self.confidence, self.prototype, self.descriptors, strict=True
            )
        ]


def rescale_keypoints(
    keypoints: ArrayLike, from_size: tuple[int, int], to_size: tuple[int, int]
) -> np.ndarray:
    """(x, y) pixels of an image of `from_size` -> those of the same image resized to `to_size`.

    Args:
      keypoints: `[N, 2]` (x, y) pixels, pixel centres at integers.
      from_size, to_size: (height, width) in pixels.

    Returns:
      `[N, 2]` float32, x' = (x + 0.5) * W' / W - 0.5 (and y alike): pixel
      edges map to pixel edges, as in `resize_to`.
    """
    keypoints = np.asarray(keypoints, np.float32)
    if tuple(from_size) == tuple(to_size):
        return keypoints
    ratio = np.array([to_size[1] / from_size[1], to_size[0] / from_size[0]], np.float32)
    return (keypoints + 0.5) * ratio - 0.5


def to_detections(
    out: Mapping[str, ArrayLike],
    network_size: tuple[int, int],
    image_size: tuple[int, int],
    min_confidence: float = 0.0,
) -> Detections:
    """One image's network output -> `Detections` in the given image's pixels.

    Args:
      out: `keypoints` `[K, 2]` (x, y) pixels of the network input,
        `confidence` `[K]`, `prototype` `[K]`, `descriptors` `[K, C]`.
      network_size: (height, width) of the image the network saw.
      image_size: (height, width) of the image as given.
      min_confidence: keypoints with a lower confidence are left out.
    """
    confidence = np.asarray(out["confidence"], np.float32)
    keep = confidence >= min_confidence
    keypoints = rescale_keypoints(out["keypoints"], network_size, image_size)
    return Detections(
        keypoints=keypoints[keep],
        confidence=confidence[keep],
        prototype=np.asarray(out["prototype"], np.int32)[keep],
        descriptors=np.asarray(out["descriptors"], np.float32)[keep],
    )
