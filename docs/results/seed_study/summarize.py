"""Seed-study table: mean +- std over seeds of each rounding at each evaluated step.

    python docs/results/seed_study/summarize.py docs/results/seed_study/*_metrics.json

Reads `evaluate`'s metrics.json files named `<rounding>_s<seed>_step<step>_metrics.json`
and prints one Markdown row per (rounding, step): ARI-FG, colour, shape, matched
fraction and the largest prototype's share, in percent.
"""

import collections
import json
import os
import re
import sys

import numpy as np

FIELDS = (
    ("ari_fg", "ARI-FG"),
    ("color_accuracy", "colour"),
    ("shape_accuracy", "shape"),
    ("matched_keypoint_fraction", "matched"),
    ("largest_prototype_share", "largest share"),
)


def main(paths):
    groups = collections.defaultdict(list)
    for path in paths:
        match = re.match(r"(.+)_s(\d+)_step(\d+)_metrics\.json$", os.path.basename(path))
        if not match:
            continue
        rounding, seed, step = match.group(1), int(match.group(2)), int(match.group(3))
        with open(path) as f:
            groups[(rounding, step)].append((seed, json.load(f)["metrics"]))
    print("| rounding | step | seeds | " + " | ".join(label for _, label in FIELDS) + " |")
    print("|---|---|---|" + "---|" * len(FIELDS))
    for (rounding, step), runs in sorted(groups.items()):
        cells = []
        for field, _ in FIELDS:
            values = 100.0 * np.array([m[field] for _, m in runs], float)
            std = f" +- {values.std(ddof=1):.1f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.1f}{std}")
        seeds = ", ".join(str(s) for s, _ in sorted(runs, key=lambda r: r[0]))
        print(f"| `{rounding}` | {step} | {seeds} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
