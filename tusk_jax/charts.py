"""Charts of evaluation statistics (matplotlib, Agg canvas): the prototype purity figure.

Pictures of images and keypoints live in `tusk_jax.visualization`, whose
palette and canvas helpers these charts share; outputs are `uint8 [H, W, 3]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from tusk_jax import visualization


def _checked_usage(usage: ArrayLike) -> np.ndarray:
    array = np.asarray(usage)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"usage must be [M] counts with M >= 1, got shape {array.shape}.")
    if (array < 0).any():
        raise ValueError("usage must be non-negative counts.")
    return array.astype(np.float64)


def purity_figure(
    usage: ArrayLike,
    purity: Sequence[dict[str, Any]] | None = None,
    size_inches: tuple[float, float] = (5.0, 4.0),
    dpi: int = 100,
) -> np.ndarray:
    """Each prototype's share of all keypoints, over its purity per attribute.

    Top panel: one bar per prototype, its share of the keypoints in percent, in
    the prototype's colour (`visualization.prototype_palette(M)`, as in the
    detection figure), a dashed line at the uniform share 100 / M. Bottom panel
    (when `purity` has rows): for each prototype with matched keypoints, one bar
    per attribute, its purity in percent, with the matched count above.

    Args:
      usage: `[M]` keypoints per prototype (`prototype_usage`).
      purity: the `prototype_purity` rows (`evaluators.purity.prototype_purity`):
        `prototype`, `matched`, `purity` (attribute -> fraction).
      size_inches: figure (width, height) in inches.
      dpi: pixels per inch.

    Returns:
      `[H, W, 3]` uint8, `size_inches * dpi` pixels.
    """
    usage = _checked_usage(usage)
    m = usage.size
    purity = list(purity or [])
    if any(not 0 <= row["prototype"] < m for row in purity):
        raise ValueError(f"purity rows must name prototypes in [0, {m}).")
    figure = Figure(figsize=size_inches, dpi=dpi)
    if purity:
        top, bottom = figure.subplots(2, 1, sharex=True)
    else:
        top, bottom = figure.subplots(), None
    top.bar(
        np.arange(m),
        100.0 * usage / max(usage.sum(), 1.0),
        color=visualization.prototype_palette(m),
    )
    top.axhline(100.0 / m, color="0.4", linestyle="--", linewidth=1)
    top.set_ylabel("% of keypoints", fontsize=8)
    top.set_title("share of keypoints (dashed: uniform); purity of matched keypoints", fontsize=8)
    last = top
    if bottom is not None:
        names = list(purity[0]["purity"])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            x = [row["prototype"] - 0.4 + (j + 0.5) * width for row in purity]
            y = [100.0 * row["purity"][name] for row in purity]
            bottom.bar(x, y, width=width, label=name, color=matplotlib.colormaps["Set2"](j))
        # Past a dozen prototypes the counts stand upright, without "n=", to stay apart.
        crowded = m > 12
        for row in purity:
            bottom.text(
                row["prototype"],
                102,
                str(row["matched"]) if crowded else f"n={row['matched']}",
                ha="center",
                va="bottom",
                fontsize=5 if crowded else 6,
                rotation=90 if crowded else 0,
            )
        bottom.set_ylim(0, 140 if crowded else 118)
        bottom.set_ylabel("purity %", fontsize=8)
        bottom.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        last = bottom
    tick_step = -(-m // 32)  # At most 32 labelled prototypes (M = 114: every 4th).
    last.set_xticks(np.arange(0, m, tick_step))
    if m > 16:
        last.tick_params(axis="x", labelrotation=90)
    last.set_xlabel("prototype (n: its matched keypoints)", fontsize=8)
    for axes in figure.axes:
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    return visualization.figure_to_array(figure)
