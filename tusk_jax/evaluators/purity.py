"""What each prototype stands for: per-prototype purity, the largest prototype's share.

An accuracy by majority label (`base.majority_accuracy`) sums over prototypes;
these figures take it apart. A prototype's purity for an attribute is the
count of its majority label over its matched keypoints (object discovery) or
matched detections (MNIST-Hard); a prototype nearest to a large share of all
keypoints while its purity is low is a catch-all. The text lines here are the
printed evaluation table's (`tusk_jax.eval_table.format_table`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# Metric fields this module fills (`largest_prototype` fields come from every evaluator).
LARGEST = ("largest_prototype", "largest_prototype_share")
PURITY = "prototype_purity"
# The fraction of keypoints the attribute accuracies rest on (object discovery).
MATCHED_FRACTION = "matched_keypoint_fraction"


def prototype_purity(counts: Mapping[str, ArrayLike]) -> list[dict[str, Any]]:
    """Majority label and purity per prototype, for every prototype with a matched item.

    Args:
      counts: attribute name -> `[M, V]` int counts of (prototype, label) over
        the matched keypoints of a split (`base.label_counts` summed). Every
        matched keypoint is counted once per attribute, so the rows of all
        matrices have the same sums.

    Returns:
      One JSON-safe dict per prototype whose row sum is > 0, by prototype index:
      `prototype` (int), `matched` (its matched keypoints), `majority`
      (attribute -> majority label, ties to the lowest label as
      `base.majority_mapping`) and `purity` (attribute -> majority count /
      matched, in (0, 1]).
    """
    arrays = {name: np.asarray(c, np.int64) for name, c in counts.items()}
    if not arrays:
        return []
    sums = {name: c.sum(axis=1) for name, c in arrays.items()}
    first = next(iter(sums.values()))
    for name, s in sums.items():
        if s.shape != first.shape or not np.array_equal(s, first):
            raise ValueError(f"counts of {name!r} count other keypoints than the first attribute.")
    rows = []
    for m in np.nonzero(first > 0)[0]:
        n = int(first[m])
        rows.append(
            {
                "prototype": int(m),
                "matched": n,
                "majority": {name: int(np.argmax(c[m])) for name, c in arrays.items()},
                "purity": {name: float(c[m].max() / n) for name, c in arrays.items()},
            }
        )
    return rows


def largest_prototype(usage: ArrayLike) -> dict[str, Any]:
    """The prototype nearest to the most keypoints and its share of all of them.

    Args:
      usage: `[M]` int, keypoints whose nearest prototype is m (`prototype_usage`).

    Returns:
      dict `largest_prototype` (int index, ties to the lowest; -1 when no
      keypoint was seen) and `largest_prototype_share` (its count / all
      counts, in [1/M, 1]; NaN when no keypoint was seen). A uniform mixture
      gives 1/M.
    """
    usage = np.asarray(usage, np.int64)
    total = int(usage.sum())
    if total == 0:
        return {LARGEST[0]: -1, LARGEST[1]: float("nan")}
    index = int(np.argmax(usage))
    return {LARGEST[0]: index, LARGEST[1]: float(usage[index] / total)}


def matched_note(metric: str, metrics: Mapping[str, Any]) -> str:
    """` (on 9.4 % of keypoints matched)` after an attribute accuracy, else ``.

    Attribute accuracies (`<attribute>_accuracy`) rest on the matched keypoints
    only; the printed table quotes them with that fraction.
    """
    fraction = metrics.get(MATCHED_FRACTION)
    if not metric.endswith("_accuracy") or not isinstance(fraction, (int, float)):
        return ""
    return f" (on {100.0 * fraction:.1f} % of keypoints matched)"


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f} %"


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The printed lines: the largest prototype's share, then one row per used prototype.

    Columns: prototype, its share of all keypoints (`prototype_usage`), its
    matched keypoints, and per attribute `majority (purity)`; `-` where a
    prototype matched nothing. Empty when `metrics` has no `prototype_usage`.
    """
    usage = metrics.get("prototype_usage")
    if not usage:
        return []
    usage = np.asarray(usage, np.int64)
    total = int(usage.sum())
    share = metrics.get(LARGEST[1], float("nan"))
    if not isinstance(share, float) or math.isnan(share):
        return ["largest prototype: none (no keypoint)"]
    lines = [
        f"largest prototype: {metrics[LARGEST[0]]}, nearest to {_percent(share)} of all "
        f"keypoints (uniform: {_percent(1.0 / usage.size)})"
    ]
    purity = {row["prototype"]: row for row in metrics.get(PURITY, [])}
    names = list(next(iter(purity.values()))["purity"]) if purity else []
    table = [["prototype", "keypoints", "matched", *names]]
    for m in np.nonzero(usage > 0)[0]:
        row = purity.get(int(m))
        cells = [str(m), _percent(usage[m] / total), str(row["matched"]) if row else "0"]
        for name in names:
            cells.append(
                f"{row['majority'][name]} ({_percent(row['purity'][name])})" if row else "-"
            )
        table.append(cells)
    if names:
        lines.append("per prototype: majority label (purity) of its matched keypoints")
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return lines
