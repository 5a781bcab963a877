"""Evaluation of a trained run on its dataset's protocol (SPEC section 6), with figures.

    python -m tusk_jax.evaluate --workdir=runs/tetrominoes [--split=test] [--step=N]
    python -m tusk_jax.evaluate --workdir=runs/clevr6 --dataset=clevr10 --num_keypoints=10
    python -m tusk_jax.evaluate --workdir=runs/tetrominoes --num_objects=5 --num_keypoints=5

This module owns the loop over a split, the files and the command line; the
numbers come from `tusk_jax.evaluators` (one per task), the pictures from
`tusk_jax.visualization`, the restored run from `tusk_jax.checkpointing`.
Results go to `<workdir>/eval/<step>/metrics.json` (in a subfolder
`<dataset>_<split>_k<K>`, or `<dataset>_objects<N>_<split>_k<K>`, when the
evaluation differs from the run's own) with PNG figures beside it. Metric
values are fractions in [0, 1]; the printed table shows percent beside the
paper's (SPEC 8).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from tusk_jax import (
    charts,
    checkpointing,
    cli,
    config_lib,
    datasets,
    eval_table,
    evaluators,
    inference,
    input_pipeline,
    release_files,
    visualization,
)

format_table = eval_table.format_table  # Part of this module's API (notebooks use it).
FIGURE_IMAGES = 8  # Images shown in the detection / reconstruction figures.
# Training scenes of an evaluation-only dataset (`prepare_config`): never read, but not empty.
EVAL_ONLY_NUM_TRAIN = 1


# ----------------------------------------------------------------------------
# Running a split.
# ----------------------------------------------------------------------------


def _num_batches(config: ml_collections.ConfigDict, split: str, batch_size: int) -> int:
    total = input_pipeline.get_num_examples(config, split)
    limit = int(config.dataset.get("num_eval_examples", -1))
    if limit > 0:
        total = min(total, limit)
    return math.ceil(total / batch_size)


def run_split(
    detector: inference.Detector,
    config: ml_collections.ConfigDict,
    split: str,
    num_keypoints: int,
    batch_size: int,
    evaluator: evaluators.base.Evaluator,
    progress: bool = True,
    keep_first: int = 0,
) -> dict[str, np.ndarray] | None:
    """Runs the model over `split`, adding every batch to `evaluator`.

    Returns:
      The first `keep_first` valid images of the split and their model
      outputs (for figures), or None.
    """
    first = None
    iterator = input_pipeline.create_eval_iterator(config, split, batch_size=batch_size)
    with tqdm(
        iterator,
        total=_num_batches(config, split, batch_size),
        desc=f"eval {config.dataset.name}/{split}",
        unit="batch",
        dynamic_ncols=True,
        disable=not progress,
        mininterval=2.0,
    ) as bar:
        for batch in bar:
            out = detector.apply(batch["image"], num_keypoints)
            evaluator.add(batch, out)
            have = 0 if first is None else first["image"].shape[0]
            if have < keep_first:
                valid = np.asarray(batch["valid"], bool)
                take = {"image": batch["image"][valid][: keep_first - have]}
                take.update({n: np.asarray(v)[valid][: keep_first - have] for n, v in out.items()})
                first = (
                    take
                    if first is None
                    else {n: np.concatenate([first[n], take[n]]) for n in first}
                )
    return first


# ----------------------------------------------------------------------------
# The evaluation.
# ----------------------------------------------------------------------------


def eval_dir(workdir: str, step: int, tag: str = "") -> str:
    """`<workdir>/eval/<step>[/<tag>]`: where one evaluation's files go."""
    path = os.path.join(os.path.abspath(workdir), "eval", str(step))
    return os.path.join(path, tag) if tag else path


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


