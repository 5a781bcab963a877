"""The printed evaluation table: the metrics beside the paper's, in percent.

`tusk_jax.evaluate` prints it after each evaluation (and re-exports it as
`evaluate.format_table`); the purity lines come from `evaluators.purity`.
"""

from __future__ import annotations

from typing import Any

from tusk_jax import datasets, evaluators


def format_table(result: dict[str, Any]) -> str:
    """The metrics beside the paper's (SPEC 8) in percent, then `purity.summary_lines`."""
    name, found = result["dataset"], result["metrics"]
    note = evaluators.purity.matched_note  # Attribute accuracies come with the matched fraction.
    rows = [("metric", "ours", "TUSK paper", "best other in the paper")]
    shown = {"num_examples", *evaluators.purity.LARGEST}
    paper = datasets.get_info(name).paper if name in datasets.names() else ()
    for row in paper:
        value = found.get(row.metric)
        ours = "n/a" if value is None else f"{100.0 * float(value):.2f}{note(row.metric, found)}"
        rows.append((row.label, ours, f"{row.tusk:.2f}", row.best_other or "-"))
        shown.add(row.metric)
    extra = [k for k, v in found.items() if k not in shown and isinstance(v, (int, float))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    objects = result.get("num_objects")
    lines = [
        f"{name} / {result['split']}, step {result['step']}, K = {result['num_keypoints']}, "
        f"{found['num_examples']} examples"
        + (f", {objects} objects per scene" if objects else "")
        + (f", {found['regressor']} regressor" if found.get("regressor") else ""),
    ]
    for i, row in enumerate(rows):
        cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if extra:
        lines.append("other: " + ", ".join(f"{k} = {found[k]:.4g}{note(k, found)}" for k in extra))
    return "\n".join(lines + evaluators.purity.summary_lines(found))
