"""The authors' pretrained models in tusk_jax (`tusk_jax.convert_release`, `tusk_jax.torch_files`).

The fixtures in `tests/fixtures/release_checkpoints/` were written by the
authors' PyTorch code itself (random weights, their README): two model files
in the release's format, the release's forward outputs on images stored
beside them, and a landmark regressor with its outputs.

Tolerances (float32 on both sides): the release's and XLA's convolutions sum
in different orders, about 1e-7 relative per layer over some twenty layers;
the measured maxima are 1.1e-5 (score map), 3.3e-5 (feature map), 1.3e-5 px
(keypoints), 6.3e-6 (descriptors), 6.7e-5 (reconstruction), 8.7e-5 (rgb),
4.1e-5 (alpha), so each bound below is 5-15x the measured difference.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from configs import celeba, mnist_hard, tetrominoes
from tusk_jax import convert_release, inference, release_files, torch_files
from tusk_jax.evaluators import landmark_regression

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "release_checkpoints")
TOLERANCES = {
    "score_map": 1e-4,
    "feature_map": 3e-4,
    "keypoints": 1e-3,  # Pixels.
    "confidence": 1e-4,
    "descriptors": 1e-4,
    "reconstruction": 5e-4,
    "rgb": 5e-4,
    "alpha": 5e-4,
}
CONFIGS = {"tet": tetrominoes, "mnist": mnist_hard}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def small_config(module, image_size: int):
    """The dataset's paper config with a tiny dataset (the model is the paper's)."""
    config = module.get_config()
    with config.unlocked():
        config.dataset.image_size = image_size
        config.dataset.num_train = 64
        config.dataset.num_test = 16
        config.dataset.num_eval_examples = 4
        config.train.batch_size = 2
        config.train.num_steps = 2
        config.train.log_every = 1
        config.train.image_every = 2
        config.train.checkpoint_every = 1
    return config


@pytest.fixture(scope="module", params=["tet", "mnist"])
def converted(request, tmp_path_factory):
    """(name, workdir, release outputs) of a fixture model converted with its paper config."""
    name = request.param
    reference = dict(np.load(fixture(f"{name}_outputs.npz")))
    workdir = str(tmp_path_factory.mktemp(f"{name}_release") / "run")
    config = small_config(CONFIGS[name], reference["images"].shape[-1])
    convert_release.convert(fixture(f"{name}_models"), config, workdir)
    return name, workdir, reference


def test_converted_model_reproduces_the_release_forward_pass(converted):
    name, workdir, ref = converted
    detector = inference.load(workdir)
    out = detector.apply(ref["images"].transpose(0, 2, 3, 1))
    expected = {
        "score_map": ref["score_map"][:, 0],
        "feature_map": ref["featuremap"].transpose(0, 2, 3, 1),
        "keypoints": ref["keypoints"][..., :2],
        "confidence": ref["keypoints"][..., 2],
        "descriptors": ref["descriptors"],
        "reconstruction": ref["reconstruction"].transpose(0, 2, 3, 1),
    }
    if name == "tet":
        expected["rgb"] = ref["rgb"].transpose(0, 1, 3, 4, 2)
        expected["alpha"] = ref["alpha"][:, :, 0]
    else:
        assert "alpha" not in out
    for key, value in expected.items():
        np.testing.assert_allclose(out[key], value, rtol=0, atol=TOLERANCES[key], err_msg=key)
    np.testing.assert_array_equal(out["prototype"], ref["label"])
    prototypes = detector.prototypes / np.linalg.norm(detector.prototypes, axis=1, keepdims=True)
    np.testing.assert_allclose(prototypes, ref["prototypes"], rtol=0, atol=1e-6)


def test_converted_workdir_is_an_ordinary_run(converted):
    name, workdir, _ = converted
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    model = saved["model"]
    assert model["descriptor_sampling"] == "nearest"
    assert model["num_groups"] == model["base_width"] == 32
    assert model["decoder_mode"] == ("alpha" if name == "tet" else "plain")
    assert saved["run_identity"]["run_id"]  # A run of its own, which `main` resumes.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["0", "0.sha256.json"]
    with open(os.path.join(workdir, convert_release.CONVERSION_FILE)) as f:
        provenance = json.load(f)
    assert provenance["source"].endswith(f"{name}_models") and provenance["step"] == 0
    assert len(provenance["source_sha256"]) == 64


def test_module_prefix_is_optional_and_prototype_entries_must_agree(monkeypatch):
    state, prototypes, step = release_files.read_release_state(fixture("mnist_models"))
    assert step == 0 and prototypes.shape == (10, 32)
    assert "encoder.encoder_features.conv_last.weight" in state  # `module.` removed.
    assert not any(key.startswith("module.") for key in state)
    saved = torch_files.read_torch_file(fixture("mnist_models"))
    plain = {key.removeprefix("module."): value for key, value in saved["model"].items()}
    in_dict = plain["prototype"]

    def read_as(model, top):
        monkeypatch.setattr(torch_files, "read_torch_file", lambda path: {"model": model, **top})
        return release_files.read_release_state("file")

    # No prefix, and either prototype entry alone.
    np.testing.assert_array_equal(read_as(plain, {})[1], in_dict)
    without = {k: v for k, v in plain.items() if k != "prototype"}
    np.testing.assert_array_equal(read_as(without, {"prototype": in_dict})[1], in_dict)
    with pytest.raises(release_files.ReleaseCheckpointError, match="'prototype'.*differ"):
        read_as(plain, {"prototype": in_dict + 1})
    with pytest.raises(release_files.ReleaseCheckpointError, match="no 'prototype' tensor"):
        read_as(without, {})


def test_release_regressor_reproduces_the_release_outputs():
    config = celeba.get_config()
    weights = release_files.read_release_regressor(fixture("LinearProjection_model"), config)
    assert weights.shape == (2 * 4 * 32, 2 * 5)
    data = np.load(fixture("LinearProjection_outputs.npz"))
    # float32 sums of 256 products of size ~50: the release rounds at ~2e-5.
    np.testing.assert_allclose(data["inputs"] @ weights, data["outputs"], rtol=1e-5, atol=1e-5)


def test_release_slot_order_skips_the_last_earlier_keypoint():
    # Four keypoints of prototype 1 in detection order, raster keys W y + x =
    # 5, 3, 1, 4 (x / W with W = 1 and y = 0): the release appends the second
    # (its loop never looks at the last earlier one), puts the third first,
    # and the fourth before the 5: slots hold keys 1, 4, 5, 3.
    keypoints = np.array([[[5.0, 0.0], [3.0, 0.0], [1.0, 0.0], [4.0, 0.0]]])
    features = landmark_regression.release_landmark_features(
        keypoints, np.array([[1, 1, 1, 1]]), num_prototypes=2, height=1, width=1
    ).reshape(2, 4, 2)
    np.testing.assert_array_equal(features[1, :, 0], [1.0, 4.0, 5.0, 3.0])
    np.testing.assert_array_equal(features[0], 0.0)
    # Fractions of the image: x / W and y / H.
    one = landmark_regression.release_landmark_features(
        np.array([[[20.0, 10.0]]]), np.array([[0]]), 1, height=40, width=80
    )
    np.testing.assert_allclose(one, [[0.25, 0.25]])


def test_release_regression_error_is_zero_where_the_regressor_is_exact():
    from tusk_jax.evaluators import landmarks

    rng = np.random.default_rng(0)
    n, k, m, t, size = 6, 4, 32, 5, 80
    keypoints = rng.uniform(0, size - 1, (n, k, 2))
    ids = rng.integers(0, m, (n, k))
    weights = rng.normal(0, 0.1, (2 * k * m, 2 * t))
    features = landmark_regression.release_landmark_features(keypoints, ids, m, size, size)
    truth = (features @ weights).reshape(n, t, 2) * size  # What the regressor predicts.
    truth[:, 1, 0] += 30.0  # Landmark 1 (an eye) 30 px off; the others exact.
    test = {"keypoints": keypoints, "prototype": ids, "landmarks": truth}
    out = landmarks.release_regression_results(test, weights, m, size, "inter_ocular")
    iod = np.linalg.norm(truth[:, 0] - truth[:, 1], axis=-1)
    per = out["forward_error_per_landmark"]
    assert out["regressor"] == "release"
    np.testing.assert_allclose(per[[0, 2, 3, 4]], 0.0, atol=1e-9)
    assert per[1] == pytest.approx(np.mean(30.0 / iod))
    assert out["forward_error"] == pytest.approx(per.mean())


# ----------------------------------------------------------------------------
# Refused inputs: one line each, nothing written.
# ----------------------------------------------------------------------------


def _edited_copy(source: str, target, edit) -> str:
    """A copy of a torch.save zip whose data.pkl went through `edit(bytes) -> bytes`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, edit(data) if item.filename.endswith("/data.pkl") else data)
    return str(target)