def prepare_config(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    dataset: str | None = None,
    num_examples: int | None = None,
    num_objects: int | None = None,
) -> ml_collections.ConfigDict:
    """The evaluation config: the run's (see `checkpointing.resolve_config`) plus overrides.

    Args:
      config: optional config; must build the same model as the saved one.
      workdir: the training workdir.
      dataset: evaluate on this dataset instead (same task, e.g. clevr10 for
        a clevr6 run).
      num_examples: evaluate at most this many examples (-1: all).
      num_objects: evaluate on generated scenes with this many objects
        (datasets with a generator): sets `dataset.num_objects` and
        `DatasetInfo.generator_source`, if any. The test scenes do not depend on
        `dataset.num_train` (their seeds are the test split's), so unless a
        dataset with the run's `num_train` is already prepared,
        `num_train` is set to `EVAL_ONLY_NUM_TRAIN` and only the test split
        is really generated.

    Raises:
      ValueError: an unknown or other-task dataset, a bad `num_examples`,
        `num_objects` < 1 or given for a dataset with no generator.
    """
    config = checkpointing.resolve_config(workdir, config)
    trained = config.dataset.name
    if dataset is not None and dataset != trained:
        if dataset not in datasets.names():
            raise ValueError(
                f"dataset {dataset!r} is unknown; valid: {', '.join(datasets.names())}."
            )
        task, trained_task = datasets.get_info(dataset).task, datasets.get_info(trained).task
        if task != trained_task:
            raise ValueError(
                f"dataset {dataset!r} is a {task} dataset; the run "
                f"was trained on {trained!r}, a {trained_task} dataset."
            )
        config.dataset.name = dataset
    if num_examples is not None:
        if num_examples == 0 or num_examples < -1:
            raise ValueError(f"num_examples must be positive or -1 (all), got {num_examples}.")
        config.dataset.num_eval_examples = int(num_examples)
    if num_objects is not None:
        if (
            not isinstance(num_objects, (int, np.integer))
            or isinstance(num_objects, bool)
            or num_objects < 1
        ):
            raise ValueError(f"num_objects must be a positive int, got {num_objects!r}.")
        info = datasets.get_info(config.dataset.name)
        if not info.generator:
            generated = [name for name in datasets.names() if datasets.get_info(name).generator]
            raise ValueError(
                f"num_objects: dataset {info.name!r} has no procedural scene generator, so its "
                f"object count cannot be chosen; num_objects works for "
                f"{' and '.join(generated)}."
            )
        config.dataset.num_objects = int(num_objects)
        if info.generator_source is not None:
            config.dataset.source = info.generator_source
        if not datasets.is_prepared(datasets.get_builder(config)):
            config.dataset.num_train = EVAL_ONLY_NUM_TRAIN
    return config


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    split: str | None = None,
    step: int | None = None,
    *,
    dataset: str | None = None,
    num_keypoints: int | None = None,
    num_examples: int | None = None,
    num_objects: int | None = None,
    batch_size: int | None = None,
    figures: bool = True,
    tsne_points: int = 500,
    progress: bool = True,
    write: bool = True,
    detector: inference.Detector | None = None,
    regressor: str | None = None,
) -> dict[str, Any]:
    """Evaluates a checkpoint of the run in `workdir` (see the module docstring).

    Args:
      config: None (the run's saved config) or one that builds the same model.
      workdir: the training workdir.
      split: the evaluated split; None: config `dataset.eval_split` (`test`).
      step: checkpoint step; None: the latest.
      dataset: evaluate on another dataset of the same task (clevr10).
      num_keypoints: K at evaluation (None: the trained K).
      num_examples: at most this many (None: `dataset.num_eval_examples`; -1: all).
      num_objects: generated scenes with this many objects (see
        `prepare_config`); results go to an `..._objects<N>_...` folder.
      batch_size: images per batch (None: `train.batch_size`).
      figures, tsne_points: write the PNG figures; descriptors in the t-SNE (0: none).
      progress, write: show progress bars; write `metrics.json` and the figures.
      detector: a `Detector` of this run's model to reuse (the step's
        weights are swapped in, no recompilation); None: a new one.
      regressor: landmark datasets: "release" (the authors' regressor the
        workdir holds, `convert_release --linear_projection`), "fit" (fitted
        on `regressor_train`); None: "release" where the workdir has one.

    Returns:
      dict with `dataset`, `split`, `step`, `num_keypoints`, `num_objects`
      (given, else None), `metrics` (fractions), `paper` (SPEC 8 rows),
      `eval_dir` and `figures` (written PNG paths).

    Raises:
      FileNotFoundError: no config or checkpoint in `workdir`.
      ValueError: another config's checkpoint or `detector`, a bad override.
    """
    trained = config_lib.load_config(workdir)
    config = prepare_config(
        config, workdir, dataset=dataset, num_examples=num_examples, num_objects=num_objects
    )
    detector, step = _restored_detector(workdir, config, step, detector)
    k = detector.resolve_num_keypoints(num_keypoints)
    batch_size = int(batch_size or config.train.batch_size)
    split = split or config.dataset.get("eval_split", "test")
    info = datasets.get_info(config.dataset.name)
    weights = release_files.regressor_weights(workdir, info, regressor)
    tsne_points = tsne_points if figures else 0
    evaluator, first = evaluate_split(
        detector, config, split, k, batch_size, tsne_points, progress, regressor=weights
    )
    tag = _eval_tag(trained, config, info.name, split, k, detector.num_keypoints, num_objects)
    output = {
        "workdir": os.path.abspath(workdir),
        "dataset": info.name,
        "split": split,
        "step": step,
        "num_keypoints": k,
        "num_objects": None if num_objects is None else int(config.dataset.num_objects),
        "metrics": evaluator.result(),
        "paper": [_paper_row(row) for row in info.paper],
        "eval_dir": eval_dir(workdir, step, tag),
        "figures": {},
    }
    if write:
        _write_outputs(output, detector, evaluator, first if figures else None, tsne_points)
    return output


