"""Detecting keypoints on arbitrary images with a trained run (the user-facing API).

    detector = inference.load("runs/tetrominoes")          # latest checkpoint
    found = detector.detect(images, num_keypoints=5)       # list, one per image
    found[0].keypoints, found[0].confidence, found[0].prototype, found[0].descriptors
    rebuilt = detector.reconstruct(images)                 # list of [H, W, 3]

Images: any count and size, `[H, W]`, `[H, W, 1]` or `[H, W, 3]`, uint8
(0..255) or float in [0, 1]; grayscale is repeated to RGB (the input handling
and `Detections` live in `tusk_jax.detection_io`, shared with the exported
detector of `tusk_jax.exported`). Each image is padded at the bottom and right
(reflection) to a multiple of 2**(depth - 1) for the U-Net and its maps are
cropped back before the keypoints are taken, so keypoints are in the image's
own pixel coordinates (SPEC 1). Any number of keypoints works: there is one
score map, and more keypoints take more of its peaks. Restoring a run is
`tusk_jax.checkpointing`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from numpy.typing import ArrayLike

from tusk_jax import checkpointing, models, ops
from tusk_jax.detection_io import (
    Detections,
    as_image_list,
    detect_images,
    pad_to_multiple,
    padded_size,
    run_by_size,
)

# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


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
        self.model = models.create_model(config)
        self.update(variables, prototypes, step)
        self.workdir = workdir
        self.batch_size = int(batch_size)
        self.pad_multiple = 2 ** (config.model.depth - 1)
        self._run = jax.jit(self._forward, static_argnames=("num_keypoints", "decode"))
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

    def _forward(self, weights, images, *, num_keypoints, decode):
        """`network`'s body on images `[B, H, W, 3]` of any size (H, W may be symbolic)."""
        variables, prototypes = weights
        model = self.model
        height, width = images.shape[1], images.shape[2]
        images = pad_to_multiple(images, self.pad_multiple)
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
        """Runs `_forward` on images grouped by size (`run_by_size`); per-image numpy dicts."""

        def program(batch):
            return self._run(self._weights, batch, num_keypoints=num_keypoints, decode=decode)

        return run_by_size(images, program, self.batch_size, num_keypoints)

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
        return detect_images(
            images, lambda inputs: self._batched(inputs, k, decode=False), min_confidence, scale
        )

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

    def network(self, num_keypoints: int | None = None, decode: bool = False) -> Callable:
        """The body `detect` runs, as a pure function of the images with the weights closed over.

        For tracing (`jax.jit`, `jax.export`: the weights become constants of
        the program); `detect` itself passes the weights as arguments.

        Args:
          num_keypoints: K (None: the trained K).
          decode: also render `reconstruction` (and, in alpha mode, `rgb`,
            `alpha`).

        Returns:
          `fn(images)`: `[B, H, W, 3]` float32 in [0, 1] of any size with
          H * W >= K (padded inside to multiples of 2**(depth - 1) and the maps
          cropped back, as `detect` does; B, H and W may be symbolic, as in
          `tusk_jax.export`) -> dict of `keypoints` `[B, K, 2]` (x, y) pixels,
          `confidence` `[B, K]`, `prototype` `[B, K]` int32, `descriptors`
          `[B, K, C]` and, with `decode`, `reconstruction` `[B, H, W, 3]`.
        """
        k = self.resolve_num_keypoints(num_keypoints)

        def fn(images):
            return self._forward(self._weights, images, num_keypoints=k, decode=decode)

        return fn

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
        `checkpointing.resolve_config`); None: the saved config.
      batch_size: images per network call.

    Raises:
      FileNotFoundError: not a workdir, or no checkpoint (at `step`).
      ValueError: the checkpoint comes from another config.
    """
    config = checkpointing.resolve_config(workdir, config)
    state, step = checkpointing.restore_state(workdir, config, step)
    return Detector(
        config, state.params, state.prototypes, step=step, batch_size=batch_size, workdir=workdir
    )
