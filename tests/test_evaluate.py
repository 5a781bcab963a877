"""tusk_jax.evaluate end to end on a briefly trained Tetrominoes run, and its parts.

The numbers of a 4-step run are poor; what is checked is that the pipeline is
exact: every reported metric is recomputed here independently (scikit-learn
ARI per image, a plain loop for the attribute accuracy) from the model's
outputs on the same test images.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import sklearn.metrics
from absl import flags
from PIL import Image

from configs import mnist_hard, tetrominoes
from tusk_jax import checkpointing, config_lib, evaluate, inference, input_pipeline
from tusk_jax.evaluators import landmarks as landmark_protocol
from tusk_jax.evaluators import multi_instance


@pytest.fixture(scope="module")
def run(trained_tetrominoes):
    return trained_tetrominoes


@pytest.fixture(scope="module")
def evaluated(run):
    _, workdir = run
    return evaluate.evaluate(None, workdir, progress=False, tsne_points=60)


def test_writes_metrics_json_and_figures(run, evaluated):
    config, workdir = run
    assert evaluated["step"] == config.train.num_steps
    assert evaluated["eval_dir"] == os.path.join(workdir, "eval", str(config.train.num_steps))
    assert evaluated["num_keypoints"] == 3 and evaluated["dataset"] == "tetrominoes"
    found = evaluated["metrics"]
    assert found["num_examples"] == config.dataset.num_eval_examples == 16
    with open(os.path.join(evaluated["eval_dir"], "metrics.json")) as f:
        saved = json.load(f)
    for key in ("ari_fg", "ari", "shape_accuracy", "color_accuracy", "reconstruction_mse"):
        assert saved["metrics"][key] == pytest.approx(found[key], abs=1e-12)
    assert [row["tusk_paper"] for row in saved["paper"]] == [99.7, 91.3, 100.0]
    assert sum(found["prototype_usage"]) == 16 * 3
    assert set(evaluated["figures"]) == {
        "detections",
        "reconstructions",
        "alpha",
        "prototypes",
        "tsne",
        "purity",
    }
    # The new fields, JSON-safe as written.
    usage = saved["metrics"]["prototype_usage"]
    assert saved["metrics"]["largest_prototype"] == int(np.argmax(usage))
    assert saved["metrics"]["largest_prototype_share"] == max(usage) / sum(usage)
    assert saved["metrics"]["prototype_purity"] == found["prototype_purity"]
    assert saved["figures"]["purity"].endswith("purity.png")
    sizes = {n: Image.open(p).size for n, p in evaluated["figures"].items()}
    # 16 px images drawn 4x: 8 detections in 2 rows of 4; one tile per prototype (M = 6, 3 x 2).
    assert sizes["detections"] == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)
    assert sizes["prototypes"] == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    assert sizes["reconstructions"] == (8 * 64 + 9 * 2, 2 * 64 + 3 * 2)


def test_metrics_equal_an_independent_recomputation(run, evaluated):
    config, workdir = run
    detector = inference.load(workdir)
    ari_fg, shape_pairs, color_pairs, squared = [], [], [], []
    for batch in input_pipeline.create_eval_iterator(config, "test"):
        out = detector.apply(batch["image"])
        for b in np.nonzero(batch["valid"])[0]:
            mask, alpha = batch["mask"][b], out["alpha"][b]
            fg = mask > 0
            ari_fg.append(
                sklearn.metrics.adjusted_rand_score(mask[fg], np.argmax(alpha, axis=0)[fg])
            )
            squared.append(np.mean((out["reconstruction"][b] - batch["image"][b]) ** 2))
            for k in range(alpha.shape[0]):
                pixels = alpha[k] > 0.8
                for e in range(1, int(mask.max()) + 1):
                    covered = np.sum(mask[pixels] == e)
                    if batch["visibility"][b, e] and covered > 0.5 * pixels.sum() > 0:
                        proto = out["prototype"][b, k]
                        shape_pairs.append((proto, batch["shape"][b, e]))
                        color_pairs.append((proto, batch["color"][b, e]))

    def purity_rows():
        rows = []
        for proto in sorted({p for p, _ in shape_pairs}):
            shapes = [v for p, v in shape_pairs if p == proto]
            colors = [v for p, v in color_pairs if p == proto]
            rows.append(
                {
                    "prototype": int(proto),
                    "matched": len(shapes),
                    "majority": {
                        "shape": int(np.argmax(np.bincount(shapes))),
                        "color": int(np.argmax(np.bincount(colors))),
                    },
                    "purity": {
                        "shape": max(np.bincount(shapes)) / len(shapes),
                        "color": max(np.bincount(colors)) / len(colors),
                    },
                }
            )
        return rows

    def majority(pairs):
        if not pairs:
            return 0.0
        by_proto = {}
        for proto, label in pairs:
            by_proto.setdefault(proto, []).append(label)
        return sum(max(np.bincount(v)) for v in by_proto.values()) / len(pairs)

    found = evaluated["metrics"]
    assert found["ari_fg"] == pytest.approx(np.mean(ari_fg), abs=1e-9)
    assert found["shape_accuracy"] == pytest.approx(majority(shape_pairs), abs=1e-12)
    assert found["color_accuracy"] == pytest.approx(majority(color_pairs), abs=1e-12)
    assert found["matched_keypoint_fraction"] == pytest.approx(len(shape_pairs) / 48, abs=1e-12)
    assert found["prototype_purity"] == purity_rows()
    assert found["reconstruction_mse"] == pytest.approx(np.mean(squared), rel=1e-5)


def test_step_keypoints_and_examples_overrides(run):
    _, workdir = run
    result = evaluate.evaluate(
        None, workdir, step=2, num_keypoints=5, num_examples=6, figures=False, progress=False
    )
    assert result["step"] == 2 and result["num_keypoints"] == 5
    assert result["metrics"]["num_examples"] == 6
    assert sum(result["metrics"]["prototype_usage"]) == 6 * 5
    assert result["eval_dir"] == os.path.join(workdir, "eval", "2", "tetrominoes_test_k5")
    assert os.listdir(result["eval_dir"]) == ["metrics.json"]


def test_clear_errors(run, tmp_path):
    config, workdir = run
    with pytest.raises(FileNotFoundError, match=r"step 3.*\[2, 4\]"):
        evaluate.evaluate(None, workdir, step=3)
    other = tetrominoes.get_config("cpu")
    with pytest.raises(ValueError, match=r"another config(.|\n)*model.window: 11"):
        evaluate.evaluate(other, workdir)
    with pytest.raises(ValueError, match="multi_instance"):
        evaluate.evaluate(None, workdir, dataset="mnist_hard")
    with pytest.raises(ValueError, match="num_examples"):
        evaluate.evaluate(None, workdir, num_examples=0)
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        evaluate.evaluate(None, str(tmp_path))
    # The config the run was trained with is accepted.
    assert checkpointing.resolve_config(workdir, config).model.to_dict() == config.model.to_dict()


def test_num_objects_evaluates_generated_scenes_with_that_many_pieces(run):
    """Issue 7: a 3-piece run evaluated on 5-piece scenes with K = 5, in its own folder."""
    config, workdir = run
    detector = inference.load(workdir)
    result = evaluate.evaluate(
        None,
        workdir,
        num_objects=5,
        num_keypoints=5,
        figures=False,
        progress=False,
        detector=detector,
    )
    step = config.train.num_steps
    assert result["num_keypoints"] == 5 and result["num_objects"] == 5
    assert result["eval_dir"] == os.path.join(
        workdir, "eval", str(step), "tetrominoes_objects5_test_k5"
    )
    with open(os.path.join(result["eval_dir"], "metrics.json")) as f:
        saved = json.load(f)
    assert (saved["num_objects"], saved["num_keypoints"]) == (5, 5)
    assert saved["metrics"]["ari_fg"] == pytest.approx(result["metrics"]["ari_fg"], abs=1e-12)
    found = result["metrics"]
    assert found["num_examples"] == 16 and sum(found["prototype_usage"]) == 16 * 5
    # The data really has 5 pieces: generated (only a 1-scene train split besides the
    # test), every test image shows the background and exactly five instance ids.
    eval_config = evaluate.prepare_config(None, workdir, num_objects=5)
    assert eval_config.dataset.source == "procedural"
    assert eval_config.dataset.num_train == evaluate.EVAL_ONLY_NUM_TRAIN
    assert os.path.isdir(
        os.path.join(
            config.dataset.data_dir, "tusk_tetrominoes", "procedural_train1_test16_pieces5"
        )
    )
    ari_fg = []
    for batch in input_pipeline.create_eval_iterator(eval_config, "test"):
        assert batch["visibility"].shape[1] == 6 and batch["shape"].shape[1] == 6
        out = detector.apply(batch["image"], 5)
        for b in np.nonzero(batch["valid"])[0]:
            mask = batch["mask"][b]
            assert np.array_equal(np.unique(mask), np.arange(6))
            fg = mask > 0
            pred = np.argmax(out["alpha"][b], axis=0)
            ari_fg.append(sklearn.metrics.adjusted_rand_score(mask[fg], pred[fg]))
    assert len(ari_fg) == 16
    assert found["ari_fg"] == pytest.approx(np.mean(ari_fg), abs=1e-9)
    # One compilation for K = 5 served the evaluation and the recomputation.
    assert detector._apply._cache_size() == 1


def test_num_objects_clear_errors(run):
    _, workdir = run
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="num_objects must be a positive int"):
            evaluate.prepare_config(None, workdir, num_objects=bad)
    # CLEVR (like CelebA and H36M) is real files only: no scene generator to choose N.
    with pytest.raises(ValueError, match="'clevr6' has no procedural scene generator"):
        evaluate.prepare_config(None, workdir, dataset="clevr6", num_objects=5)
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["evaluate", f"--workdir={workdir}", "--num_objects=0"])
    with pytest.raises(SystemExit, match="error: num_objects must be a positive int"):
        evaluate.run(flag_values)


def test_detector_of_another_model_is_refused(run):
    _, workdir = run
    other = tetrominoes.get_config("test")
    with other.unlocked():
        other.model.feature_dim = 16
    state = checkpointing.state_template(other)
    detector = inference.Detector(other, state.params, state.prototypes)
    with pytest.raises(ValueError, match=r"detector(.|\n)*model.feature_dim: 16"):
        evaluate.evaluate(None, workdir, detector=detector, progress=False)


def test_command_line_prints_the_table_beside_the_paper(run, capsys):
    _, workdir = run
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["evaluate", f"--workdir={workdir}", "--num_examples=4", "--tsne_points=0"])
    result = evaluate.run(flag_values)
    printed = capsys.readouterr().out
    ours = 100 * result["metrics"]["ari_fg"]
    (row,) = [line for line in printed.splitlines() if line.startswith("ARI-FG")]
    assert row.split()[1:3] == [f"{ours:.2f}", "99.70"]
    assert "99.70" in printed and "Slot Attention 99.5 ± 0.2" in printed
    assert "4 examples" in printed
    # Attribute accuracies are quoted with the fraction of keypoints they rest on.
    found = result["metrics"]
    (row,) = [line for line in printed.splitlines() if line.startswith("shape accuracy")]
    matched = 100 * found["matched_keypoint_fraction"]
    assert f"{100 * found['shape_accuracy']:.2f} (on {matched:.1f} % of keypoints matched)" in row
    share = 100 * found["largest_prototype_share"]
    assert f"largest prototype: {found['largest_prototype']}, nearest to {share:.1f} %" in printed


def test_command_line_without_checkpoint_exits_with_a_message(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tusk_jax.evaluate", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "config.json not found" in done.stderr and "Traceback" not in done.stderr


def test_mnist_hard_untrained_checkpoint_end_to_end(tmp_path):
    """The multi-instance branch on real pipeline batches (a saved, untrained state)."""
    config = mnist_hard.get_config("test")
    with config.unlocked():
        config.dataset.data_dir = str(tmp_path / "data")
        config.dataset.num_eval_examples = 8
    workdir = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    state = jax.tree.map(  # Random floats of the right shapes: no init compile.
        lambda x: (
            (0.2 * rng.standard_normal(x.shape)).astype(x.dtype)
            if np.issubdtype(x.dtype, np.floating)
            else x
        ),
        checkpointing.state_template(config),
    )
    os.makedirs(workdir)
    config_lib.save_config(config, workdir)
    manager = checkpointing.create_manager(workdir)
    checkpointing.save(manager, 0, state, {})
    manager.wait_until_finished()
    manager.close()
    detector = inference.load(workdir)
    result = evaluate.evaluate(None, workdir, progress=False, figures=False, detector=detector)
    found = result["metrics"]
    assert found["num_examples"] == 8
    for key in ("localization", "classification_majority", "both_hungarian"):
        assert 0.0 <= found[key] <= 1.0
    # both = correct / ground truths = classification x localisation.
    assert found["both_majority"] == pytest.approx(
        found["classification_majority"] * found["localization"], abs=1e-12
    )
    assert os.path.exists(os.path.join(workdir, "eval", "0", "metrics.json"))
    # Canvases of 6 digits instead of the trained 4 (K stays 4), from the run's digit source.
    six = evaluate.evaluate(
        None, workdir, num_objects=6, progress=False, figures=False, detector=detector
    )
    assert six["eval_dir"] == os.path.join(workdir, "eval", "0", "mnist_hard_objects6_test_k4")
    assert six["num_objects"] == 6 and six["metrics"]["num_examples"] == 8
    eval_config = evaluate.prepare_config(None, workdir, num_objects=6)
    assert eval_config.dataset.source == config.dataset.source
    assert eval_config.dataset.num_train == evaluate.EVAL_ONLY_NUM_TRAIN
    batch = next(input_pipeline.create_eval_iterator(eval_config, "test"))
    assert batch["centers"].shape[1:] == (6, 2) and (batch["labels"] >= 0).all()


# --- Parts, on synthetic outputs ------------------------------------------------------


def test_multi_instance_evaluator_scores_perfect_and_missed_detections():
    centers = np.array([[[10.0, 10.0], [50.0, 50.0], [30.0, 60.0]]])
    labels = np.array([[3, 7, -1]])  # The third digit is padding.
    batch = {
        "image": np.zeros((1, 80, 80, 3), np.float32),
        "valid": np.array([True]),
        "centers": centers,
        "labels": labels,
    }

    def outputs(keypoints, prototype):
        return {
            "keypoints": np.asarray(keypoints, np.float64),
            "prototype": np.asarray(prototype),
            "confidence": np.ones((1, 2)),
            "descriptors": np.ones((1, 2, 4)) / 2.0,
            "reconstruction": np.zeros((1, 80, 80, 3), np.float32),
        }

    acc = multi_instance.MultiInstanceEvaluator(10, 80, tsne_points=0)
    acc.add(batch, outputs([[[50.0, 51.0], [11.0, 10.0]]], [[7, 3]]))
    found = acc.result()
    assert found["localization"] == 1.0 and found["both_hungarian"] == 1.0
    acc = multi_instance.MultiInstanceEvaluator(10, 80, tsne_points=0)
    acc.add(batch, outputs([[[70.0, 10.0], [11.0, 10.0]]], [[7, 5]]))  # One 20 px off.
    found = acc.result()
    assert found["localization"] == 0.5 and found["classification_hungarian"] == 1.0


def test_landmark_results_recover_a_linear_layout():
    rng = np.random.default_rng(0)
    n, t = 40, 5
    landmarks = rng.uniform(10, 70, (n, t, 2))
    landmarks[:, 1] = landmarks[:, 0] + [20.0, 0.0]  # Eyes 20 px apart.
    # One keypoint per landmark, each with its own prototype: a linear map exists.
    arrays = {"keypoints": landmarks + 0.0, "prototype": np.tile(np.arange(t), (n, 1))}
    arrays["landmarks"] = landmarks
    found = landmark_protocol.regression_results(
        arrays, arrays, num_prototypes=t, normalizer="inter_ocular"
    )
    assert found["forward_error"] == pytest.approx(0.0, abs=1e-6)
    assert found["nmi"] == pytest.approx(1.0)


def test_format_table_marks_missing_metrics():
    table = evaluate.format_table(
        {
            "dataset": "clevr6",
            "split": "test",
            "step": 9,
            "num_keypoints": 6,
            "metrics": {"num_examples": 3, "ari_fg": 0.5, "shape_accuracy": 0.25},
        }
    )
    lines = table.splitlines()
    assert lines[0] == "clevr6 / test, step 9, K = 6, 3 examples"
    assert lines[3].split()[:3] == ["ARI-FG", "50.00", "98.30"]
    assert "size accuracy" in table and "n/a" in table


def test_format_table_quotes_accuracies_with_the_matched_fraction_and_purity():
    metrics = {
        "num_examples": 3,
        "ari_fg": 0.5,
        "shape_accuracy": 0.25,
        "color_accuracy": 0.75,
        "material_accuracy": 0.5,
        "matched_keypoint_fraction": 0.125,
        "prototype_usage": [6, 0, 2],
        "largest_prototype": 0,
        "largest_prototype_share": 0.75,
        "prototype_purity": [
            {"prototype": 2, "matched": 1, "majority": {"shape": 1}, "purity": {"shape": 1.0}}
        ],
    }
    table = evaluate.format_table(
        {"dataset": "clevr6", "split": "test", "step": 9, "num_keypoints": 6, "metrics": metrics}
    ).splitlines()
    assert table[4].startswith("shape accuracy ")
    assert "  25.00 (on 12.5 % of keypoints matched)  46.80" in table[4]
    assert "  75.00 (on 12.5 % of keypoints matched)  90.70" in table[5]
    assert table[6].split()[:4] == ["size", "accuracy", "n/a", "97.10"]
    assert table[7] == (
        "other: material_accuracy = 0.5 (on 12.5 % of keypoints matched), "
        "matched_keypoint_fraction = 0.125"
    )
    assert table[8:] == [
        "largest prototype: 0, nearest to 75.0 % of all keypoints (uniform: 33.3 %)",
        "per prototype: majority label (purity) of its matched keypoints",
        "prototype  keypoints  matched  shape",
        "0          75.0 %     0        -",
        "2          25.0 %     1        1 (100.0 %)",
    ]
