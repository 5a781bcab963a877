"""Figures as uint8 arrays: keypoints on images, alpha panels, grids, t-SNE.

This module owns every picture the project writes (PNG files, TensorBoard image
summaries, the colab). Inputs are numpy arrays (jax arrays convert); outputs
are `uint8 [H, W, 3]`. Images in are float in [0, 1] (SPEC section 1) or uint8.
Keypoints are (x, y) pixels with pixel centres at integers (SPEC section 1).
No jax here; matplotlib only through its Agg canvas (no pyplot global state).
"""

from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
import sklearn.manifold
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from PIL import Image

# Colour of the 1-pixel ring drawn around each keypoint marker.
_OUTLINE = np.array([0.0, 0.0, 0.0])


def to_uint8(image: ArrayLike) -> np.ndarray:
    """Converts an image to uint8: float in [0, 1] (clipped) or bool -> 0..255.

    Args:
      image: any shape; uint8 passes through, bool maps to 0/255, other values
        are read as [0, 1] floats, clipped and rounded.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_rgb_float(image, name: str) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]` or `[H, W, 3]` image -> float64 `[H, W, 3]` in [0, 1]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image / 255.0
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be [H, W], [H, W, 1] or [H, W, 3], got {image.shape}.")
    return np.clip(np.broadcast_to(image, image.shape[:2] + (3,)), 0.0, 1.0)


def prototype_palette(num_colors: int) -> np.ndarray:
    """A fixed palette of distinct colours, one per prototype (or object id).

    matplotlib `tab10` for up to 10 colours, `tab20` for up to 20, otherwise
    `num_colors` evenly spaced hues of `hsv`. The same id always gets the same
    colour for a given `num_colors`.

    Returns:
      `[num_colors, 3]` float64 RGB in [0, 1].
    """
    if num_colors < 1:
        raise ValueError(f"num_colors must be >= 1, got {num_colors}.")
    if num_colors <= 10:
        colors = matplotlib.colormaps["tab10"].colors[:num_colors]
    elif num_colors <= 20:
        colors = matplotlib.colormaps["tab20"].colors[:num_colors]
    else:
        colors = matplotlib.colormaps["hsv"](np.arange(num_colors) / num_colors)[:, :3]
    return np.asarray(colors, dtype=np.float64)


def mask_to_rgb(mask: ArrayLike, num_ids: int, background: int | None = None) -> np.ndarray:
    """Colours an integer id map with `prototype_palette(num_ids)`.

    Args:
      mask: `[H, W]` int ids in [0, num_ids) (ground-truth entity ids, or the
        predicted object id = argmax of alpha).
      num_ids: number of ids (palette size).
      background: optional id drawn black (e.g. 0 for ground-truth masks).

    Returns:
      `[H, W, 3]` uint8.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be an int [H, W] array, got {mask.dtype} {mask.shape}.")
    if mask.size and (mask.min() < 0 or mask.max() >= num_ids):
        raise ValueError(f"mask ids must be in [0, {num_ids}), got [{mask.min()}, {mask.max()}].")
    palette = prototype_palette(num_ids)
    if background is not None:
        palette = palette.copy()
        palette[background] = 0.0
    return to_uint8(palette[mask])


