"""tusk_jax.detect: the command line on a briefly trained Tetrominoes run.

Checks that every readable file gets a JSON whose keypoints are exactly
`Detector.detect` on that file's pixels (odd sizes, grayscale, RGBA, JPEG,
more keypoints than trained), an annotated PNG that only changes pixels near
the keypoints, and that unreadable files are reported and skipped.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from tusk_jax import detect, inference, input_pipeline, visualization


@pytest.fixture(scope="module")
def run(trained_tetrominoes):
    return trained_tetrominoes


def run_cli(*args):
    flag_values = flags.FlagValues()
    detect.define_flags(flag_values)
    flag_values(["detect", *args])
    return detect.run(flag_values)


@pytest.fixture(scope="module")
def photos(run, tmp_path_factory):
    """A folder of inputs: test scenes, odd sizes, grey, RGBA, JPEG, and broken files."""
    config, _ = run
    folder = tmp_path_factory.mktemp("photos")
    batch = next(input_pipeline.create_eval_iterator(config, "test", batch_size=2))
    for i in range(2):
        visualization.save_png(str(folder / f"scene{i}.png"), batch["image"][i])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (13, 21), np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (9, 11, 4), np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (18, 20, 3), np.uint8)).save(folder / "scene0.jpg")
    Image.fromarray(np.zeros((1, 2, 3), np.uint8)).save(folder / "tiny.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 4)
    (folder / "notes.txt").write_text("not an image")
    whole = (folder / "scene1.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


@pytest.fixture(scope="module")
def detected(run, photos, tmp_path_factory):
    _, workdir = run
    output = tmp_path_factory.mktemp("detections")
    summary = run_cli(
        f"--workdir={workdir}",
        f"--input={photos}/*",
        f"--output={output}",
        "--num_keypoints=5",
        "--keep_going",  # Some inputs fail on purpose; without it the exit status is 2.
    )
    return summary, str(output)


def test_every_readable_file_gets_a_json_and_a_png(detected, photos):
    summary, output = detected
    names = sorted(os.path.basename(w["json"]) for w in summary["written"])
    # scene0.jpg and scene0.png share a name: the later one (sorted) gets "_2".
    assert names == ["gray.json", "rgba.json", "scene0.json", "scene0_2.json", "scene1.json"]
    assert sorted(os.path.basename(p) for p in summary["failed"]) == [
        "broken.png",
        "notes.txt",
        "tiny.png",
        "truncated.png",
    ]
    assert "fewer pixels than K=5" in summary["failed"][str(photos / "tiny.png")]
    assert all(w["num_keypoints"] == 5 for w in summary["written"])
    with open(os.path.join(output, "summary.json")) as f:
        assert json.load(f)["failed"] == summary["failed"]


def test_json_keypoints_are_the_detector_on_the_file_pixels(run, detected, photos):
    _, workdir = run
    _, output = detected
    detector = inference.load(workdir)
    for stem, source in [("gray", "gray.png"), ("rgba", "rgba.png"), ("scene0", "scene0.jpg")]:
        with open(os.path.join(output, f"{stem}.json")) as f:
            record = json.load(f)
        image = np.asarray(Image.open(photos / source).convert("RGB"))
        assert (record["height"], record["width"]) == image.shape[:2]
        assert record["step"] == 4 and record["num_keypoints"] == 5
        (expected,) = detector.detect(image, num_keypoints=5)
        xy = np.array([[k["x"], k["y"]] for k in record["keypoints"]])
        np.testing.assert_allclose(xy, expected.keypoints, atol=1e-5)
        assert [k["prototype"] for k in record["keypoints"]] == expected.prototype.tolist()
        assert np.all(xy >= 0) and np.all(xy <= [image.shape[1] - 1, image.shape[0] - 1])
        descriptors = np.array([k["descriptor"] for k in record["keypoints"]])
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)


def test_annotation_only_changes_pixels_near_keypoints(detected, photos):
    _, output = detected
    image = np.asarray(Image.open(photos / "gray.png").convert("RGB"))  # 13 x 21
    annotated = np.asarray(Image.open(os.path.join(output, "gray.png")))
    scale = min(256 // 21, detect.ANNOTATION_MAX_SCALE)  # 8
    assert annotated.shape == (13 * scale, 21 * scale, 3)
    with open(os.path.join(output, "gray.json")) as f:
        keypoints = np.array([[k["x"], k["y"]] for k in json.load(f)["keypoints"]])
    upscaled = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    rows, cols = np.mgrid[: annotated.shape[0], : annotated.shape[1]]
    centres = (keypoints + 0.5) * scale - 0.5
    distance = np.min(
        np.hypot(cols[..., None] - centres[:, 0], rows[..., None] - centres[:, 1]), axis=-1
    )
    far = distance > 0.9 * scale + 2
    np.testing.assert_array_equal(annotated[far], upscaled[far])
    assert np.any(annotated[distance < 0.5 * scale] != upscaled[distance < 0.5 * scale])


def test_min_confidence_above_one_writes_empty_keypoint_lists(run, photos, tmp_path):
    _, workdir = run
    summary = run_cli(
        f"--workdir={workdir}",
        f"--input={photos}/scene1.png",
        f"--output={tmp_path}",
        "--min_confidence=1.01",
    )
    assert [w["num_keypoints"] for w in summary["written"]] == [0]
    with open(tmp_path / "scene1.json") as f:
        assert json.load(f)["keypoints"] == []


def test_outputs_never_overwrite_inputs(run, tmp_path):
    _, workdir = run
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="no image could be processed"):
        run_cli(f"--workdir={workdir}", f"--input={tmp_path}", f"--output={tmp_path}")
    assert np.all(np.asarray(Image.open(tmp_path / "x.png")) == 0)


def test_no_matching_input_exits_with_a_message(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tusk_jax.detect",
            f"--workdir={tmp_path}",
            f"--input={tmp_path}/*.png",
            f"--output={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "no file matches" in done.stderr and "Traceback" not in done.stderr


def test_expand_inputs_and_output_stems(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "c.txt", "sub/a.png"):
        (tmp_path / name).write_bytes(b"")
    folder = detect.expand_inputs([str(tmp_path)])
    assert [os.path.basename(p) for p in folder] == ["a.JPG", "b.png"]
    recursive = detect.expand_inputs([f"{tmp_path}/**/*.png", str(tmp_path / "b.png")])
    assert sorted(os.path.relpath(p, tmp_path) for p in recursive) == ["b.png", "sub/a.png"]
    assert detect.expand_inputs([f"{tmp_path}/*.gif"]) == []
    assert detect.output_stems(["x/a.png", "y/a.jpg", "a.gif", "b.png"]) == ["a", "a_2", "a_3", "b"]
