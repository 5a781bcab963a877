"""Restoring a trained run and detecting keypoints on arbitrary images.

This module owns the user-facing inference API:

    detector = inference.load("runs/tetrominoes")          # latest checkpoint
    found = detector.detect(images, num_keypoints=5)       # list, one per image
    found[0].keypoints, found[0].confidence, found[0].prototype, found[0].descriptors
    rebuilt = detector.reconstruct(images)                 # list of [H, W, 3]

and the checkpoint restoring shared with `tusk_jax.evaluate`:
`resolve_config` (the run's saved config, or a given one checked against it),
`restore_state` (the `TrainState` of a step, with the checkpoint's array
shapes checked against the model the config builds, so a checkpoint of
another config fails with a message and not an orbax trace, or worse, a
silent restore of the checkpoint's shapes).

Images: any count and size, `[H, W]`, `[H, W, 1]` or `[H, W, 3]`, uint8
(0..255) or float in [0, 1]; grayscale is repeated to RGB. The U-Net needs
sides divisible by 2**(depth - 1), so each image is padded at the bottom and
right (reflection) to the next multiple; the encoder runs on the padded image,
then the score and feature maps are cropped back to the image before the
keypoints are extracted. So keypoints are always inside the original image,
in its pixel coordinates ((x, y), pixel centres at integers, SPEC section 1):
no keypoint can sit in the padding, none has to be dropped or clipped. The
padding still changes the GroupNorm statistics of the maps a little, so a
padded image's keypoints can differ slightly from those of the same content
at a divisible size.

Any number of keypoints works at inference time: there is one score map, so
asking for more keypoints than were trained (multi-instance scenes, several
faces) takes more of its peaks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from numpy.typing import ArrayLike

from tusk_jax import checkpointing, config_lib, models, ops

# Config fields that must agree between a given config and the run's saved one:
# they decide the parameter shapes, the keypoint extraction or the image size
# the network was trained at.
CHECKED_DATASET_FIELDS = ("image_size",)


# ----------------------------------------------------------------------------
# Restoring a run.
# ----------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def config_differences(
    config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict
) -> list[str]:
    """The `model.*` and `dataset.image_size` fields on which two configs differ.

    Returns:
      One line per differing field, `"model.window: 5 (given) vs 11 (saved)"`;
      empty when the configs build the same network.
    """
    given = _flatten(config.model.to_dict(), "model")
    kept = _flatten(saved.model.to_dict(), "model")
    for field in CHECKED_DATASET_FIELDS:
        given[f"dataset.{field}"] = config.dataset.get(field)
        kept[f"dataset.{field}"] = saved.dataset.get(field)
    lines = []
    for name in sorted(set(given) | set(kept)):
        a, b = given.get(name, "<missing>"), kept.get(name, "<missing>")
        if a != b:
            lines.append(f"{name}: {a!r} (given) vs {b!r} (saved)")
    return lines


def resolve_config(
    workdir: str, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config to rebuild a run with: the saved one, or `config` checked against it.

    Args:
      workdir: a training workdir (holds `config.json`, see
        `config_lib.save_config`).
      config: optional config (e.g. from `--config`); its `model` fields and
        `dataset.image_size` must equal the saved ones (other fields, such as
        the data paths, are taken from it).

    Returns:
      An unlocked copy of the config to use.

    Raises:
      FileNotFoundError: `workdir` has no `config.json`.
      ValueError: `config` differs from the saved config in a model field
        ("checkpoint from another config").
    """
    saved = config_lib.load_config(workdir)
    if config is None:
        return ml_collections.ConfigDict(saved.to_dict())
    differences = config_differences(config, saved)
    if differences:
        raise ValueError(
            f"The checkpoint in {workdir!r} comes from another config: the given config "
            f"differs from {os.path.join(workdir, config_lib.CONFIG_FILE)} in\n  "
            + "\n  ".join(differences)
            + "\nEvaluate with the config the run was trained with (or omit --config)."
        )
    return ml_collections.ConfigDict(config.to_dict())


# Moved to checkpointing (training checks its checkpoints the same way); kept for callers.
check_checkpoint_matches = checkpointing.check_state_matches