def _eval_tag(trained, config, name, split, k, trained_k, num_objects) -> str:
    """The `eval/<step>/` subfolder of an evaluation unlike the run's own ('' for that one)."""
    if num_objects is not None:
        return f"{name}_objects{config.dataset.num_objects}_{split}_k{k}"
    own = (trained.dataset.name, trained.dataset.get("eval_split", "test"), trained_k)
    return f"{name}_{split}_k{k}" if (name, split, k) != own else ""


def _paper_row(row: datasets.common.PaperResult) -> dict[str, Any]:
    return {
        "metric": row.metric,
        "label": row.label,
        "tusk_paper": row.tusk,
        "best_other": row.best_other,
    }


def evaluate_split(
    detector: inference.Detector,
    config: ml_collections.ConfigDict,
    split: str,
    num_keypoints: int,
    batch_size: int,
    tsne_points: int = 0,
    progress: bool = True,
    regressor: np.ndarray | None = None,
) -> tuple[evaluators.base.Evaluator, dict[str, np.ndarray] | None]:
    """The dataset's evaluator after `split` (and its `fit_split` first, if any).

    `regressor`: landmark datasets, the authors' regressor weights; then the
    `fit_split` is not run.

    Returns:
      `(evaluator, first)`: `first` as `run_split` returns it (`FIGURE_IMAGES` images).
    """
    info = datasets.get_info(config.dataset.name)
    evaluator_class = evaluators.evaluator_class(info.task)

    def make_evaluator(tsne_points=0, **fit):
        return evaluator_class(
            detector.num_prototypes,
            int(config.dataset.image_size),
            tsne_points,
            **info.evaluator_options,
            **fit,
        )

    fit = {}
    if regressor is not None:
        fit["regressor"] = regressor
    elif evaluator_class.fit_split is not None:
        logging.info("Fitting on %s/%s.", info.name, evaluator_class.fit_split)
        fit_config = ml_collections.ConfigDict(config.to_dict())
        fit_config.dataset.num_eval_examples = -1
        fit["fit"] = make_evaluator()
        run_split(
            detector,
            fit_config,
            evaluator_class.fit_split,
            num_keypoints,
            batch_size,
            fit["fit"],
            progress=progress,
        )
    evaluator = make_evaluator(tsne_points, **fit)
    first = run_split(
        detector,
        config,
        split,
        num_keypoints,
        batch_size,
        evaluator,
        progress,
        keep_first=FIGURE_IMAGES,
    )
    return evaluator, first


