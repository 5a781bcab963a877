"""The TUSK networks (SPEC section 2): U-Net, encoder with heatmap head, decoder.

This module owns the Flax Linen modules and nothing else: keypoint detection,
sampling and splatting are the single-example functions of `tusk_jax.ops`,
batched here with `jax.vmap`; the losses live in `tusk_jax.losses`.

Arrays are NHWC; images are float32 in [0, 1]; keypoints are (x, y) in pixel
units with the centre of the top-left pixel at (0, 0) (SPEC section 1).

Parameters are kept under two top-level subtrees, `params['encoder']` and
`params['decoder']`, so an optimizer can treat them separately:

    model = create_model(config)           # or TUSK(ModelConfig(...))
    variables = model.init(key, images)        # {'params': {'encoder', 'decoder'}}
    out = model.apply(variables, images)       # dict, see TUSK.__call__
    score, feats = model.apply(variables, images, method=TUSK.encode)

Architecture (the reference's `UNet_Encoder` / `UNetDecoder`), on the
U-Net of `tusk_jax.unet`:
- Encoder: U-Net(3 -> C) gives the feature map F; heatmap head on F:
  3x3 conv(C) + GroupNorm(`head_groups`, C by default: one channel per group)
  + ReLU + 3x3 conv(1) + GroupNorm(1 group) -> logits; score map
  S = sigmoid(logits).
- Decoder: the same U-Net with C inputs and 3 (plain) or 4 (alpha) outputs.
- `model.dtype='bfloat16'`: both U-Nets and the head compute in bfloat16
  with float32 parameters; the score map, the features and the decoder
  outputs are cast back to float32 before the keypoint ops, sigmoid and
  softmax, so keypoints, descriptors and losses are float32 computations.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from tusk_jax import ops
from tusk_jax.unet import (  # noqa: F401 - check_image_size, upsample2x: part of this API
    DTYPES,
    INITS,
    UNet,
    check_image_size,
    compute_dtype,
    conv,
    group_norm,
    stage_groups,
    upsample2x,
)

DECODER_MODES = ("plain", "alpha")
# How a keypoint reads its descriptor from the feature map F:
# "nearest": F at the truncated integer pixel, no gradient to the location (the reference);
# "bilinear_stop_gradient": bilinear at the location, no gradient to the location;
# "bilinear": bilinear, the reconstruction gradient flows through the location
# into the score map (the paper's text).
DESCRIPTOR_SAMPLINGS = ("nearest", "bilinear_stop_gradient", "bilinear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields the networks read (tusk_jax/configs/base.py documents each under `model`)."""

    base_width: int = 32
    depth: int = 4
    feature_dim: int = 32
    num_groups: int = 32
    head_groups: int = 0
    init: str = "pytorch"
    upsample_align_corners: bool = True
    num_keypoints: int = 3
    window: int = 27
    temperature: float = 0.2
    soft_argmax_border: str = "zeros"
    descriptor_sampling: str = "nearest"
    splat_variance: float = 0.05
    decoder_mode: str = "alpha"
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "ModelConfig":
        """The `model` fields of a whole config or of its `model` sub-config."""
        model = config.model if "model" in config else config
        return cls(**{field.name: model[field.name] for field in dataclasses.fields(cls)})


def create_model(config: ml_collections.ConfigDict) -> "TUSK":
    """`TUSK` with the `model` fields of a whole config (or of its `model` sub-config)."""
    return TUSK(ModelConfig.from_config(config))


