"""tusk_jax.learning_curve on a copy of the shared tiny Tetrominoes run, and its parts.

What is checked: a row per kept step whose metrics equal a separate
`evaluate()` of that step, one compilation for all steps, the training
metrics and time of the step's `metrics.jsonl` record, and that a re-run
evaluates only the steps not yet in `learning_curve.json`.
"""

import json
import os
import shutil

import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from tusk_jax import checkpointing, evaluate, inference, learning_curve, summaries


@pytest.fixture
def run_copy(trained_tetrominoes, tmp_path):
    """`(config, workdir)`: the shared run's config, checkpoints and metrics.jsonl, copied."""
    config, workdir = trained_tetrominoes
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(workdir, name), copy / name)
    shutil.copytree(os.path.join(workdir, "checkpoints"), copy / "checkpoints")
    return config, str(copy)


def test_curve_of_every_kept_step_equals_evaluate_and_reruns_skip_done_steps(run_copy, monkeypatch):
    config, workdir = run_copy
    assert learning_curve.kept_steps(workdir) == [2, 4]
    template = checkpointing.state_template(config)  # Weights come from each step's checkpoint.
    detector = inference.Detector(config, template.params, template.prototypes)
    evaluated_steps = []
    real_evaluate = evaluate.evaluate

    def counting_evaluate(*args, **kwargs):
        evaluated_steps.append(kwargs["step"])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", counting_evaluate)
    options = dict(num_examples=8, progress=False, detector=detector)
    rows = learning_curve.update_learning_curve(workdir, every=4, **options)
    assert [r["step"] for r in rows] == [4] and evaluated_steps == [4]
    rows = learning_curve.update_learning_curve(workdir, every=1, **options)
    assert [r["step"] for r in rows] == [2, 4] and evaluated_steps == [4, 2]
    # Both steps through one compiled network: the weights were swapped, not baked in.
    assert detector._apply._cache_size() == 1

    monkeypatch.setattr(evaluate, "evaluate", real_evaluate)
    records = {r["step"]: r for r in summaries.read_metrics(workdir)}
    fresh = inference.load(workdir)  # Another Detector: restored apart from the curve's.
    for row in rows:
        step = row["step"]
        expected = evaluate.evaluate(
            None,
            workdir,
            step=step,
            num_examples=8,
            figures=False,
            write=False,
            progress=False,
            detector=fresh,
        )
        assert row["num_examples"] == 8 and row["num_keypoints"] == 3
        assert (row["dataset"], row["split"]) == ("tetrominoes", "test")
        for key in ("ari_fg", "ari", "shape_accuracy", "color_accuracy", "reconstruction_mse"):
            assert row[key] == pytest.approx(expected["metrics"][key], abs=1e-9), (step, key)
        assert row["prototypes_in_use"] == expected["metrics"]["prototypes_in_use"]
        # The catch-all and the matched fraction, per step; the index is kept, not plotted.
        for key in ("largest_prototype", "largest_prototype_share", "matched_keypoint_fraction"):
            assert row[key] == expected["metrics"][key], (step, key)
        assert "prototype_purity" not in row  # A list: not a curve point.
        # Training metrics of that step's log record; log_every = 1, so the training time
        # is the sum of 1 / steps_per_second over the records up to the step.
        assert row["train/loss/recon"] == pytest.approx(records[step]["loss/recon"])
        assert row["train/prototypes_in_use"] == records[step]["prototypes_in_use"]
        assert row["wall_seconds"] == pytest.approx(
            sum(1.0 / records[s]["steps_per_second"] for s in records if s <= step)
        )
    with open(os.path.join(workdir, learning_curve.CURVE_FILE)) as f:
        assert json.load(f) == rows
    assert Image.open(os.path.join(workdir, learning_curve.PLOT_FILE)).format == "PNG"
    panels = learning_curve.plotted_metrics([rows])
    assert "largest_prototype_share" in panels and "largest_prototype" not in panels

    # A re-run evaluates nothing: a value planted in the file survives.
    path = os.path.join(workdir, learning_curve.CURVE_FILE)
    planted = [dict(r, ari_fg=0.123) if r["step"] == 2 else r for r in rows]
    with open(path, "w") as f:
        json.dump(planted, f)

    def must_not_evaluate(*args, **kwargs):
        raise AssertionError("a step already in learning_curve.json was evaluated again")

    monkeypatch.setattr(evaluate, "evaluate", must_not_evaluate)
    again = learning_curve.update_learning_curve(workdir, num_examples=8, progress=False)
    assert again == planted
    # Other settings are refused rather than mixed into the same curve.
    with pytest.raises(ValueError, match=r"other evaluation settings.*num_examples=8"):
        learning_curve.update_learning_curve(workdir, num_examples=4, progress=False)
    with pytest.raises(ValueError, match="every must be a positive int"):
        learning_curve.update_learning_curve(workdir, every=0)


