r"""The prototypes of each checkpoint of runs: raw norms and how far apart they point.

  python docs/results/fidelity/prototype_geometry.py WORKDIR...

The prototypes are trained as raw `[M, C]` vectors and L2-normalised wherever
they are used (SPEC section 3), so an Adam step moves a prototype's direction
by about its length divided by the raw norm: a prototype whose raw norm has
grown turns slowly. Printed per checkpoint: the raw norms (min / median /
max) and the cosine between the prototypes' directions (mean and max over the
pairs; near 1 when every prototype points the same way).
"""

import sys

import numpy as np

from tusk_jax import checkpointing


def geometry(prototypes: np.ndarray) -> dict:
    """Norms and pairwise cosines of raw `[M, C]` prototypes."""
    norms = np.linalg.norm(prototypes, axis=1)
    directions = prototypes / norms[:, None]
    cosines = (directions @ directions.T)[~np.eye(len(norms), dtype=bool)]
    return {
        "norm_min": norms.min(),
        "norm_median": np.median(norms),
        "norm_max": norms.max(),
        "cos_mean": cosines.mean(),
        "cos_max": cosines.max(),
    }


def main(workdirs: list[str]) -> None:
    print("| run | step | raw norm min / median / max | cosine mean / max |")
    print("|---|---|---|---|")
    for workdir in workdirs:
        config = checkpointing.resolve_config(workdir)
        for step in checkpointing.saved_steps(workdir):
            state, _ = checkpointing.restore_state(workdir, config, step)
            g = geometry(np.asarray(state.prototypes))
            print(
                f"| {workdir} | {step} | {g['norm_min']:.1f} / {g['norm_median']:.1f} / "
                f"{g['norm_max']:.1f} | {g['cos_mean']:.2f} / {g['cos_max']:.2f} |"
            )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
