"""Seed-study table: mean +- std over seeds of each rounding at each evaluated step.

    python docs/results/seed_study/summarize.py docs/results/seed_study/*_metrics.json

Reads `evaluate`'s metrics.json files named `<rounding>_s<seed>_step<step>_metrics.json`
and prints Markdown rows, in percent: ARI-FG, colour, shape, matched fraction, the
largest prototype's share, that prototype's colour purity (of its matched
keypoints) and the colour accuracy it alone leaves (`with_catch_all_fields`), and
the prototypes in use (count). First the mean +- std (sample std,
ddof 1) per (rounding, step), then, with --per_seed, one row per run; last, the
decision rule of README.md applied at step 4000.
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
    ("largest_colour_purity", "its colour purity"),
    ("colour_cap", "colour cap"),
    ("prototypes_in_use", "in use"),
)
# The decision rule (README.md): the candidate replaces the release's rounding only
# if its mean beats the release's on at least two of these by more than the
# standard error of the difference of the means.
RULE_STEP, RULE_FIELDS = 4000, ("ari_fg", "color_accuracy", "shape_accuracy")
RELEASE, CANDIDATE = "last", "largest_remainder"
PERCENT = {field for field, _ in FIELDS} - {"prototypes_in_use"}


def with_catch_all_fields(metrics):
    """`metrics` plus two numbers of its largest prototype (the catch-all).

    `largest_colour_purity`: its colour purity over its matched keypoints
    (nan if none). `colour_cap`: the colour accuracy it leaves when every other
    prototype is pure, 1 - (its share of the matched keypoints) x (1 - purity).
    """
    rows = {entry["prototype"]: entry for entry in metrics["prototype_purity"]}
    row = rows.get(metrics["largest_prototype"])
    if row is None:
        return {**metrics, "largest_colour_purity": np.nan, "colour_cap": np.nan}
    matched_total = metrics["matched_keypoint_fraction"] * sum(metrics["prototype_usage"])
    purity = row["purity"]["color"]
    cap = 1.0 - row["matched"] / matched_total * (1.0 - purity)
    return {**metrics, "largest_colour_purity": purity, "colour_cap": cap}


def cells(runs):
    out = []
    for field, _ in FIELDS:
        scale = 100.0 if field in PERCENT else 1.0
        values = scale * np.array([m[field] for m in runs], float)
        std = f" +- {values.std(ddof=1):.1f}" if len(values) > 1 else ""
        out.append(f"{values.mean():.1f}{std}")
    return out


def main(args):
    per_seed = "--per_seed" in args
    paths = [a for a in args if a != "--per_seed"]
    groups = collections.defaultdict(list)
    for path in paths:
        match = re.match(r"(.+)_s(\d+)_step(\d+)_metrics\.json$", os.path.basename(path))
        if not match:
            continue
        rounding, seed, step = match.group(1), int(match.group(2)), int(match.group(3))
        with open(path) as f:
            metrics = with_catch_all_fields(json.load(f)["metrics"])
        groups[(rounding, step)].append((seed, metrics))
    print("| rounding | step | seeds | " + " | ".join(label for _, label in FIELDS) + " |")
    print("|---|---|---|" + "---|" * len(FIELDS))
    for (rounding, step), runs in sorted(groups.items()):
        seeds = ", ".join(str(s) for s, _ in sorted(runs, key=lambda r: r[0]))
        row = " | ".join(cells([m for _, m in runs]))
        print(f"| `{rounding}` | {step} | {seeds} | {row} |")
    if per_seed:
        for (rounding, step), runs in sorted(groups.items()):
            for seed, metrics in sorted(runs, key=lambda r: r[0]):
                print(f"| `{rounding}` | {step} | {seed} | " + " | ".join(cells([metrics])) + " |")

    decide(groups)


def decide(groups):
    release, candidate = groups.get((RELEASE, RULE_STEP)), groups.get((CANDIDATE, RULE_STEP))
    if not release or not candidate:
        return
    wins = 0
    print(f"\nDecision rule at step {RULE_STEP} ({CANDIDATE} - {RELEASE}, percent points):")
    for field in RULE_FIELDS:
        a = 100.0 * np.array([m[field] for _, m in candidate])
        b = 100.0 * np.array([m[field] for _, m in release])
        difference = a.mean() - b.mean()
        stderr = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
        wins += difference > stderr
        print(f"  {field}: {difference:+.2f} (standard error {stderr:.2f})")
    verdict = CANDIDATE if wins >= 2 else RELEASE
    print(f"  {CANDIDATE} better beyond the standard error on {wins} of 3: default {verdict}")


if __name__ == "__main__":
    main(sys.argv[1:])
