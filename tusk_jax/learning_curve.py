"""Learning curves: the evaluation metrics of every kept checkpoint of a run, against the step.

    python -m tusk_jax.learning_curve --workdir=runs/tetrominoes [--num_examples=500] [--every=1]
    python -m tusk_jax.learning_curve --runs=runs/a,runs/b --labels=lr1e-3,lr3e-3 --out=lr.png

For a workdir: evaluates each kept checkpoint step (multiples of `every`)
not yet in `<workdir>/learning_curve.json` with `tusk_jax.evaluate.evaluate`
(no figures; one `Detector`, so the network compiles once), merges the
training metrics logged at that step (`train/...`, `wall_seconds`), and
rewrites `learning_curve.json` (rows sorted by step) and `learning_curve.png`
(one panel per metric). Re-running continues a curve; rows of deleted
checkpoints stay; a curve made with other settings (split, K, examples) is
refused, not mixed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tusk_jax import checkpointing, cli, datasets, evaluate, inference, input_pipeline, summaries

CURVE_FILE = "learning_curve.json"
PLOT_FILE = "learning_curve.png"
DEFAULT_NUM_EXAMPLES = 500  # Test examples per step: a cheap but stable estimate.
TRAIN_PREFIX = "train/"
# Training metrics (metrics.jsonl names) merged into the rows besides every `loss/*`.
TRAIN_KEYS = ("prototypes_in_use", "steps_per_second")
# Row fields that are not evaluation metrics.
SETTINGS = ("dataset", "split", "num_keypoints")
# `largest_prototype` is an index: kept in the rows, not drawn (its share is).
NOT_PLOTTED = ("step", "wall_seconds", "num_examples", "largest_prototype", *SETTINGS)
# The training metric drawn beside the evaluation metrics.
TRAIN_PANELS = (TRAIN_PREFIX + "loss/recon",)


# ----------------------------------------------------------------------------
# Reading a run.
# ----------------------------------------------------------------------------


def kept_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps in `<workdir>/checkpoints`, ascending.

    Raises:
      FileNotFoundError: no checkpoint folder, or no complete step in it.
    """
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoint in {workdir!r}: {directory} does not exist.")
    manager = checkpointing.create_manager(workdir, use_async=False)
    try:
        steps = sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {workdir!r}: {directory} holds no step.")
    return steps


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def training_metrics(workdir: str, log_every: int) -> dict[int, dict[str, float | None]]:
    """The training metrics of `<workdir>/metrics.jsonl` by logged step.

    The run's log records no clock time, but each record's
    `steps_per_second` is measured over the wall-clock interval since the
    previous record (`train.fit`), so the training time is
    the sum over records of steps / steps_per_second: `wall_seconds`. It
    covers the training loop (first-step compilation, image summaries and
    checkpoint saves included), not the start-up before the loop nor the
    time between a stop and a resume. A resumed run that logs a step again
    (it restarted from an earlier checkpoint) adds the redone interval, taken
    to start at the multiple of `log_every` before it; the later record of a
    step wins.

    Args:
      workdir: the training workdir.
      log_every: the run's `train.log_every`.

    Returns:
      step -> `train/loss/...`, `train/prototypes_in_use`,
      `train/steps_per_second` and `wall_seconds` (None once a record has no
      usable `steps_per_second`); empty without metrics.jsonl.
    """
    out: dict[int, dict[str, float | None]] = {}
    elapsed: float | None = 0.0
    previous = 0
    for record in summaries.read_metrics(workdir):
        step = int(record["step"])
        if step > previous:
            interval = step - previous
        else:  # Resumed from a checkpoint before `previous`.
            interval = step - log_every * ((step - 1) // log_every)
        speed = _finite_or_none(record.get("steps_per_second"))
        if elapsed is not None and speed is not None and speed > 0:
            elapsed += interval / speed
        else:
            elapsed = None
        row: dict[str, float | None] = {
            TRAIN_PREFIX + name: _finite_or_none(value)
            for name, value in record.items()
            if name.startswith("loss/") or name in TRAIN_KEYS
        }
        row["wall_seconds"] = elapsed
        out[step] = row
        previous = step
    return out


def read_curve(path: str) -> list[dict[str, Any]]:
    """The rows of a `learning_curve.json` (empty if the file does not exist).

    Raises:
      ValueError: the file is not a JSON list of rows with a `step`.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "step" in r for r in rows):
        raise ValueError(f"{path}: expected a JSON list of rows with a 'step' each.")
    return rows


def _write_json(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)


def result_row(result: dict[str, Any]) -> dict[str, Any]:
    """A curve row from an `evaluate.evaluate` result: settings and scalar metrics."""
    row: dict[str, Any] = {"step": int(result["step"])}
    row.update({name: result[name] for name in SETTINGS})
    for name, value in result["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # Lists (prototype usage, CED curves) are not curve points.
        row[name] = int(value) if isinstance(value, int) else _finite_or_none(value)
    return row


# ----------------------------------------------------------------------------
# Updating a run's curve.
# ----------------------------------------------------------------------------


def _check_settings(config, num_examples: int, rows: dict[int, dict], path: str) -> None:
    """ValueError if the curve's rows were evaluated with other settings than these."""
    split = config.dataset.get("eval_split", "test")
    total = input_pipeline.get_num_examples(config, split)
    settings = {
        "dataset": config.dataset.name,
        "split": split,
        "num_keypoints": int(config.model.num_keypoints),
        "num_examples": total if num_examples == -1 else min(total, int(num_examples)),
    }
    for step, row in sorted(rows.items()):
        differing = [
            f"{k}={row.get(k)!r} (now {v!r})" for k, v in settings.items() if row.get(k) != v
        ]
        if differing:
            raise ValueError(
                f"{path} was made with other evaluation settings: step {step} has "
                + ", ".join(differing)
                + ". Re-run with the same settings, or move the file away to start a new curve."
            )


def update_learning_curve(
    workdir: str,
    *,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    every: int = 1,
    batch_size: int | None = None,
    progress: bool = True,
    detector: inference.Detector | None = None,
    plot: bool = True,
) -> list[dict[str, Any]]:
    """Evaluates the new kept steps of a run and rewrites its curve files (module docstring).

    Args:
      workdir: the training workdir.
      num_examples: test examples per step (-1: the whole split).
      every: only the kept steps that are multiples of this (training steps,
        e.g. 500); 1: every kept step.
      batch_size: images per evaluation batch (None: `train.batch_size`).
      progress: show the evaluation progress bars.
      detector: a `Detector` of the run's model to reuse (None: a new one);
        each step's weights are swapped into it, so the network compiles once.
      plot: also write `learning_curve.png`.

    Returns:
      The rows of `learning_curve.json`, sorted by step.

    A step that fails its checksum or cannot be read is logged and left out.

    Raises:
      FileNotFoundError: no config or checkpoint in `workdir`.
      ValueError: `every` < 1, a bad `num_examples`, or a curve file made
        with other settings.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}.")
    workdir = os.path.abspath(workdir)
    config = evaluate.prepare_config(None, workdir, num_examples=num_examples)
    wanted = [s for s in kept_steps(workdir) if s % every == 0]
    path = os.path.join(workdir, CURVE_FILE)
    rows = {int(r["step"]): r for r in read_curve(path)}

    _check_settings(config, num_examples, rows, path)

    todo = [s for s in wanted if s not in rows]
    logging.info(
        "Learning curve of %s: %d kept steps (multiples of %d), %d already evaluated, %d to do.",
        workdir,
        len(wanted),
        every,
        len(wanted) - len(todo),
        len(todo),
    )
    if todo and detector is None:
        # Zeros of the right shapes: `evaluate` swaps each step's weights in.
        template = checkpointing.state_template(config)
        detector = inference.Detector(config, template.params, template.prototypes, workdir=workdir)
    for step in todo:
        result = _evaluate_step(workdir, step, num_examples, batch_size, progress, detector)
        if result is None:
            continue
        rows[step] = result_row(result)
        _write_json(path, _merge_training(rows, workdir, config.train.log_every))
    merged = _merge_training(rows, workdir, config.train.log_every)
    _write_json(path, merged)
    if plot and merged:
        save_figure(plot_curves([merged], title=os.path.basename(workdir)), workdir_plot(workdir))
    return merged


def _evaluate_step(workdir, step, num_examples, batch_size, progress, detector):
    """`evaluate.evaluate`'s result at `step`, or None for a step to leave out (logged)."""
    try:
        return evaluate.evaluate(
            None,
            workdir,
            step=step,
            num_examples=num_examples,
            batch_size=batch_size,
            figures=False,
            write=False,
            progress=progress,
            detector=detector,
        )
    except FileNotFoundError:
        if step in kept_steps(workdir):
            raise
        logging.warning("Step %d was deleted by the training run meanwhile; skipped.", step)
    except checkpointing.CorruptCheckpointError as error:
        # One damaged step should not cost the rest of the curve; it is left
        # out (and tried again on the next update).
        logging.warning("%s Left out of the learning curve.", error)
    return None


def workdir_plot(workdir: str) -> str:
    """`<workdir>/learning_curve.png`."""
    return os.path.join(os.path.abspath(workdir), PLOT_FILE)


def _merge_training(
    rows: dict[int, dict[str, Any]], workdir: str, log_every: int
) -> list[dict[str, Any]]:
    """Rows sorted by step, with the training metrics of their step (or the last before it)."""
    logged = training_metrics(workdir, log_every)
    logged_steps = sorted(logged)
    merged = []
    for step in sorted(rows):
        row = {k: v for k, v in rows[step].items() if not k.startswith(TRAIN_PREFIX)}
        before = [s for s in logged_steps if s <= step]
        train = logged[before[-1]] if before else {"wall_seconds": None}
        row["wall_seconds"] = train["wall_seconds"]
        row.update({k: v for k, v in train.items() if k.startswith(TRAIN_PREFIX)})
        # `step` and `wall_seconds` first, for people reading the file.
        ordered = {"step": step, "wall_seconds": row.pop("wall_seconds")}
        ordered.update({k: v for k, v in row.items() if k != "step"})
        merged.append(ordered)
    return merged


# ----------------------------------------------------------------------------
# Plots and tables.
# ----------------------------------------------------------------------------


def plotted_metrics(curves: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
    """The panels: evaluation metrics (the paper's for the dataset first), then `TRAIN_PANELS`."""
    found: list[str] = []
    for rows in curves:
        for row in rows:
            for name in row:
                if name not in NOT_PLOTTED and not name.startswith(TRAIN_PREFIX):
                    if name not in found:
                        found.append(name)
    names = {rows[0].get("dataset") for rows in curves if rows} & set(datasets.names())
    paper = [
        row.metric
        for rows in curves
        if rows and rows[0].get("dataset") in names
        for row in datasets.get_info(rows[0]["dataset"]).paper
    ]
    first = [k for k in dict.fromkeys(paper) if k in found]
    panels = first + [k for k in found if k not in first]
    for name in TRAIN_PANELS:
        if any(row.get(name) is not None for rows in curves for row in rows):
            panels.append(name)
    return panels


def plot_curves(
    curves: Sequence[Sequence[dict[str, Any]]],
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per metric (`plotted_metrics`) against the step; one line per curve.

    Args:
      curves: the rows of each run (`update_learning_curve`).
      labels: one legend label per curve (None: no legend).
      title: figure title.

    Returns:
      A matplotlib `Figure` (Agg canvas, no pyplot state); line i of every
      panel is curve i, missing values left out.
    """
    if labels is not None and len(labels) != len(curves):
        raise ValueError(f"labels: {len(labels)} labels for {len(curves)} curves.")
    panels = plotted_metrics(curves)
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    width, height = 4.2 * ncols, 3.0 * nrows + (0.3 if title else 0.0)
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    # Fixed margins in inches (a constrained layout costs seconds per figure).
    figure.subplots_adjust(
        left=0.55 / width,
        right=1 - 0.15 / width,
        bottom=0.45 / height,
        top=1 - (0.65 if title else 0.35) / height,
        wspace=0.3,
        hspace=0.55,
    )
    for index, name in enumerate(panels):
        ax = figure.add_subplot(nrows, ncols, index + 1)
        for i, rows in enumerate(curves):
            points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                label=None if labels is None else labels[i],
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if index == 0 and labels is not None:
            ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def save_figure(figure: Figure, path: str) -> None:
    """Writes `figure` as a PNG (atomically)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.png")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    logging.info("Wrote %s", path)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A text table: step, training minutes, training loss/recon and the evaluation metrics."""
    panels = [p for p in plotted_metrics([rows]) if not p.startswith(TRAIN_PREFIX)]
    columns = ["step", "wall_min", TRAIN_PREFIX + "loss/recon", *panels]
    table = [columns]
    for row in rows:
        wall = row.get("wall_seconds")
        values = dict(row, wall_min=None if wall is None else wall / 60.0)
        table.append([_cell(values.get(c)) for c in columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command-line flags (called by `__main__` only)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "The training workdir whose curve to update.", **fv)
    flags.DEFINE_list(
        "runs", None, "Several workdirs drawn on the same axes into --out (ablations).", **fv
    )
    flags.DEFINE_list("labels", None, "Legend labels of --runs; default: their folder names.", **fv)
    flags.DEFINE_string("out", None, "PNG written with --runs.", **fv)
    flags.DEFINE_integer(
        "num_examples", DEFAULT_NUM_EXAMPLES, "Test examples per step; -1: the whole split.", **fv
    )
    flags.DEFINE_integer(
        "every", 1, "Only kept steps that are multiples of this (training steps); 1: all.", **fv
    )
    flags.DEFINE_integer("batch_size", None, "Images per batch; default: train.batch_size.", **fv)
    flags.DEFINE_bool(
        "plot_only",
        False,
        "Only draw the existing learning_curve.json files; evaluate nothing.",
        **fv,
    )


def run(flag_values: flags.FlagValues) -> list[list[dict[str, Any]]]:
    """Updates the curve(s) as the parsed flags say and prints the table(s); returns the rows."""
    if bool(flag_values.workdir) == bool(flag_values.runs):
        raise app.UsageError("Give either --workdir=RUN or --runs=RUN1,RUN2,... --out=PNG.")
    if flag_values.runs and not flag_values.out:
        raise app.UsageError("--runs needs --out=PNG.")
    runs = [flag_values.workdir] if flag_values.workdir else list(flag_values.runs)
    labels = flag_values.labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    if len(labels) != len(runs):
        raise app.UsageError(f"--labels has {len(labels)} labels for {len(runs)} runs.")
    curves = []
    try:
        for workdir in runs:
            if flag_values.plot_only:
                rows = read_curve(os.path.join(workdir, CURVE_FILE))
                if not rows:
                    raise FileNotFoundError(f"{os.path.join(workdir, CURVE_FILE)}: no curve yet.")
            else:
                rows = update_learning_curve(
                    workdir,
                    num_examples=flag_values.num_examples,
                    every=flag_values.every,
                    batch_size=flag_values.batch_size,
                )
            curves.append(rows)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    for label, rows in zip(labels, curves, strict=True):
        print(f"{label}:\n{format_table(rows)}\n")
    if flag_values.runs:
        save_figure(plot_curves(curves, labels), flag_values.out)
        print(f"wrote {flag_values.out}")
    else:
        if flag_values.plot_only:
            save_figure(plot_curves(curves, title=labels[0]), workdir_plot(runs[0]))
        print(f"wrote {os.path.join(runs[0], CURVE_FILE)} and {workdir_plot(runs[0])}")
    return curves


def main(argv):
    cli.start(argv)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