def check_model_config(cfg: ModelConfig) -> None:
    """Raises ValueError if the `model` fields cannot build a network."""
    for field in ("base_width", "depth", "feature_dim", "num_groups", "num_keypoints"):
        value = getattr(cfg, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config model.{field} must be a positive int, got {value!r}.")
    for level in range(cfg.depth):
        width = cfg.base_width * 2**level
        if width % stage_groups(cfg.num_groups, width):
            raise ValueError(
                f"config model.num_groups={cfg.num_groups} must divide the U-Net stage width "
                f"{width} (model.base_width={cfg.base_width} x 2**{level}) or exceed it."
            )
    if not isinstance(cfg.head_groups, int) or cfg.head_groups < 0:
        raise ValueError(f"config model.head_groups must be an int >= 0, got {cfg.head_groups!r}.")
    if cfg.feature_dim % (cfg.head_groups or cfg.feature_dim):
        raise ValueError(
            f"config model.head_groups={cfg.head_groups} must divide model.feature_dim="
            f"{cfg.feature_dim} (GroupNorm of the heatmap head; 0: one channel per group)."
        )
    choices = {
        "init": INITS,
        "descriptor_sampling": DESCRIPTOR_SAMPLINGS,
        "soft_argmax_border": ops.SOFT_ARGMAX_BORDERS,
        "dtype": DTYPES,
    }
    for field, valid in choices.items():
        value = getattr(cfg, field)
        if value not in valid:
            raise ValueError(f"config model.{field} must be one of {valid}, got {value!r}.")
    if not isinstance(cfg.window, int) or cfg.window < 1 or cfg.window % 2 == 0:
        raise ValueError(f"config model.window must be a positive odd int, got {cfg.window!r}.")
    if cfg.decoder_mode not in DECODER_MODES:
        raise ValueError(
            f"config model.decoder_mode must be one of {DECODER_MODES}, got {cfg.decoder_mode!r}."
        )


def sample_descriptors(feature_map: jax.Array, xy: jax.Array, method: str) -> jax.Array:
    """Feature vectors `[K, C]` of one `[H, W, C]` map at keypoints `[K, 2]` (x, y) pixels.

    `method` is one of `DESCRIPTOR_SAMPLINGS`: "nearest" reads the pixel of
    the truncated location (clipped to the image), "bilinear*" interpolate;
    only "bilinear" passes a gradient to `xy`. All pass one to `feature_map`.
    """
    if method == "nearest":
        height, width = feature_map.shape[:2]
        pixel = jax.lax.stop_gradient(xy).astype(jnp.int32)  # Truncation, as torch's .long().
        col = jnp.clip(pixel[:, 0], 0, width - 1)
        row = jnp.clip(pixel[:, 1], 0, height - 1)
        return feature_map[row, col]
    if method == "bilinear_stop_gradient":
        xy = jax.lax.stop_gradient(xy)
    elif method != "bilinear":
        raise ValueError(
            f"descriptor sampling must be one of {DESCRIPTOR_SAMPLINGS}, got {method!r}."
        )
    return ops.bilinear_sample(feature_map, xy)


class Encoder(nn.Module):
    """Images `[B, H, W, 3]` -> (score map `[B, H, W]` in [0, 1], features `[B, H, W, C]`).

    Computes in `dtype`; both outputs are float32.
    """

    base_width: int
    depth: int
    feature_dim: int
    num_groups: int
    head_groups: int = 0  # 0: feature_dim groups (one channel per group).
    init: str = "pytorch"
    align_corners: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = UNet(
            self.base_width,
            self.depth,
            self.feature_dim,
            self.num_groups,
            self.init,
            self.align_corners,
            self.dtype,
            name="unet",
        )(images)
        head_groups = self.head_groups or self.feature_dim
        h = conv(features, self.feature_dim, 3, self.init, name="head_conv0", dtype=self.dtype)
        h = nn.relu(group_norm(h, head_groups, name="head_norm0", dtype=self.dtype))
        h = conv(h, 1, 3, self.init, name="head_conv1", dtype=self.dtype)
        h = group_norm(h, 1, name="head_norm1", dtype=self.dtype).astype(jnp.float32)
        return nn.sigmoid(h[..., 0]), features.astype(jnp.float32)


class Decoder(nn.Module):
    """Keypoints, confidences and descriptors -> reconstruction (SPEC 2).

    The decoder input for keypoint k is D_k ⊗ (confidence_k G_k), G_k the
    Gaussian splat of variance `splat_variance` normalised to sum 1.
    """

    base_width: int
    depth: int
    num_groups: int
    mode: str
    splat_variance: float
    init: str = "pytorch"
    align_corners: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        keypoints: jax.Array,
        confidence: jax.Array,
        descriptors: jax.Array,
        height: int,
        width: int,
    ) -> dict[str, jax.Array]:
        batch, num_keypoints, channels = descriptors.shape
        splats = jax.vmap(lambda xy: ops.gaussian_splat(xy, height, width, self.splat_variance))(
            keypoints
        )  # [B, K, H, W]
        weights = splats * confidence[:, :, None, None]
        maps = weights[..., None] * descriptors[:, :, None, None, :]  # [B, K, H, W, C]
        if self.mode not in DECODER_MODES:
            raise ValueError(f"decoder mode must be one of {DECODER_MODES}, got {self.mode!r}.")
        unet = UNet(
            self.base_width,
            self.depth,
            3 if self.mode == "plain" else 4,
            self.num_groups,
            self.init,
            self.align_corners,
            self.dtype,
            name="unet",
        )
        if self.mode == "plain":
            logits = unet(jnp.sum(maps, axis=1)).astype(jnp.float32)
            return {"reconstruction": nn.sigmoid(logits)}
        rgba = unet(maps.reshape(batch * num_keypoints, height, width, channels))
        rgba = rgba.astype(jnp.float32)
        rgba = rgba.reshape(batch, num_keypoints, height, width, 4)
        rgb = nn.sigmoid(rgba[..., :3])
        alpha = jax.nn.softmax(rgba[..., 3], axis=1)  # Over the K keypoints.
        reconstruction = jnp.sum(alpha[..., None] * rgb, axis=1)
        return {"reconstruction": reconstruction, "rgb": rgb, "alpha": alpha}