def draw_keypoints(
    image: ArrayLike,
    keypoints: ArrayLike,
    prototype_ids: ArrayLike,
    num_prototypes: int,
    confidence: ArrayLike | None = None,
    scale: int = 4,
    radius: float | None = None,
) -> np.ndarray:
    """Upscales an image (nearest) and draws a disc per keypoint, coloured by prototype.

    Pixel (x, y) becomes the `scale x scale` block of rows `[y*scale, (y+1)*scale)`
    and columns `[x*scale, (x+1)*scale)`, whose centre is
    `((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5)` in upscaled pixel
    coordinates; a keypoint's disc is centred there (sub-pixel positions
    included), so a keypoint at pixel (x, y) covers that pixel's block. Each
    disc gets a 1-pixel black ring for contrast.

    Args:
      image: `[H, W, 3]` (or `[H, W]`, `[H, W, 1]`) float in [0, 1] or uint8.
      keypoints: `[K, 2]` (x, y) pixels of the input image; non-finite ones
        are skipped.
      prototype_ids: `[K]` int in [0, num_prototypes), picks the colour from
        `prototype_palette(num_prototypes)`.
      num_prototypes: M, the palette size.
      confidence: optional `[K]` in [0, 1]; the marker's opacity is
        `0.25 + 0.75 * confidence` (None: opaque).
      scale: integer upscaling factor.
      radius: disc radius in upscaled pixels; default `0.9 * scale` (covers the
        keypoint's pixel block, which needs `scale / sqrt(2)`).

    Returns:
      `[H * scale, W * scale, 3]` uint8.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}.")
    scale = int(scale)
    rgb = _to_rgb_float(image, "image")
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 2 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must be [K, 2] (x, y), got {keypoints.shape}.")
    k = keypoints.shape[0]
    prototype_ids = np.asarray(prototype_ids)
    if prototype_ids.shape != (k,):
        raise ValueError(f"prototype_ids must have shape ({k},), got {prototype_ids.shape}.")
    if k and (prototype_ids.min() < 0 or prototype_ids.max() >= num_prototypes):
        raise ValueError(f"prototype_ids must be in [0, {num_prototypes}).")
    if confidence is None:
        opacity = np.ones(k)
    else:
        confidence = np.asarray(confidence, dtype=np.float64)
        if confidence.shape != (k,):
            raise ValueError(f"confidence must have shape ({k},), got {confidence.shape}.")
        opacity = 0.25 + 0.75 * np.clip(confidence, 0.0, 1.0)
    radius = 0.9 * scale if radius is None else float(radius)

    canvas = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1).copy()
    height, width = canvas.shape[:2]
    palette = prototype_palette(num_prototypes)
    outer = radius + 1.0
    for (x, y), pid, op in zip(keypoints, prototype_ids, opacity, strict=True):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        cx, cy = (x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5
        x0, x1 = max(int(np.floor(cx - outer)), 0), min(int(np.ceil(cx + outer)) + 1, width)
        y0, y1 = max(int(np.floor(cy - outer)), 0), min(int(np.ceil(cy + outer)) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        vv, uu = np.mgrid[y0:y1, x0:x1]
        dist = np.hypot(uu - cx, vv - cy)
        patch = canvas[y0:y1, x0:x1]
        ring = (dist > radius) & (dist <= outer)
        disc = dist <= radius
        patch[ring] = (1.0 - op) * patch[ring] + op * _OUTLINE
        patch[disc] = (1.0 - op) * patch[disc] + op * palette[pid]
    return to_uint8(canvas)


def image_grid(images: ArrayLike, ncols: int, pad: int = 0, pad_value: float = 1.0) -> np.ndarray:
    """Tiles N equally sized images row by row into one montage.

    Image i goes to row `i // ncols`, column `i % ncols`; its top-left corner is
    at `(pad + col * (W + pad), pad + row * (H + pad))`. Unused cells and the
    padding take `pad_value`.

    Args:
      images: `[N, H, W, 3]` (or `[N, H, W]`, `[N, H, W, 1]`) float in [0, 1]
        or uint8.
      ncols: number of columns.
      pad: pixels between and around the tiles.
      pad_value: padding grey level in [0, 1].

    Returns:
      `[rows * H + (rows + 1) * pad, ncols * W + (ncols + 1) * pad, 3]` uint8,
      `rows = ceil(N / ncols)`.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W, 3] with N >= 1, got {images.shape}.")
    if ncols < 1 or pad < 0:
        raise ValueError(f"ncols must be >= 1 and pad >= 0, got {ncols}, {pad}.")
    images = to_uint8(images)
    images = np.broadcast_to(images, images.shape[:3] + (3,))
    n, h, w, _ = images.shape
    rows = -(-n // ncols)
    out = np.full(
        (rows * h + (rows + 1) * pad, ncols * w + (ncols + 1) * pad, 3),
        to_uint8(np.float64(pad_value)),
        dtype=np.uint8,
    )
    for i in range(n):
        r, c = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        out[y0 : y0 + h, x0 : x0 + w] = images[i]
    return out


def alpha_panel(rgb: ArrayLike, alpha: ArrayLike, pad: int = 1) -> np.ndarray:
    """The alpha-mode decoder's output for one image as a 2-row grid.

    Top row: the K per-keypoint RGB images, then the reconstruction
    `sum_k alpha_k * rgb_k`. Bottom row: the K alpha maps in grey (white = 1),
    then the object mask (argmax over k of alpha) coloured with
    `prototype_palette(K)`, colour k for keypoint k.

    Args:
      rgb: `[K, H, W, 3]` float in [0, 1].
      alpha: `[K, H, W]` float in [0, 1] (softmax over K).
      pad: pixels between tiles (white).

    Returns:
      `[2 H + 3 pad, (K + 1) W + (K + 2) pad, 3]` uint8.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or alpha.shape != rgb.shape[:3]:
        raise ValueError(
            f"rgb must be [K, H, W, 3] and alpha [K, H, W], got {rgb.shape} and {alpha.shape}."
        )
    k = rgb.shape[0]
    reconstruction = (alpha[..., None] * rgb).sum(axis=0)
    mask = mask_to_rgb(np.argmax(alpha, axis=0), k) / 255.0
    tiles = np.concatenate(
        [
            rgb,
            reconstruction[None],
            np.repeat(alpha[..., None], 3, axis=-1),
            mask[None],
        ]
    )
    return image_grid(tiles, ncols=k + 1, pad=pad)


def save_png(path: str, image: ArrayLike) -> None:
    """Writes an image (see `to_uint8`) to a PNG file, creating parent folders.

    Args:
      path: destination file.
      image: `[H, W, 3]` or `[H, W]` float in [0, 1] or uint8.
    """
    image = to_uint8(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, 3], got {image.shape}.")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def figure_to_array(figure: Figure) -> np.ndarray:
    """Renders a matplotlib `Figure` with the Agg canvas to `[H, W, 3]` uint8."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _checked_tsne_inputs(descriptors, prototypes, labels):
    """`tsne_figure`'s inputs as float64 / int arrays; ValueError on bad shapes."""
    descriptors = np.asarray(descriptors, dtype=np.float64)
    prototypes = np.asarray(prototypes, dtype=np.float64)
    if descriptors.ndim != 2 or prototypes.ndim != 2:
        raise ValueError(
            f"descriptors and prototypes must be [N, C] and [M, C], got {descriptors.shape} "
            f"and {prototypes.shape}."
        )
    if descriptors.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"descriptors and prototypes differ in C: {descriptors.shape} vs {prototypes.shape}."
        )
    n = descriptors.shape[0]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be int with shape ({n},), got {labels.shape}.")
        if n and labels.min() < 0:
            raise ValueError("labels must be non-negative.")
    return descriptors, prototypes, labels


