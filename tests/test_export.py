"""tusk_jax.export and tusk_jax.exported: a briefly trained Tetrominoes run, exported once.

Checks that one exported program (symbolic batch, height and width) finds the
in-process detector's keypoints, confidences, prototypes and descriptors at
the training size, at odd sizes below and above it, at batch sizes 1 and 4
and with `scale` != 1; that its loader runs where flax, optax, orbax, tfds
and ml_collections cannot be imported; that damaged, mismatched or format-1
files fail with one line naming the file; and that `detect --exported`
writes the JSON of `detect --workdir`.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app, flags

import tusk_jax
from tusk_jax import (
    detect,
    export,
    exported,
    inference,
    input_pipeline,
    visualization,
)

NUM_KEYPOINTS = 3  # tetrominoes:test


def run_command(module, *args):
    """`python -m <module> *args` in this process (`export` or `detect`)."""
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    flag_values([module.__name__, *args])
    return module.run(flag_values)


@pytest.fixture(scope="module")
def run(trained_tetrominoes):
    return trained_tetrominoes


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
    """The run exported once, with the reconstruction, by the command line."""
    _, workdir = run
    output = tmp_path_factory.mktemp("exported")
    run_command(export, f"--workdir={workdir}", f"--output={output}", "--reconstruction")
    return str(output)


@pytest.fixture(scope="module")
def in_process(run):
    return inference.load(run[1])


@pytest.fixture(scope="module")
def loaded(folder):
    return exported.load(folder, batch_size=4)


@pytest.fixture(scope="module")
def scenes(run):
    """Five 16 x 16 test scenes (the training size), float32 in [0, 1]."""
    config, _ = run
    batch = next(input_pipeline.create_eval_iterator(config, "test", batch_size=5))
    return [np.asarray(image, np.float32) for image in batch["image"]]


# Exported vs in-process: the same program body, compiled once for symbolic and
# once for concrete shapes; the measured differences are ~1e-5 px at most.
KEYPOINT_ATOL = 1e-3  # pixels
VALUE_ATOL = 1e-4  # confidences and descriptor entries


def assert_same(found, expected, atol=KEYPOINT_ATOL):
    assert len(found) == len(expected)
    for a, b in zip(found, expected, strict=True):
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=atol, rtol=0)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=VALUE_ATOL, rtol=0)
        np.testing.assert_array_equal(a.prototype, b.prototype)
        np.testing.assert_allclose(a.descriptors, b.descriptors, atol=VALUE_ATOL, rtol=0)


def test_metadata_describes_the_run(run, folder):
    config, workdir = run
    with open(os.path.join(folder, exported.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["image_size"] == [16, 16]
    assert metadata["num_keypoints"] == NUM_KEYPOINTS
    assert (metadata["window"], metadata["num_prototypes"]) == (5, 6)
    assert metadata["outputs"] == [*exported.DETECTION_OUTPUTS, "reconstruction"]
    assert metadata["step"] == config.train.num_steps
    assert metadata["workdir"] == os.path.abspath(workdir)
    assert metadata["config"]["model"] == config.model.to_dict()
    assert metadata["jax_version"] == jax.__version__
    assert metadata["tusk_jax_version"] == tusk_jax.__version__
    with open(os.path.join(folder, exported.ARTIFACT_FILE), "rb") as f:
        program = jax.export.deserialize(bytearray(f.read()))
    assert metadata["format_version"] == exported.FORMAT_VERSION == 2
    # Symbolic batch, height and width: one program for every size.
    assert [str(d) for d in program.in_avals[0].shape] == ["b", "h", "w", "3"]
    assert set(export.DEFAULT_PLATFORMS) <= set(program.platforms)


def test_two_batch_sizes_equal_the_in_process_detector(loaded, in_process, scenes):
    # batch_size=4: one image is a batch of 1; five are batches of 4 and 1.
    assert_same(loaded.detect(scenes[0]), in_process.detect(scenes[0]))
    assert_same(loaded.detect(scenes), in_process.detect(scenes))
    noise = np.random.default_rng(0).random((3, 16, 16, 3), np.float32)
    assert_same(loaded.detect(noise, min_confidence=0.5), in_process.detect(noise, None, 0.5))


@pytest.mark.parametrize(
    "height, width, scale",
    [(16, 16, 1.0), (37, 41, 1.0), (23, 53, 1.0), (37, 41, 0.7), (16, 16, 1.5)],
)
def test_any_size_and_scale_equal_the_in_process_detector(loaded, in_process, height, width, scale):
    # Odd sizes below (37 x 41 runs at 26 x 29 with scale 0.7) and above the 16 x 16
    # training size, all padded to multiples of 4 inside the program; batch sizes 1
    # and 4 (loaded.batch_size), images of two sizes in one call.
    rng = np.random.default_rng(height * width)
    images = list(rng.random((5, height, width, 3), np.float32))
    single = loaded.detect(images[0], scale=scale)
    assert_same(single, in_process.detect(images[0], scale=scale))
    both = images + [rng.random((width, height, 3), np.float32)]
    assert_same(loaded.detect(both, scale=scale), in_process.detect(both, scale=scale))
    assert_same(
        loaded.detect(both, min_confidence=0.5, scale=scale),
        in_process.detect(both, None, 0.5, scale),
    )
    for image, found in zip(both, loaded.detect(both, scale=scale), strict=True):
        h, w = image.shape[:2]
        assert np.all(found.keypoints >= -0.5) and np.all(found.keypoints <= [w - 0.5, h - 0.5])


def test_a_lone_bright_pixel_is_found_where_it_is(loaded, in_process):
    # Far from the training size and at an odd offset: no resizing may move it.
    image = np.zeros((45, 51), np.uint8)
    image[31, 40] = 255
    (found,) = loaded.detect(image)
    (expected,) = in_process.detect(image)
    assert_same([found], [expected])
    nearest = found.keypoints[np.argmin(np.abs(found.keypoints - [40, 31]).sum(axis=1))]
    assert np.abs(nearest - [40, 31]).max() < 2.0


def test_uint8_grey_and_small_images(loaded, in_process):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (13, 21), np.uint8)
    tiny = rng.random((1, 3, 3), np.float32)  # 3 pixels = K: as small as an image may be.
    assert_same(loaded.detect([grey, tiny]), in_process.detect([grey, tiny]))


def test_reconstruction_equals_the_in_process_one(loaded, in_process, scenes):
    found, expected = loaded.reconstruct(scenes[:2]), in_process.reconstruct(scenes[:2])
    np.testing.assert_allclose(np.stack(found), np.stack(expected), atol=1e-5)
    odd = np.random.default_rng(2).random((19, 27, 3), np.float32)
    (small,), (reference,) = loaded.reconstruct(odd), in_process.reconstruct(odd)
    assert small.shape == (19, 27, 3)
    np.testing.assert_allclose(small, reference, atol=1e-4)


def test_k_is_fixed_and_images_need_k_pixels(loaded, scenes):
    with pytest.raises(ValueError, match="exported with num_keypoints=3"):
        loaded.detect(scenes[0], num_keypoints=5)
    with pytest.raises(ValueError, match=r"images\[1\] \(1x2\) has fewer pixels than num_keypo"):
        loaded.detect([scenes[0], scenes[0][:1, :2]])
    with pytest.raises(ValueError, match="scale must be > 0"):
        loaded.detect(scenes[0], scale=0)


BLOCKED = ("flax", "optax", "orbax", "tensorflow_datasets", "tensorflow", "ml_collections", "PIL")

LOADER_SCRIPT = """
import importlib.abc, json, sys

BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name in ("tusk_jax.inference", "tusk_jax.models"):
            raise ImportError(f"{{name}} is blocked")

sys.meta_path.insert(0, Block())
import numpy as np
from tusk_jax import exported

images = np.load(sys.argv[2])
found = exported.load(sys.argv[1], batch_size=2).detect(list(images))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"keypoints": [d.keypoints.tolist() for d in found], "heavy": heavy}}))
"""


def test_loader_runs_without_flax_optax_orbax_tfds(folder, in_process, scenes, tmp_path):
    np.save(tmp_path / "images.npy", np.stack(scenes[:3]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(tusk_jax.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    script = LOADER_SCRIPT.format(blocked=BLOCKED)
    done = subprocess.run(
        [sys.executable, "-c", script, folder, str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    for got, expected in zip(result["keypoints"], in_process.detect(scenes[:3]), strict=True):
        np.testing.assert_allclose(got, expected.keypoints, atol=1e-4)


@pytest.fixture
def copy(folder, tmp_path):
    """A copy of the export folder to damage."""
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def assert_one_line_error(error_type, match, directory):
    with pytest.raises(error_type, match=match) as raised:
        exported.load(str(directory))
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_damaged_artifact_or_json(copy):
    artifact = copy / exported.ARTIFACT_FILE
    whole = artifact.read_bytes()
    artifact.write_bytes(whole[: len(whole) // 2])
    message = assert_one_line_error(ValueError, "cannot be read as a jax.export artifact", copy)
    assert str(artifact) in message and "damaged or cut" in message
    artifact.write_bytes(b"not a program" * 10)
    assert_one_line_error(ValueError, "cannot be read as a jax.export artifact", copy)
    artifact.unlink()
    assert_one_line_error(FileNotFoundError, "detector.jax_export: not found", copy)
    meta = copy / exported.METADATA_FILE
    meta.write_text('{"format": ')
    assert_one_line_error(ValueError, "detector.json: not readable as JSON", copy)
    meta.unlink()
    assert_one_line_error(FileNotFoundError, "not a folder written by", copy)


def test_json_that_does_not_match_the_artifact(run, folder, copy, tmp_path):
    meta = copy / exported.METADATA_FILE
    metadata = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(metadata, num_keypoints=5, feature_dim=4)))
    message = assert_one_line_error(ValueError, "does not match", copy)
    assert "num_keypoints 5 in the JSON vs 3" in message and "feature_dim 4" in message
    # Another export's artifact beside this JSON.
    other = tmp_path / "other"
    export.export_detector(inference.load(run[1]), str(other), num_keypoints=2)
    meta.write_text(json.dumps(metadata))
    shutil.copy(other / exported.ARTIFACT_FILE, copy / exported.ARTIFACT_FILE)
    assert_one_line_error(ValueError, "does not describe .*sha256 differs", copy)


def test_jax_that_cannot_run_it(run, folder, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(jax.export, "maximum_supported_calling_convention_version", 1)
        patch.setattr(jax.export, "minimum_supported_calling_convention_version", 1)
        assert_one_line_error(ValueError, "calling convention version .* not supported", folder)
    tpu_only = tmp_path / "tpu"
    export.export_detector(inference.load(run[1]), str(tpu_only), platforms=["tpu"])
    assert_one_line_error(ValueError, "lowered for tpu only", tpu_only)


def test_format_1_folders_are_refused_with_how_to_export_again(run, copy):
    # Format 1 ran every image at the training size: its keypoints differ from the
    # in-process detector's at other sizes, so it is not served silently.
    meta = copy / exported.METADATA_FILE
    metadata = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(metadata, format_version=1)))
    message = assert_one_line_error(ValueError, "format version 1 .* one fixed size", copy)
    assert f"--workdir={os.path.abspath(run[1])} --output={copy}" in message
    meta.write_text(json.dumps(dict(metadata, format_version=3)))
    assert_one_line_error(ValueError, "format version 3 is newer than this loader's", copy)


def test_export_refuses_unknown_platforms(in_process, tmp_path):
    with pytest.raises(ValueError, match="platforms must be among"):
        export.export_detector(in_process, str(tmp_path), platforms=["gpu"])
    assert not os.listdir(tmp_path)


def test_detect_exported_writes_the_json_of_detect_workdir(run, folder, scenes, tmp_path):
    _, workdir = run
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(scenes[:3]):
        visualization.save_png(str(photos / f"scene{i}.png"), image)
    for source, output in (
        (f"--workdir={workdir}", "by_run"),
        (f"--exported={folder}", "by_export"),
    ):
        summary = run_command(
            detect, source, f"--input={photos}", f"--output={tmp_path / output}", "--scale=1.5"
        )
        assert len(summary["written"]) == 3 and not summary["failed"]
    for i in range(3):
        records = []
        for output in ("by_run", "by_export"):
            with open(tmp_path / output / f"scene{i}.json") as f:
                records.append(json.load(f))
        by_run, by_export = records
        assert {k: v for k, v in by_run.items() if k != "keypoints"} == {
            k: v for k, v in by_export.items() if k != "keypoints"
        }
        assert [k["prototype"] for k in by_run["keypoints"]] == [
            k["prototype"] for k in by_export["keypoints"]
        ]
        for key in ("x", "y", "confidence", "descriptor"):
            np.testing.assert_allclose(
                [k[key] for k in by_export["keypoints"]],
                [k[key] for k in by_run["keypoints"]],
                atol=1e-4,
            )
    # detect --exported into the folder of detect --workdir: refused, nothing replaced.
    run_output = tmp_path / "by_run"
    before = {p.name: p.read_bytes() for p in run_output.iterdir()}
    with pytest.raises(SystemExit) as refused:
        run_command(detect, f"--exported={folder}", f"--input={photos}", f"--output={run_output}")
    assert str(refused.value) == (
        f"error: {run_output} holds the detections of step 4 of {os.path.abspath(workdir)}, not of "
        f"the export {os.path.abspath(folder)} (step 4 of {os.path.abspath(workdir)}); "
        "pass --overwrite to replace them, or choose another --output."
    )
    assert {p.name: p.read_bytes() for p in run_output.iterdir()} == before
    # The same model again is no conflict; --overwrite replaces another's.
    run_command(detect, f"--workdir={workdir}", f"--input={photos}", f"--output={run_output}")
    run_command(
        detect, f"--exported={folder}", f"--input={photos}", f"--output={run_output}", "--overwrite"
    )
    with open(run_output / "summary.json") as f:
        assert json.load(f)["source"] == {
            "workdir": os.path.abspath(workdir),
            "exported": os.path.abspath(folder),
            "step": 4,
        }
    with pytest.raises(app.UsageError, match="one of --workdir or --exported"):
        run_command(
            detect,
            f"--workdir={workdir}",
            f"--exported={folder}",
            f"--input={photos}",
            "--output=x",
        )
    with pytest.raises(app.UsageError, match="--step applies to --workdir only"):
        run_command(detect, f"--exported={folder}", "--step=2", f"--input={photos}", "--output=x")