class TUSK(nn.Module):
    """The full TUSK model: encoder, keypoint extraction, decoder.

    Attributes:
      config: the `ModelConfig` (`create_model(config)` builds one from a config).
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        check_model_config(cfg)
        self.encoder = Encoder(
            cfg.base_width,
            cfg.depth,
            cfg.feature_dim,
            cfg.num_groups,
            cfg.head_groups,
            cfg.init,
            cfg.upsample_align_corners,
            compute_dtype(cfg.dtype),
        )
        self.decoder = Decoder(
            cfg.base_width,
            cfg.depth,
            cfg.num_groups,
            cfg.decoder_mode,
            float(cfg.splat_variance),
            cfg.init,
            cfg.upsample_align_corners,
            compute_dtype(cfg.dtype),
        )

    def __call__(self, images: jax.Array, num_keypoints: int | None = None) -> dict[str, Any]:
        """Full pass: encode, extract keypoints, decode.

        Args:
          images: `[B, H, W, 3]` float in [0, 1]; H and W divisible by
            2**(depth - 1).
          num_keypoints: K (Python int); None: `model.num_keypoints`. Any K can
            be used at apply time with the same parameters.

        Returns:
          dict with `score_map` `[B, H, W]` in [0, 1], `feature_map`
          `[B, H, W, C]`, `keypoints` `[B, K, 2]` (x, y) pixels, `confidence`
          `[B, K]` in [0, 1], `descriptors` `[B, K, C]` unit L2 norm,
          `reconstruction` `[B, H, W, 3]` in [0, 1]; alpha mode adds `rgb`
          `[B, K, H, W, 3]` in [0, 1] and `alpha` `[B, K, H, W]` (sums to 1
          over K).
        """
        if num_keypoints is None:
            num_keypoints = self.config.num_keypoints
        score_map, feature_map = self.encode(images)
        out = {"score_map": score_map, "feature_map": feature_map}
        out.update(self.extract(score_map, feature_map, num_keypoints))
        out.update(
            self.decode(
                out["keypoints"],
                out["confidence"],
                out["descriptors"],
                images.shape[1],
                images.shape[2],
            )
        )
        return out

    def keypoints(self, images: jax.Array, num_keypoints: int | None = None) -> dict[str, Any]:
        """Encoder and keypoint extraction without the decoder: `extract`'s dict."""
        if num_keypoints is None:
            num_keypoints = self.config.num_keypoints
        return self.extract(*self.encode(images), num_keypoints)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images `[B, H, W, 3]` -> (score map `[B, H, W]` in [0, 1], feature map `[B, H, W, C]`).

        Raises:
          ValueError: if `images` is not `[B, H, W, 3]` or H, W are not
            divisible by 2**(depth - 1).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}.")
        check_image_size(images.shape[1], images.shape[2], self.config.depth)
        return self.encoder(images)

    def extract(
        self, score_map: jax.Array, feature_map: jax.Array, num_keypoints: int
    ) -> dict[str, jax.Array]:
        """Keypoints, confidences and descriptors from the encoder maps (no parameters).

        Args:
          score_map: `[B, H, W]` in [0, 1].
          feature_map: `[B, H, W, C]`.
          num_keypoints: K (Python int).

        Returns:
          dict with `keypoints` `[B, K, 2]` (x, y) pixels (sub-pixel, from the
          NMS peaks refined by patch soft-argmax), `confidence` `[B, K]` (S
          bilinearly sampled at the keypoints) and `descriptors` `[B, K, C]`
          (F read at the keypoints as `model.descriptor_sampling` says, then
          L2-normalised).
        """
        cfg = self.config
        window, temperature, border = cfg.window, float(cfg.temperature), cfg.soft_argmax_border
        keypoints, confidence = jax.vmap(
            lambda s: ops.detect_keypoints(s, num_keypoints, window, temperature, border)
        )(score_map)
        descriptors = jax.vmap(
            functools.partial(sample_descriptors, method=cfg.descriptor_sampling)
        )(feature_map, keypoints)
        return {
            "keypoints": keypoints,
            "confidence": confidence,
            "descriptors": ops.l2_normalize(descriptors),
        }

    def decode(
        self,
        keypoints: jax.Array,
        confidence: jax.Array,
        descriptors: jax.Array,
        height: int,
        width: int,
    ) -> dict[str, jax.Array]:
        """Renders an image from keypoints.

        Args:
          keypoints: `[B, K, 2]` (x, y) pixels.
          confidence: `[B, K]`, multiplies each keypoint's splat.
          descriptors: `[B, K, C]`.
          height, width: output size in pixels (Python ints, divisible by
            2**(depth - 1)).

        Returns:
          dict with `reconstruction` `[B, H, W, 3]` in [0, 1]; alpha mode adds
          `rgb` `[B, K, H, W, 3]` and `alpha` `[B, K, H, W]` (softmax over K).
        """
        check_image_size(height, width, self.config.depth)
        return self.decoder(keypoints, confidence, descriptors, height, width)
