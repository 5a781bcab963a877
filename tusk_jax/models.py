"""The TUSK networks (SPEC section 2): U-Net, encoder with heatmap head, decoder.

This module owns the Flax Linen modules and nothing else: keypoint detection,
sampling and splatting are the single-example functions of `tusk_jax.ops`,
batched here with `jax.vmap`; the losses live in `tusk_jax.losses`.

Arrays are NHWC; images are float32 in [0, 1]; keypoints are (x, y) in pixel
units with the centre of the top-left pixel at (0, 0) (SPEC section 1).

Parameters are kept under two top-level subtrees, `params['encoder']` and
`params['decoder']`, so an optimizer can treat them separately:

    model = TUSK(config.model)
    variables = model.init(key, images)        # {'params': {'encoder', 'decoder'}}
    out = model.apply(variables, images)       # dict, see TUSK.__call__
    score, feats = model.apply(variables, images, method=TUSK.encode)

Architecture (the reference's `UNet` / `UNet_Encoder` / `UNetDecoder`):
- U-Net of `depth` resolutions with c, 2c, 4c, ... channels (c = `base_width`).
  Each stage is two [3x3 conv + GroupNorm + ReLU]; 2x2 max-pool between the
  down stages; the up path doubles the resolution bilinearly, concatenates
  [up-sampled, skip] on the channel axis and applies a stage of the skip's
  width; a final 1x1 conv gives the output channels.
- Encoder: U-Net(3 -> C) gives the feature map F; heatmap head on F:
  3x3 conv(C) + GroupNorm + ReLU + 3x3 conv(1) + GroupNorm(1 group) -> logits;
  score map S = sigmoid(logits). The last GroupNorm normalises the logits of
  each image to zero mean and unit variance over the image, then applies a
  learned scale and bias.
- Decoder: the same U-Net with C inputs and 3 (plain) or 4 (alpha) outputs.

Known differences from the reference PyTorch code: up-sampling uses
`jax.image.resize` (half-pixel centres, i.e. `align_corners=False`; the
reference used `align_corners=True`); the GroupNorm group count is
`model.num_groups` everywhere (the reference used c groups in the U-Net stages
and C groups in the heatmap head, i.e. 32 for c = C = 32); Flax default
initialisers (LeCun normal kernels, zero biases). GroupNorm epsilon is 1e-5 as
in PyTorch.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from tusk_jax import ops

DECODER_MODES = ("plain", "alpha")
_GROUP_NORM_EPSILON = 1e-5  # PyTorch's default, used by the reference.


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns the `model` sub-config of a whole config, or `config` itself."""
    if "model" in config:
        return config.model
    return config


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError if the `model` fields cannot build a network.

    Args:
      config: the `model` sub-config (or the whole config).
    """
    cfg = model_config(config)
    for field in ("base_width", "depth", "feature_dim", "num_groups", "num_keypoints"):
        value = cfg[field]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config model.{field} must be a positive int, got {value!r}.")
    if cfg.base_width % cfg.num_groups:
        raise ValueError(
            f"config model.num_groups={cfg.num_groups} must divide model.base_width="
            f"{cfg.base_width} (GroupNorm groups must divide every U-Net stage width "
            f"{cfg.base_width}, {2 * cfg.base_width}, ...)."
        )
    if cfg.feature_dim % cfg.num_groups:
        raise ValueError(
            f"config model.num_groups={cfg.num_groups} must divide model.feature_dim="
            f"{cfg.feature_dim} (GroupNorm of the heatmap head)."
        )
    if not isinstance(cfg.window, int) or cfg.window < 1 or cfg.window % 2 == 0:
        raise ValueError(f"config model.window must be a positive odd int, got {cfg.window!r}.")
    if cfg.decoder_mode not in DECODER_MODES:
        raise ValueError(
            f"config model.decoder_mode must be one of {DECODER_MODES}, got {cfg.decoder_mode!r}."
        )


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", name=f"conv{i}")(x)
            x = nn.GroupNorm(self.num_groups, epsilon=_GROUP_NORM_EPSILON, name=f"norm{i}")(x)
            x = nn.relu(x)
        return x


def upsample2x(x: jax.Array) -> jax.Array:
    """Bilinear 2x up-sampling, `[N, H, W, C] -> [N, 2H, 2W, C]` (half-pixel centres)."""
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")


class UNet(nn.Module):
    """U-Net: `[N, H, W, Cin] -> [N, H, W, out_channels]` (no output activation).

    `depth` resolutions with `base_width * 2**level` channels at level
    0..depth-1; H and W must be divisible by 2**(depth - 1).
    """

    base_width: int
    depth: int
    out_channels: int
    num_groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_image_size(x.shape[1], x.shape[2], self.depth)
        skips = []
        for level in range(self.depth):
            x = ConvStage(self.base_width * 2**level, self.num_groups, name=f"down{level}")(x)
            if level < self.depth - 1:
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for level in reversed(range(self.depth - 1)):
            x = jnp.concatenate([upsample2x(x), skips[level]], axis=-1)
            x = ConvStage(self.base_width * 2**level, self.num_groups, name=f"up{level}")(x)
        return nn.Conv(self.out_channels, (1, 1), name="out")(x)


class Encoder(nn.Module):
    """Images `[B, H, W, 3]` -> (score map `[B, H, W]` in [0, 1], features `[B, H, W, C]`)."""

    base_width: int
    depth: int
    feature_dim: int
    num_groups: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = UNet(
            self.base_width, self.depth, self.feature_dim, self.num_groups, name="unet"
        )(images)
        h = nn.Conv(self.feature_dim, (3, 3), padding="SAME", name="head_conv0")(features)
        h = nn.GroupNorm(self.num_groups, epsilon=_GROUP_NORM_EPSILON, name="head_norm0")(h)
        h = nn.relu(h)
        h = nn.Conv(1, (3, 3), padding="SAME", name="head_conv1")(h)
        h = nn.GroupNorm(1, epsilon=_GROUP_NORM_EPSILON, name="head_norm1")(h)
        return nn.sigmoid(h[..., 0]), features


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
        if self.mode == "plain":
            unet = UNet(self.base_width, self.depth, 3, self.num_groups, name="unet")
            return {"reconstruction": nn.sigmoid(unet(jnp.sum(maps, axis=1)))}
        if self.mode != "alpha":
            raise ValueError(f"decoder mode must be one of {DECODER_MODES}, got {self.mode!r}.")
        unet = UNet(self.base_width, self.depth, 4, self.num_groups, name="unet")
        rgba = unet(maps.reshape(batch * num_keypoints, height, width, channels))
        rgba = rgba.reshape(batch, num_keypoints, height, width, 4)
        rgb = nn.sigmoid(rgba[..., :3])
        alpha = jax.nn.softmax(rgba[..., 3], axis=1)  # Over the K keypoints.
        reconstruction = jnp.sum(alpha[..., None] * rgb, axis=1)
        return {"reconstruction": reconstruction, "rgb": rgb, "alpha": alpha}


class TUSK(nn.Module):
    """The full TUSK model: encoder, keypoint extraction, decoder.

    Attributes:
      config: the `model` sub-config (`config.model`) or the whole config (its
        `model` field is used). Fields read: base_width, depth, feature_dim,
        num_groups, num_keypoints, window, temperature, splat_variance,
        decoder_mode (see configs/base.py).
    """

    config: ml_collections.ConfigDict

    def setup(self) -> None:
        cfg = model_config(self.config)
        check_model_config(cfg)
        self.encoder = Encoder(cfg.base_width, cfg.depth, cfg.feature_dim, cfg.num_groups)
        self.decoder = Decoder(
            cfg.base_width, cfg.depth, cfg.num_groups, cfg.decoder_mode, float(cfg.splat_variance)
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
            num_keypoints = model_config(self.config).num_keypoints
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

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images `[B, H, W, 3]` -> (score map `[B, H, W]` in [0, 1], feature map `[B, H, W, C]`).

        Raises:
          ValueError: if `images` is not `[B, H, W, 3]` or H, W are not
            divisible by 2**(depth - 1).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}.")
        check_image_size(images.shape[1], images.shape[2], model_config(self.config).depth)
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
          (F bilinearly sampled at the keypoints, then L2-normalised).
        """
        cfg = model_config(self.config)
        window, temperature = cfg.window, float(cfg.temperature)
        keypoints, confidence = jax.vmap(
            lambda s: ops.detect_keypoints(s, num_keypoints, window, temperature)
        )(score_map)
        descriptors = ops.l2_normalize(jax.vmap(ops.bilinear_sample)(feature_map, keypoints))
        return {"keypoints": keypoints, "confidence": confidence, "descriptors": descriptors}

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
        check_image_size(height, width, model_config(self.config).depth)
        return self.decoder(keypoints, confidence, descriptors, height, width)
