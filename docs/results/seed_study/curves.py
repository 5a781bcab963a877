"""Seed-study training curves: prototypes in use per batch and L_sw, per run.

    python docs/results/seed_study/curves.py docs/results/seed_study/*_train_metrics.jsonl

Reads the training logs named `<rounding>_s<seed>_train_metrics.jsonl` (the
`metrics.jsonl` of each run, every 25 steps) and writes `curves.png` beside
this script: one colour per rounding, one line style per seed.
"""

import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

PANELS = (("prototypes_in_use", "prototypes in use per batch"), ("loss/sw", "L_sw"))
STYLES = ("-", "--", ":")


def main(paths):
    figure, axes = plt.subplots(1, len(PANELS), figsize=(10, 3.5))
    colours = {}
    for path in sorted(paths):
        match = re.match(r"(.+)_s(\d+)_train_metrics\.jsonl$", os.path.basename(path))
        if not match:
            continue
        rounding, seed = match.group(1), int(match.group(2))
        colour = colours.setdefault(rounding, f"C{len(colours)}")
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        steps = [r["step"] for r in records]
        for ax, (field, title) in zip(axes, PANELS, strict=True):
            ax.plot(
                steps,
                [r[field] for r in records],
                color=colour,
                linestyle=STYLES[seed % len(STYLES)],
                linewidth=1,
                label=f"{rounding} s{seed}",
            )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "curves.png")
    figure.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