def tsne_figure(
    descriptors: ArrayLike,
    prototypes: ArrayLike,
    labels: ArrayLike | None = None,
    seed: int = 0,
    perplexity: float = 30.0,
    normalize: bool = True,
    max_iter: int = 1000,
    size_inches: float = 5.0,
    dpi: int = 100,
) -> np.ndarray:
    """t-SNE of descriptors and prototypes, as in the paper's Figures 3, 6 and 7.

    `sklearn.manifold.TSNE` (2-D, PCA init, `random_state=seed`) embeds the
    union of the descriptors and the prototypes; descriptors are drawn as dots
    coloured by ground-truth label (`prototype_palette(max(labels) + 1)`; grey
    without labels), prototypes as large black crosses.

    Args:
      descriptors: `[N, C]` keypoint descriptors.
      prototypes: `[M, C]` prototypes.
      labels: optional `[N]` non-negative int ground-truth label per descriptor.
      seed: t-SNE random state.
      perplexity: capped at `(N + M - 1) / 3` so small sets work.
      normalize: L2-normalise both sets first (as everywhere they are used,
        SPEC section 2).
      max_iter: t-SNE iterations (>= 250). t-SNE costs seconds for hundreds of
        points and minutes for thousands on a CPU: subsample before calling.
      size_inches, dpi: figure size; the image is `size_inches * dpi` square.

    Returns:
      `[H, W, 3]` uint8.
    """
    descriptors, prototypes, labels = _checked_tsne_inputs(descriptors, prototypes, labels)
    n = descriptors.shape[0]
    points = np.concatenate([descriptors, prototypes])
    if points.shape[0] < 2:
        raise ValueError("tsne_figure needs at least two points in all.")
    if normalize:
        points = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    perplexity = max(min(perplexity, (points.shape[0] - 1) / 3.0), 0.5)
    embedded = sklearn.manifold.TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        random_state=seed,
        max_iter=max_iter,
        # Exact gradients are faster than Barnes-Hut's tree below a few hundred points.
        method="exact" if points.shape[0] <= 300 else "barnes_hut",
    ).fit_transform(points)

    figure = Figure(figsize=(size_inches, size_inches), dpi=dpi)
    axes = figure.add_subplot(1, 1, 1)
    if labels is None:
        colors = np.full((n, 3), 0.6)
    else:
        colors = prototype_palette(int(labels.max()) + 1 if n else 1)[labels]
    axes.scatter(embedded[:n, 0], embedded[:n, 1], s=12, c=colors, linewidths=0)
    axes.scatter(embedded[n:, 0], embedded[n:, 1], s=90, c="black", marker="x", linewidths=2.0)
    axes.set_xticks([])
    axes.set_yticks([])
    # Frame and title in grey: pure black is kept for the prototype crosses.
    for spine in axes.spines.values():
        spine.set_color("0.5")
    axes.set_title(
        f"t-SNE: {n} descriptors (dots), {prototypes.shape[0]} prototypes (x)",
        fontsize=8,
        color="0.25",
    )
    figure.tight_layout()
    return figure_to_array(figure)


