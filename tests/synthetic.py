"""Synthetic in-memory images shared by the training tests (not a test module)."""

import numpy as np

IMAGE_SIZE = 16


def squares(seed, count, size=IMAGE_SIZE):
    """`[count, size, size, 3]` float32 images in [0, 1]: two 5x5 coloured squares on black."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size, 3), np.float32)
    for image in images:
        for _ in range(2):
            x, y = rng.integers(0, size - 5, 2)
            image[y : y + 5, x : x + 5] = rng.uniform(0.3, 1.0, 3)
    return images
