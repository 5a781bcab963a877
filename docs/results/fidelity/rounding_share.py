r"""Share of the mixture samples the last prototype gets under each count rounding.

  python docs/results/fidelity/rounding_share.py

`ops.prototype_counts` on synthetic batches: M unit prototypes of C = 32
channels, U of them in use, N descriptors drawn around the used ones (noise
0.1, normalised), 20 random batches per setting. Printed per
setting: the mean share of the N samples given to the last prototype with
the release's rounding (`last`) and the largest share of any prototype with
`largest_remainder`.
"""

import jax.numpy as jnp
import numpy as np

from tusk_jax import ops

SETTINGS = (  # (name, N descriptors, M prototypes, U in use)
    ("Tetrominoes :cpu (8 pairs x 2 images x 3 keypoints)", 48, 32, 27),
    ("Tetrominoes, the release (76 pairs x 2 x 3, gathered over 2 GPUs)", 456, 114, 114),
    ("Tetrominoes, the README's M = 114 CPU run (20 pairs x 2 x 3)", 120, 114, 55),
    ("MNIST-Hard :cpu (8 pairs x 2 x 9 keypoints)", 144, 10, 10),
)
CHANNELS = 32


def main():
    rng = np.random.default_rng(0)
    print(
        "| setting | N | M | U | `last`: last prototype's share | `largest_remainder`: top share |"
    )
    print("|---|---|---|---|---|---|")
    for name, n, m, in_use in SETTINGS:
        last, largest = [], []
        for _ in range(20):
            prototypes = rng.normal(size=(m, CHANNELS))
            prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
            used = rng.choice(m, size=in_use, replace=False)
            descriptors = prototypes[rng.choice(used, n)] + 0.1 * rng.normal(size=(n, CHANNELS))
            descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
            args = jnp.asarray(descriptors, jnp.float32), jnp.asarray(prototypes, jnp.float32)
            last.append(int(ops.prototype_counts(*args, "last")[-1]) / n)
            largest.append(int(ops.prototype_counts(*args, "largest_remainder").max()) / n)
        print(f"| {name} | {n} | {m} | {in_use} | {np.mean(last):.2f} | {np.mean(largest):.2f} |")


if __name__ == "__main__":
    main()
