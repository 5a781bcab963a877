r"""Command line: a PNG montage of a dataset's evaluation examples with their ground truth.

  python -m tusk_jax.tools.montage --dataset=tetrominoes \
      --output=docs/datasets/tetrominoes.png
  python -m tusk_jax.tools.montage --dataset=mnist_hard --output=docs/datasets/mnist_hard.png

Each tile is one example of the eval
iterator at the training resolution; with ground truth drawn: object
discovery datasets get a second row with the entity-id mask in false
colours, mnist_hard its boxes and labels, landmark datasets their points.
Takes the same dataset flags as `tusk_jax.datasets.prepare` (and prepares
the dataset if it is missing).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from tusk_jax import cli, input_pipeline
from tusk_jax.datasets import prepare

_OUTPUT = flags.DEFINE_string("output", None, "PNG file to write.", required=True)
_NUM = flags.DEFINE_integer("num", 8, "Examples in the montage.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to show.")
_SCALE = flags.DEFINE_integer("scale", 1, "Integer upscaling of each tile (nearest).")

# Distinct colours for entity ids (0 = background, black).
_PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    np.uint8,
)


def _tile(image: np.ndarray, scale: int) -> Image.Image:
    tile = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def render(batch: dict[str, np.ndarray], count: int, scale: int = 1) -> Image.Image:
    """Montage of the first `count` examples of an eval batch (see module doc)."""
    tiles = []
    for k in range(count):
        tile = _tile(batch["image"][k], scale)
        draw = ImageDraw.Draw(tile)
        if "boxes" in batch:
            for (x0, y0, x1, y1), label in zip(batch["boxes"][k], batch["labels"][k], strict=True):
                box = [(x0 + 0.5) * scale, (y0 + 0.5) * scale, (x1 + 0.5) * scale - 1,
                       (y1 + 0.5) * scale - 1]  # fmt: skip
                draw.rectangle(box, outline=(255, 64, 64))
                draw.text((box[0] + 1, box[1]), str(int(label)), fill=(64, 255, 64))
        if "landmarks" in batch:
            for x, y in batch["landmarks"][k]:
                cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(255, 64, 64))
        if "mask" in batch:
            ids = np.asarray(batch["mask"][k]) % len(_PALETTE)
            below = _tile(_PALETTE[ids].astype(np.float32) / 255, scale)
            pair = Image.new("RGB", (tile.width, tile.height * 2))
            pair.paste(tile, (0, 0))
            pair.paste(below, (0, tile.height))
            tile = pair
        tiles.append(tile)
    width, height = tiles[0].size
    gap = 2
    canvas = Image.new("RGB", (count * (width + gap) - gap, height), (128, 128, 128))
    for k, tile in enumerate(tiles):
        canvas.paste(tile, (k * (width + gap), 0))
    return canvas


def main(argv):
    cli.start(argv)
    config = prepare.config_from_flags()
    batch = next(input_pipeline.create_eval_iterator(config, _SPLIT.value, _NUM.value))
    count = int(batch["valid"].sum())
    image = render(batch, count, _SCALE.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    image.save(_OUTPUT.value, optimize=True)
    print(f"wrote {_OUTPUT.value} ({image.width}x{image.height}, {count} examples)")


if __name__ == "__main__":
    app.run(main)