def state_template(config: ml_collections.ConfigDict):
    """A host `TrainState` of zeros with the shapes `config` builds (no compilation)."""
    # Imported here: train pulls in the input pipeline, which inference does not need.
    from tusk_jax import train

    model = models.TUSK(config.model)
    abstract = jax.eval_shape(lambda: train.create_train_state(config, model))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def restore_state(
    workdir: str, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[Any, int]:
    """Restores the `TrainState` of `step` (default: the latest) of a run.

    Args:
      workdir: the training workdir.
      config: the run's config (see `resolve_config`).
      step: checkpoint step; None: the latest.

    Returns:
      `(state, step)`: the host `TrainState` (numpy leaves) and its step.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`, or none at `step`.
      ValueError: the checkpoint's arrays do not fit the model of `config`.
    """
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoint in {workdir!r}: {directory} does not exist. Train first with "
            f"python -m tusk_jax.main --config=... --workdir={workdir}."
        )
    manager = checkpointing.create_manager(workdir, use_async=False)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint in {workdir!r}: {directory} holds no complete step."
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {workdir!r}; available steps: {steps}."
            )
        template = state_template(config)
        check_checkpoint_matches(manager, step, template, workdir)
        restored = checkpointing.restore(manager, template, step)
    finally:
        manager.close()
    state, _, step = restored
    logging.info("Restored step %d from %s.", step, directory)
    return state, int(step)


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
    """Smallest multiple of `multiple` that is >= `size`."""
    return -(-size // multiple) * multiple


def pad_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pads `[h, w, 3]` at the bottom and right to `[height, width, 3]` by reflection.

    Pixel (x, y) keeps its coordinates. A side of one pixel (nothing to
    reflect) is repeated instead.
    """
    h, w = image.shape[:2]
    pad = ((0, height - h), (0, width - w), (0, 0))
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(image, pad, mode=mode)


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear (antialiased) resize of `[H, W, 3]` by `scale` (sides rounded, >= 1 px).

    Pixel centres map as x' = (x + 0.5) * W' / W - 0.5 (half-pixel centres).
    """
    h, w = image.shape[:2]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return image
    resized = jax.image.resize(jnp.asarray(image), size + (3,), "linear", antialias=True)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


# ----------------------------------------------------------------------------
# The detector.
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


class Detector:
    """A trained TUSK model ready to detect keypoints (see the module docstring).

    Attributes:
      config: the run's config.
      model: the `models.TUSK` module.
      variables: flax variables `{'params': ...}`.
      prototypes: `[M, C]` float32, L2-normalised.
      step: the checkpoint step (None if built from memory).
      workdir: the run's workdir (None if built from memory).
      batch_size: images per network call.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: Any,
        prototypes: ArrayLike,
        step: int | None = None,
        batch_size: int = 16,
        workdir: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.config = config
        self.model = models.TUSK(config.model)
        self.update(variables, prototypes, step)
        self.workdir = workdir
        self.batch_size = int(batch_size)
        self.pad_multiple = 2 ** (config.model.depth - 1)
        self._run = jax.jit(
            self._forward, static_argnames=("height", "width", "num_keypoints", "decode")
        )
        self._apply = jax.jit(self._apply_fn, static_argnames=("num_keypoints",))
        self._render = jax.jit(self._render_fn, static_argnames=("size",))

    def update(self, variables: Any, prototypes: ArrayLike, step: int | None = None) -> None:
        """Swaps in new weights of the same shapes (e.g. during training) without recompiling."""
        self.variables = jax.device_put(variables)
        prototypes = np.asarray(prototypes, np.float32)
        self.prototypes = prototypes / np.maximum(
            np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12
        )
        # The jitted bodies take the weights as an argument, never as constants.
        self._weights = (self.variables, jnp.asarray(self.prototypes))
        self.step = step

    @property
    def num_keypoints(self) -> int:
        """K the model was trained with."""
        return int(self.config.model.num_keypoints)

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[0])

    # -- jitted bodies ---------------------------------------------------------

    @staticmethod
    def _nearest(descriptors, prototypes):
        b, k, c = descriptors.shape
        ids = ops.nearest_prototype(descriptors.reshape(b * k, c), prototypes)
        return ids.reshape(b, k)

    def _forward(self, weights, images, *, height, width, num_keypoints, decode):
        variables, prototypes = weights
        model = self.model
        score_map, feature_map = model.apply(variables, images, method=models.TUSK.encode)
        score_map = score_map[:, :height, :width]
        feature_map = feature_map[:, :height, :width]
        out = model.apply(
            variables, score_map, feature_map, num_keypoints, method=models.TUSK.extract
        )
        out["prototype"] = self._nearest(out["descriptors"], prototypes)
        if decode:
            decoded = model.apply(
                variables,
                out["keypoints"],
                out["confidence"],
                out["descriptors"],
                images.shape[1],
                images.shape[2],
                method=models.TUSK.decode,
            )
            for name, value in decoded.items():
                out[name] = (
                    value[:, :height, :width]
                    if name == "reconstruction"
                    else value[:, :, :height, :width]
                )
        return out

    def _apply_fn(self, weights, images, *, num_keypoints):
        variables, prototypes = weights
        out = self.model.apply(variables, images, num_keypoints=num_keypoints)
        out["prototype"] = self._nearest(out["descriptors"], prototypes)
        return out

    def _render_fn(self, weights, descriptors, confidence, *, size):
        variables, _ = weights
        m = descriptors.shape[0]
        centre = (size - 1) / 2.0
        keypoints = jnp.full((m, 1, 2), centre, jnp.float32)
        return self.model.apply(
            variables,
            keypoints,
            jnp.full((m, 1), confidence, jnp.float32),
            descriptors[:, None, :],
            size,
            size,
            method=models.TUSK.decode,
        )

    # -- batching ----------------------------------------------------------------

    def _batched(self, images: list[np.ndarray], num_keypoints: int, decode: bool) -> list[dict]:
        """Runs `_forward` on images grouped by size; returns per-image numpy dicts."""
        results: list[dict | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            h, w = image.shape[:2]
            if h * w < num_keypoints:
                raise ValueError(
                    f"images[{index}] ({h}x{w}) has fewer pixels than num_keypoints="
                    f"{num_keypoints}."
                )
            groups.setdefault((h, w), []).append(index)
        for (h, w), indices in groups.items():
            hp, wp = padded_size(h, self.pad_multiple), padded_size(w, self.pad_multiple)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                # Batches padded to a power of two (<= batch_size): few compilations.
                rows = min(1 << (len(chunk) - 1).bit_length(), self.batch_size)
                batch = np.zeros((rows, hp, wp, 3), np.float32)
                for row, index in enumerate(chunk):
                    batch[row] = pad_image(images[index], hp, wp)
                out = jax.device_get(
                    self._run(
                        self._weights,
                        batch,
                        height=h,
                        width=w,
                        num_keypoints=num_keypoints,
                        decode=decode,
                    )
                )
                for row, index in enumerate(chunk):
                    results[index] = {name: value[row] for name, value in out.items()}
        return results

    def resolve_num_keypoints(self, num_keypoints: int | None) -> int:
        """`num_keypoints` checked (a positive int), or the trained K for None."""
        k = self.num_keypoints if num_keypoints is None else num_keypoints
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_keypoints must be a positive int, got {num_keypoints!r}.")
        return int(k)

    # -- public API --------------------------------------------------------------

    def detect(
        self,
        images: ArrayLike | Sequence[ArrayLike],
        num_keypoints: int | None = None,
        min_confidence: float = 0.0,
        scale: float = 1.0,
    ) -> list[Detections]:
        """Keypoints, confidences, prototype ids and descriptors of each image.

        Args:
          images: one image, a list of images (any sizes) or a batch
            `[B, H, W, C]`; see `as_image_list` for dtypes and channels.
          num_keypoints: K, the number of score-map peaks taken per image; any
            positive int up to H * W (None: the trained K).
          min_confidence: keypoints with a lower confidence are left out.
          scale: images are resized by this factor (bilinear) before the
            network, e.g. to bring objects to the training scale; keypoints are
            mapped back to the given image's pixels.

        Returns:
          One `Detections` per image, in order (a single image gives a list of
          one), with at most K keypoints inside each image.
        """
        k = self.resolve_num_keypoints(num_keypoints)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}.")
        originals = as_image_list(images)
        inputs = [resize_image(image, scale) for image in originals] if scale != 1 else originals
        outputs = self._batched(inputs, k, decode=False)
        found = []
        for original, network_input, out in zip(originals, inputs, outputs, strict=True):
            keypoints = np.asarray(out["keypoints"], np.float32)
            if network_input.shape != original.shape:
                ratio = np.array(
                    [
                        original.shape[1] / network_input.shape[1],
                        original.shape[0] / network_input.shape[0],
                    ],
                    np.float32,
                )
                keypoints = (keypoints + 0.5) * ratio - 0.5
            confidence = np.asarray(out["confidence"], np.float32)
            keep = confidence >= min_confidence
            found.append(
                Detections(
                    keypoints=keypoints[keep],
                    confidence=confidence[keep],
                    prototype=np.asarray(out["prototype"], np.int32)[keep],
                    descriptors=np.asarray(out["descriptors"], np.float32)[keep],
                )
            )
        return found

    def reconstruct(
        self,
        images: ArrayLike | Sequence[ArrayLike],
        num_keypoints: int | None = None,
        return_layers: bool = False,
    ) -> list[np.ndarray] | list[dict[str, np.ndarray]]:
        """The decoder's rebuild of each image from its keypoints alone.

        The image is padded as for `detect`, keypoints are found in the image,
        the decoder renders the padded canvas and the result is cropped back.

        Args:
          images: as for `detect`.
          num_keypoints: K (None: the trained K).
          return_layers: also return the per-keypoint layers (alpha mode).

        Returns:
          One float32 `[H, W, 3]` reconstruction in [0, 1] per image; with
          `return_layers`, one dict per image with `reconstruction`,
          `keypoints` `[K, 2]`, `confidence` `[K]`, `prototype` `[K]` and, in
          alpha mode, `rgb` `[K, H, W, 3]` and `alpha` `[K, H, W]`.
        """
        k = self.resolve_num_keypoints(num_keypoints)
        outputs = self._batched(as_image_list(images), k, decode=True)
        if not return_layers:
            return [np.asarray(out["reconstruction"]) for out in outputs]
        keep = ("reconstruction", "keypoints", "confidence", "prototype", "rgb", "alpha")
        return [{n: np.asarray(v) for n, v in out.items() if n in keep} for out in outputs]

    def apply(self, images: ArrayLike, num_keypoints: int | None = None) -> dict[str, np.ndarray]:
        """The full model on a batch of network-ready images (no padding).

        Args:
          images: `[B, H, W, 3]` float32 in [0, 1], H and W divisible by
            2**(depth - 1) (e.g. an evaluation batch).
          num_keypoints: K (None: the trained K).

        Returns:
          The `models.TUSK` outputs as numpy arrays plus `prototype` `[B, K]`
          int32, the nearest prototype of each keypoint.
        """
        k = self.resolve_num_keypoints(num_keypoints)
        images = np.asarray(images, np.float32)
        return jax.device_get(self._apply(self._weights, images, num_keypoints=k))

    def render_prototypes(
        self, size: int | None = None, confidence: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Each prototype rendered alone: one keypoint at the image centre.

        Args:
          size: square canvas side in pixels (None: the training image size;
            rounded up to a multiple of 2**(depth - 1)).
          confidence: the keypoint's confidence (scales its splat).

        Returns:
          dict with `reconstruction` `[M, S, S, 3]` in [0, 1] (alpha mode:
          with a single keypoint alpha is 1 everywhere, so this is its RGB
          layer) and, in alpha mode, `rgb` `[M, 1, S, S, 3]`, `alpha`.
        """
        size = int(self.config.dataset.image_size if size is None else size)
        size = padded_size(size, self.pad_multiple)
        renders = []
        for start in range(0, self.num_prototypes, self.batch_size):
            chunk = self.prototypes[start : start + self.batch_size]
            rows = self.batch_size
            batch = np.zeros((rows, chunk.shape[1]), np.float32)
            batch[: len(chunk)] = chunk
            out = jax.device_get(self._render(self._weights, batch, confidence, size=size))
            renders.append({n: v[: len(chunk)] for n, v in out.items()})
        return {n: np.concatenate([r[n] for r in renders]) for n in renders[0]}


def load(
    workdir: str,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    batch_size: int = 16,
) -> Detector:
    """A `Detector` from a training workdir.

    Args:
      workdir: the run's workdir (`config.json` and `checkpoints/`).
      step: checkpoint step; None: the latest.
      config: optional config, checked against the saved one (see
        `resolve_config`); None: the saved config.
      batch_size: images per network call.

    Raises:
      FileNotFoundError: not a workdir, or no checkpoint (at `step`).
      ValueError: the checkpoint comes from another config.
    """
    config = resolve_config(workdir, config)
    state, step = restore_state(workdir, config, step)
    return Detector(
        config, state.params, state.prototypes, step=step, batch_size=batch_size, workdir=workdir
    )