ALPHA_IMAGES = 3  # Images shown in the alpha-layer figure.


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def make_figures(
    first: dict[str, np.ndarray],
    prototypes: np.ndarray,
    prototype_renders: np.ndarray,
    tsne_descriptors: np.ndarray | None = None,
    tsne_labels: np.ndarray | None = None,
    tsne_seed: int = 0,
) -> dict[str, np.ndarray]:
    """The evaluation figures as uint8 `[H, W, 3]` arrays (also fit for TensorBoard).

    Args:
      first: a few images `image` `[N, H, W, 3]` and their `Detector.apply`
        outputs (`keypoints`, `confidence`, `prototype`, `reconstruction`,
        alpha mode: `rgb`, `alpha`).
      prototypes: `[M, C]` L2-normalised prototypes (their ids colour the
        keypoints).
      prototype_renders: `[M, H, W, 3]` each prototype decoded alone
        (`Detector.render_prototypes`).
      tsne_descriptors: optional `[P, C]` descriptors for the t-SNE.
      tsne_labels: optional `[P]` ground-truth classes colouring them.
      tsne_seed: t-SNE random state.

    Returns:
      dict name -> image: `detections` (keypoints coloured by prototype),
      `reconstructions` (inputs over reconstructions), `alpha` (alpha mode:
      per image, top row the K RGB layers and the reconstruction, bottom row
      the K alpha maps and the argmax mask), `prototypes` (each prototype
      decoded alone at the image centre, row-major in prototype order) and
      `tsne` when descriptors are given.
    """
    images = first["image"]
    n, height = images.shape[0], images.shape[1]
    m = prototypes.shape[0]
    scale = max(1, min(4, 160 // height))
    detections = [
        draw_keypoints(
            images[i],
            first["keypoints"][i],
            first["prototype"][i],
            m,
            first["confidence"][i],
            scale=scale,
        )
        for i in range(n)
    ]
    ncols = min(n, 4)
    figures = {
        "detections": image_grid(np.stack(detections), ncols=ncols, pad=2),
        "reconstructions": image_grid(
            np.stack(
                [_upscale(x, scale) for x in np.concatenate([images, first["reconstruction"]])]
            ),
            ncols=n,
            pad=2,
        ),
    }
    if "alpha" in first:
        alpha_scale = max(1, min(3, 96 // height))
        panels = [
            _upscale(alpha_panel(first["rgb"][i], first["alpha"][i]), alpha_scale)
            for i in range(min(n, ALPHA_IMAGES))
        ]
        gap = np.full((4, panels[0].shape[1], 3), 255, np.uint8)
        figures["alpha"] = np.concatenate([p for panel in panels for p in (panel, gap)][:-1])
    figures["prototypes"] = image_grid(
        np.stack([_upscale(r, scale) for r in prototype_renders]),
        ncols=math.ceil(math.sqrt(m)),
        pad=2,
    )
    if tsne_descriptors is not None and tsne_descriptors.shape[0] + m >= 4:
        figures["tsne"] = tsne_figure(
            tsne_descriptors, prototypes, labels=tsne_labels, seed=tsne_seed
        )
    return figures