def _refused(monkeypatch, *args) -> str:
    """Runs the converter's command line; returns its one-line error."""
    from absl import flags

    flag_values = flags.FlagValues()
    convert_release.define_flags(flag_values)
    argv = ["convert_release", *args]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides there.
    flag_values(argv)
    with pytest.raises(SystemExit) as exit_info:
        convert_release.run(flag_values)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _config_args(module_name: str) -> list[str]:
    return [f"--config={os.path.join(REPO, 'configs', module_name)}"]


def test_truncated_file_is_refused(tmp_path, monkeypatch):
    whole = open(fixture("mnist_models"), "rb").read()
    (tmp_path / "truncated").write_bytes(whole[: len(whole) // 2])
    workdir = tmp_path / "run"
    message = _refused(
        monkeypatch,
        f"--checkpoint={tmp_path / 'truncated'}",
        *_config_args("mnist_hard.py"),
        f"--workdir={workdir}",
    )
    assert "not a torch.save zip archive" in message
    assert not workdir.exists()


def test_other_models_are_refused_naming_tensor_shapes_and_field(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    # Tetrominoes weights (M = 114) with the MNIST config (M = 10).
    message = _refused(
        monkeypatch,
        f"--checkpoint={fixture('tet_models')}",
        *_config_args("mnist_hard.py"),
        f"--workdir={workdir}",
    )
    assert "tensor prototype has shape (114, 32) in the file, the config gives (10, 32)" in message
    assert "model.num_prototypes=114" in message
    # Same M and window, other decoder: MNIST weights (plain) as an alpha model.
    message = _refused(
        monkeypatch,
        f"--checkpoint={fixture('mnist_models')}",
        *_config_args("tetrominoes.py"),
        "--config.model.num_prototypes=10",
        "--config.model.window=13",
        f"--workdir={workdir}",
    )
    assert "decoder.decoder.conv_last.weight has shape (3, 32, 1, 1)" in message
    assert "(4, 32, 1, 1)" in message and "model.decoder_mode=plain" in message
    # Another width.
    message = _refused(
        monkeypatch,
        f"--checkpoint={fixture('mnist_models')}",
        *_config_args("mnist_hard.py"),
        "--config.model.base_width=16",
        f"--workdir={workdir}",
    )
    assert "model.base_width=32" in message
    # Another window: the soft-argmax kernels say 13.
    message = _refused(
        monkeypatch,
        f"--checkpoint={fixture('mnist_models')}",
        *_config_args("mnist_hard.py"),
        "--config.model.window=11",
        f"--workdir={workdir}",
    )
    assert "sample_points_diff.x_kernel" in message and "model.window=13" in message
    assert not workdir.exists()


def test_missing_tensor_is_refused(tmp_path, monkeypatch):
    key = b"module.decoder.decoder.conv_last.bias"
    broken = _edited_copy(
        fixture("mnist_models"), tmp_path / "missing", lambda d: d.replace(key, key[:-4] + b"bixs")
    )
    workdir = tmp_path / "run"
    message = _refused(
        monkeypatch,
        f"--checkpoint={broken}",
        *_config_args("mnist_hard.py"),
        f"--workdir={workdir}",
    )
    assert "tensor decoder.decoder.conv_last.bias (3,) is missing from the file" in message
    assert not workdir.exists()


class _Exploit:
    """Unpickling this runs `os.system`: what a crafted checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    crafted = tmp_path / "crafted_models"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr(
            "crafted_models/data.pkl", pickle.dumps({"model": _Exploit(str(marker))}, protocol=2)
        )
    workdir = tmp_path / "run"
    message = _refused(
        monkeypatch,
        f"--checkpoint={crafted}",
        *_config_args("mnist_hard.py"),
        f"--workdir={workdir}",
    )
    assert "refusing to read" in message and "system" in message
    assert not marker.exists() and not workdir.exists()
    with pytest.raises(torch_files.UnsafeTorchFileError, match="builtins.eval"):
        archive_path = tmp_path / "eval_models"
        with zipfile.ZipFile(archive_path, "w") as archive:
            archive.writestr("eval_models/data.pkl", b"\x80\x02cbuiltins\neval\nq\x00.")
        torch_files.read_torch_file(str(archive_path))


def test_existing_run_is_never_overwritten(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    message = _refused(
        monkeypatch,
        f"--checkpoint={fixture('mnist_models')}",
        *_config_args("mnist_hard.py"),
        f"--workdir={workdir}",
    )
    assert "already exists and is not empty" in message
    assert os.listdir(workdir) == ["config.json"]


# ----------------------------------------------------------------------------
# The converted run through the tools.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_run_goes_through_evaluate_detect_export_and_training(tmp_path):
    from tusk_jax import checkpointing, detect, evaluate, export, exported, visualization

    workdir = str(tmp_path / "mnist_release")
    args = [
        f"--config={os.path.join(REPO, 'configs', 'mnist_hard.py')}",
        "--config.dataset.image_size=80",
        "--config.dataset.num_train=64",
        "--config.dataset.num_test=16",
        "--config.dataset.num_eval_examples=4",
        f"--config.dataset.data_dir={tmp_path / 'data'}",
        "--config.train.batch_size=2",
        "--config.train.num_steps=2",
        "--config.train.checkpoint_every=1",
        "--config.train.log_every=1",
        "--config.train.image_every=2",
    ]
    env = dict(os.environ, PYTHONPATH=REPO)
    source = f"--checkpoint={fixture('mnist_models')}"
    converted = subprocess.run(
        [sys.executable, "-m", "tusk_jax.convert_release", source, f"--workdir={workdir}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "python -m tusk_jax.evaluate" in converted.stdout

    result = evaluate.evaluate(None, workdir, batch_size=4, progress=False, tsne_points=0)
    assert result["step"] == 0 and result["metrics"]["num_examples"] == 4
    assert os.path.exists(os.path.join(result["eval_dir"], "metrics.json"))

    detector = inference.load(workdir)
    image = np.asarray(np.load(fixture("mnist_outputs.npz"))["images"][0].transpose(1, 2, 0))
    visualization.save_png(str(tmp_path / "digits.png"), image)
    summary = detect.detect_files(detector, [str(tmp_path / "digits.png")], str(tmp_path / "det"))
    assert not summary["failed"] and summary["written"][0]["num_keypoints"] == 9
    export.export_detector(detector, str(tmp_path / "export"))
    found = exported.load(str(tmp_path / "export")).detect(image)[0]
    np.testing.assert_allclose(found.keypoints, detector.detect(image)[0].keypoints, atol=1e-3)

    trained = subprocess.run(
        [sys.executable, "-m", "tusk_jax.main", f"--workdir={workdir}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert checkpointing.saved_steps(workdir)[-1] == 2


def test_landmark_model_converts_without_training_files_and_regressor_choice(tmp_path):
    from tusk_jax import datasets

    # A perceptual-loss config needs no VGG16 file to convert (only to train).
    config = celeba.get_config()
    with config.unlocked():
        config.model.num_prototypes, config.model.window = 10, 13  # The MNIST fixture's.
    workdir = str(tmp_path / "celeba")
    convert_release.convert(fixture("mnist_models"), config, workdir)
    celeba_info, mnist_info = datasets.get_info("celeba_wild"), datasets.get_info("mnist_hard")
    assert release_files.regressor_weights(workdir, celeba_info, None) is None  # None stored.
    with pytest.raises(FileNotFoundError, match="--regressor=release.*no release_regressor"):
        release_files.regressor_weights(workdir, celeba_info, "release")
    weights = np.arange(12.0).reshape(4, 3)
    np.savez(os.path.join(workdir, release_files.REGRESSOR_FILE), weight=weights)
    np.testing.assert_array_equal(
        release_files.regressor_weights(workdir, celeba_info, None), weights
    )
    assert release_files.regressor_weights(workdir, celeba_info, "fit") is None
    with pytest.raises(ValueError, match="for landmark datasets"):
        release_files.regressor_weights(workdir, mnist_info, "release")
    assert release_files.regressor_weights(workdir, mnist_info, None) is None