def _restored_detector(
    workdir: str,
    config: ml_collections.ConfigDict,
    step: int | None,
    detector: inference.Detector | None,
) -> tuple[inference.Detector, int]:
    """A `Detector` holding the weights of `step` (a given one is checked and updated)."""
    state, step = checkpointing.restore_state(workdir, config, step)
    if detector is None:
        return inference.Detector(config, state.params, state.prototypes, step=step), step
    differences = config_lib.config_differences(detector.config, config)
    if differences:
        raise ValueError(
            "detector: it was built for another model than the run in "
            f"{workdir!r}:\n  " + "\n  ".join(differences)
        )
    detector.update(state.params, state.prototypes, step)
    return detector, step


def _write_outputs(
    output: dict[str, Any],
    detector: inference.Detector,
    evaluator: evaluators.base.Evaluator,
    first: dict[str, np.ndarray] | None,
    tsne_points: int,
) -> None:
    """Writes the figures (when `first` holds images) and `metrics.json` into `eval_dir`."""
    os.makedirs(output["eval_dir"], exist_ok=True)
    if first is not None and first["image"].shape[0]:
        descriptors, labels = evaluator.tsne_data()
        renders = detector.render_prototypes(size=first["image"].shape[1])
        figures = visualization.make_figures(
            first,
            detector.prototypes,
            renders["reconstruction"],
            descriptors if tsne_points else None,
            labels,
        )
        found = output["metrics"]
        figures["purity"] = charts.purity_figure(
            found["prototype_usage"], found.get("prototype_purity")
        )
        for fig_name, image in figures.items():
            path = os.path.join(output["eval_dir"], f"{fig_name}.png")
            visualization.save_png(path, image)
            output["figures"][fig_name] = path
    path = os.path.join(output["eval_dir"], "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(_json_ready(output), f, indent=2)
    os.replace(path + ".tmp", path)
    logging.info("Wrote %s", path)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command-line flags (called by `__main__` only, so that importing
    this module next to other command-line modules defines no duplicate flag)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Optional config file; default: the run's saved config.json. Must build the same model.",
        lock_config=False,
        flag_values=flag_values,
    )
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "The training workdir (config.json, checkpoints/).", **fv)
    flags.DEFINE_string("split", None, "Split to evaluate; default: dataset.eval_split.", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", **fv)
    flags.DEFINE_string(
        "dataset", None, "Evaluate on another dataset of the same task (clevr10).", **fv
    )
    flags.DEFINE_integer(
        "num_keypoints", None, "Keypoints per image; default: the trained K.", **fv
    )
    flags.DEFINE_integer(
        "num_examples", None, "At most this many examples; -1: the whole split.", **fv
    )
    flags.DEFINE_integer(
        "num_objects",
        None,
        "Evaluate on generated scenes with this many objects (tetrominoes pieces, mnist_hard "
        "digits); e.g. --num_objects=5 --num_keypoints=5 on a 3-piece Tetrominoes run.",
        **fv,
    )
    flags.DEFINE_integer("batch_size", None, "Images per batch; default: train.batch_size.", **fv)
    flags.DEFINE_enum(
        "regressor",
        None,
        list(release_files.REGRESSORS),
        "Landmark datasets: release (the authors' regressor, in workdirs of convert_release "
        "--linear_projection) or fit (fitted on regressor_train); default: release where present.",
        **fv,
    )
    flags.DEFINE_integer("tsne_points", 500, "Descriptors in the t-SNE figure (0: none).", **fv)


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Evaluates as the parsed flags say, prints the table; exits with a message on errors."""
    if not flag_values.workdir:
        raise app.UsageError("--workdir is required.")
    try:
        result = evaluate(
            flag_values.config,
            flag_values.workdir,
            flag_values.split,
            flag_values.step,
            dataset=flag_values.dataset,
            num_keypoints=flag_values.num_keypoints,
            num_examples=flag_values.num_examples,
            num_objects=flag_values.num_objects,
            batch_size=flag_values.batch_size,
            tsne_points=flag_values.tsne_points,
            regressor=flag_values.regressor,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(format_table(result))
    print(f"wrote {os.path.join(result['eval_dir'], 'metrics.json')}")
    return result


def main(argv):
    cli.start(argv)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
