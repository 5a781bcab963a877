"""Image files in: reading a file at the size the network sees, scaled by its bit depth.

Pixel values: 8-bit as they are, 16-bit PNG/TIFF by 65535 (other integer
depths by theirs), float TIFF in [0, 1] by 255, other floats stretched from
their range. Large files are downscaled while still integers (JPEG decoded
at reduced scale) to at most `MAX_NETWORK_PIXELS`; files above
`MAX_FILE_PIXELS` are refused before decoding.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from absl import logging
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# Files with more pixels are refused before decoding (a decoded pixel takes up to 4
# bytes, so about 600 MB at the limit; 12000 x 12000 = 144 M pixels passes).
MAX_FILE_PIXELS = 150_000_000
# At most this many pixels reach the network (--max_pixels); larger images (after
# --scale) are downscaled while still 8/16-bit, keypoints map back to the file's pixels.
MAX_NETWORK_PIXELS = 2048 * 2048
# PIL modes of more than 8 bits per sample: scaled by bit depth or range, not clipped.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ORIENTATION_TAG = 0x0112  # EXIF orientation; 5..8 swap width and height.


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An image file read at the size the network sees.

    Attributes:
      image: uint8 `[h, w, 3]`, the file's pixels resized to the network's size.
      width, height: the file's size in pixels (after its EXIF orientation).
      pixel_values: how the file's values became 0..255 (e.g. "16-bit: value / 65535").
    """

    image: np.ndarray
    width: int
    height: int
    pixel_values: str

    def to_file_pixels(self, keypoints: np.ndarray) -> np.ndarray:
        """(x, y) `[K, 2]` in `image` pixels -> the file's pixels (centres at integers)."""
        h, w = self.image.shape[:2]
        ratio = np.array([self.width / w, self.height / h], np.float32)
        return (np.asarray(keypoints, np.float32) + 0.5) * ratio - 0.5


def network_size(width: int, height: int, scale: float, max_pixels: int) -> tuple[int, int]:
    """(width, height) the network sees: `scale` times the file's, then at most `max_pixels`.

    Sides are rounded, at least 1 pixel; the aspect ratio is kept.
    """
    factor = scale * min(1.0, (max_pixels / (width * height * scale * scale)) ** 0.5)
    return max(1, round(width * factor)), max(1, round(height * factor))


def _bits_per_sample(image: Image.Image) -> int | None:
    """The TIFF BitsPerSample tag (first value), None for other formats."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def _high_depth_to_uint8(image: Image.Image, bits: int | None) -> tuple[np.ndarray, str]:
    """A one-channel image of more than 8 bits (`I;16*`, `I`, `F`) -> uint8 `[H, W]`.

    Integers are scaled by their bit depth (`bits`: the TIFF tag, else 16, as
    PNG); floats in [0, 1] by 255, other finite floats stretched from their
    range [min, max] to [0, 1].

    Raises:
      ValueError: integers outside their bit depth, non-finite floats.
    """
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise ValueError("float image with non-finite values (NaN or Inf)")
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            note = "float in [0, 1]: value * 255"
        else:
            values = (values - low) / max(high - low, 1e-30)
            note = f"float in [{low:g}, {high:g}]: stretched to [0, 255]"
            logging.warning("Float image values in [%g, %g] are stretched to [0, 1].", low, high)
    else:
        bits = min(bits or 16, 31)
        top = 2**bits - 1
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > top:
            raise ValueError(
                f"{image.mode} values in [{low}, {high}] are outside the {bits}-bit range 0..{top}"
            )
        values = values.astype(np.float32) / np.float32(top)
        note = f"{bits}-bit: value / {top}"
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8), note


def read_image(
    path: str,
    scale: float = 1.0,
    max_pixels: int | None = None,
    max_file_pixels: int = MAX_FILE_PIXELS,
) -> ImageFile:
    """An image file as uint8 `[h, w, 3]` at the network's size (see `ImageFile`).

    EXIF orientation is applied; grey, alpha and palette become RGB. Values
    are scaled by the file's bit depth: 8-bit as they are, 16-bit (and other
    integer depths) by 2**bits - 1, float in [0, 1] by 255, other floats
    stretched from their range. The image is resized (bilinear, antialiased)
    to `network_size(W, H, scale, max_pixels)` while it is still 8- or 16-bit
    or PIL's own float (a JPEG is decoded at 1/2..1/8 scale when that is
    enough), so a large file never becomes a large float array.

    Args:
      path: the file.
      scale: resize factor before the network.
      max_pixels: at most this many pixels reach the network (None: no limit).
      max_file_pixels: files with more pixels are refused before decoding.

    Raises:
      ValueError: above `max_file_pixels`; values out of range. OSError
      (also PIL's UnidentifiedImageError), SyntaxError (some broken PNGs),
      DecompressionBombError: not a readable image.
    """
    with warnings.catch_warnings():
        # Our own limit (max_file_pixels) replaces PIL's decompression-bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            raw_w, raw_h = image.size
            if raw_w * raw_h > max_file_pixels:
                raise ValueError(
                    f"{raw_w}x{raw_h} ({raw_w * raw_h / 1e6:.1f} M pixels) is above the limit "
                    f"of {max_file_pixels / 1e6:g} M pixels per file; downscale it first"
                )
            transposed = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
            width, height = (raw_h, raw_w) if transposed else (raw_w, raw_h)
            size = network_size(width, height, scale, max_pixels or width * height * scale**2)
            if size[0] < width:  # JPEG: decode at the smallest DCT scale still >= size.
                image.draft(image.mode, size[::-1] if transposed else size)
            bits = _bits_per_sample(image)
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode in HIGH_DEPTH_MODES:
                if image.mode.startswith("I;16") and image.size != size:
                    image = image.convert("I")  # PIL resizes I and F, not I;16.
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
                grey, note = _high_depth_to_uint8(image, bits)
                return ImageFile(np.repeat(grey[..., None], 3, axis=-1), width, height, note)
            if image.mode in ("L", "RGB") and image.size != size:  # Resize, then convert.
                image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            rgb = image.convert("RGB")
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            return ImageFile(np.asarray(rgb, dtype=np.uint8), width, height, "8-bit")