def test_training_time_sums_intervals_and_counts_a_resume(tmp_path):
    lines = [
        {"step": 25, "loss/recon": 0.5, "steps_per_second": 0.5, "prototypes_in_use": 8.0},
        {"step": 50, "loss/recon": 0.4, "steps_per_second": 0.5, "prototypes_in_use": 9.0},
        {"step": 75, "loss/recon": 0.3, "steps_per_second": 0.5, "prototypes_in_use": 9.0},
        # Killed after step 75, resumed from the checkpoint of step 25: 50 is logged again.
        {"step": 50, "loss/recon": 0.35, "steps_per_second": 1.0, "prototypes_in_use": 10.0},
        {"step": 75, "loss/recon": "nan", "steps_per_second": 0.25, "confidence": 0.9},
    ]
    with open(tmp_path / summaries.METRICS_FILE, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    found = learning_curve.training_metrics(str(tmp_path), log_every=25)
    assert sorted(found) == [25, 50, 75]
    assert found[25]["wall_seconds"] == pytest.approx(50.0)
    # 150 s to step 75, then 25 s to redo 25 -> 50 (the later record of step 50 wins) ...
    assert found[50]["wall_seconds"] == pytest.approx(175.0)
    assert found[50]["train/loss/recon"] == 0.35 and found[50]["train/prototypes_in_use"] == 10
    # ... and 100 s for 50 -> 75. A non-finite value is None; unlisted metrics are left out.
    assert found[75]["wall_seconds"] == pytest.approx(275.0)
    assert found[75]["train/loss/recon"] is None and "train/confidence" not in found[75]
    assert learning_curve.training_metrics(str(tmp_path / "none"), log_every=25) == {}


def _rows(ari, steps=(100, 200, 300)):
    return [
        {
            "step": s,
            "wall_seconds": 10.0 * s,
            "dataset": "tetrominoes",
            "split": "test",
            "num_keypoints": 3,
            "num_examples": 500,
            "reconstruction_mse": 0.01 / (i + 1),
            "ari_fg": a,
            "train/loss/recon": 0.02 / (i + 1),
        }
        for i, (s, a) in enumerate(zip(steps, ari, strict=True))
    ]


def test_plot_draws_each_run_as_one_line_per_metric():
    first, second = _rows([0.5, 0.7, 0.9]), _rows([0.4, None, 0.8])
    figure = learning_curve.plot_curves([first, second], labels=["lr 1e-3", "lr 3e-3"])
    axes = figure.axes
    # The paper's metric first, then the other evaluation metric, then the training loss.
    assert [ax.get_title() for ax in axes] == ["ari_fg", "reconstruction_mse", "train/loss/recon"]
    ari = axes[0].get_lines()
    assert [line.get_label() for line in ari] == ["lr 1e-3", "lr 3e-3"]
    assert list(ari[0].get_xdata()) == [100, 200, 300]
    np.testing.assert_allclose(ari[0].get_ydata(), [0.5, 0.7, 0.9])
    # A missing value is left out, not drawn as zero.
    assert list(ari[1].get_xdata()) == [100, 300]
    np.testing.assert_allclose(axes[2].get_lines()[1].get_ydata(), [0.02, 0.01, 0.02 / 3])
    with pytest.raises(ValueError, match="labels"):
        learning_curve.plot_curves([first], labels=["a", "b"])


def test_command_line_draws_several_runs_and_prints_tables(tmp_path, capsys):
    runs = []
    for name, ari in (("a", [0.5, 0.7, 0.9]), ("b", [0.4, 0.6, 0.8])):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / learning_curve.CURVE_FILE, "w") as f:
            json.dump(_rows(ari), f)
        runs.append(str(tmp_path / name))
    out = tmp_path / "plots" / "ablation.png"
    flag_values = flags.FlagValues()
    learning_curve.define_flags(flag_values)
    flag_values(
        ["lc", f"--runs={','.join(runs)}", "--labels=base,fast", f"--out={out}", "--plot_only"]
    )
    curves = learning_curve.run(flag_values)
    assert curves == [_rows([0.5, 0.7, 0.9]), _rows([0.4, 0.6, 0.8])]
    assert Image.open(out).format == "PNG"
    printed = capsys.readouterr().out
    assert printed.startswith("base:\n") and "\nfast:\n" in printed
    header, rule, row = printed.splitlines()[1:4]
    assert header.split() == [
        "step",
        "wall_min",
        "train/loss/recon",
        "ari_fg",
        "reconstruction_mse",
    ]
    assert row.split() == ["100", "16.67", "0.02", "0.5", "0.01"]

    bad = flags.FlagValues()
    learning_curve.define_flags(bad)
    bad(["lc", f"--runs={runs[0]}", "--labels=x,y", f"--out={out}", "--plot_only"])
    with pytest.raises(app.UsageError, match="2 labels for 1 runs"):
        learning_curve.run(bad)
    missing = flags.FlagValues()
    learning_curve.define_flags(missing)
    missing(["lc", f"--workdir={tmp_path / 'nothing'}"])
    with pytest.raises(SystemExit, match="config.json not found"):
        learning_curve.run(missing)
