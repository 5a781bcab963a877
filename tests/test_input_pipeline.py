"""Tests of tusk_jax.input_pipeline on tiny procedural datasets in a tmp data dir.

conftest.py forces 2 host CPU devices, so train batches are [2, B / 2, H, W, 3].
"""

import json

import jax
import numpy as np
import pytest

from configs.base import get_base_config
from tusk_jax import datasets, input_pipeline
from tusk_jax.datasets import common, tetrominoes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tusk_data"))


def _config(data_dir, name="tetrominoes", **dataset):
    config = get_base_config()
    config.dataset.name = name
    config.dataset.data_dir = data_dir
    config.dataset.manual_dir = data_dir + "/no_manual_files"
    config.dataset.num_train = 24
    config.dataset.num_test = 7
    config.dataset.image_size = 112
    config.train.batch_size = 8
    config.seed = 3
    for key, value in dataset.items():
        config.dataset[key] = value
    return config


def _stored_images(config, split="train"):
    source = datasets.data_source(config, split)
    return np.stack([source[i]["image"] for i in range(len(source))])


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_shape_range_and_epoch_coverage(data_dir):
    config = _config(data_dir)
    batches = _take(input_pipeline.create_train_iterator(config), 6)
    assert jax.device_count() == 2
    for batch in batches:
        assert batch.shape == (2, 4, 112, 112, 3) and batch.dtype == np.float32
        assert batch.min() >= 0.0 and batch.max() <= 1.0
    # 24 images, 8 per step: steps 0-2 are one epoch, every image exactly once.
    stored = _stored_images(config)
    expected = tetrominoes.preprocess({"image": stored}, 112, with_labels=False)["image"]
    seen = np.concatenate([b.reshape(-1, 112, 112, 3) for b in batches[:3]])
    assert sorted(x.tobytes() for x in seen) == sorted(x.tobytes() for x in expected)
    # The next epoch is another permutation of the same images.
    epoch2 = np.concatenate([b.reshape(-1, 112, 112, 3) for b in batches[3:]])
    assert sorted(x.tobytes() for x in epoch2) == sorted(x.tobytes() for x in seen)
    assert not np.array_equal(epoch2, seen)


def test_train_iterator_is_deterministic_and_resumable(data_dir):
    config = _config(data_dir)
    first = _take(input_pipeline.create_train_iterator(config), 7)
    second = _take(input_pipeline.create_train_iterator(config), 7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = _config(data_dir)
    other_seed.seed = 4
    assert not np.array_equal(next(input_pipeline.create_train_iterator(other_seed)), first[0])

    iterator = input_pipeline.create_train_iterator(config)
    _take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))  # JSON-serialisable.
    resumed = input_pipeline.create_train_iterator(config)
    resumed.set_state(state)
    for want, got in zip(first[2:], _take(resumed, 5), strict=True):
        np.testing.assert_array_equal(got, want)


def test_data_source_path_equals_in_memory_path(data_dir, monkeypatch):
    config = _config(data_dir)
    in_memory = _take(input_pipeline.create_train_iterator(config), 4)
    monkeypatch.setattr(input_pipeline, "IN_MEMORY_BYTES", 0)
    iterator = input_pipeline.create_train_iterator(config)
    assert iterator._images is None
    streamed = _take(iterator, 2)
    iterator.set_state({"step": 3})  # Also after a jump with batches in flight.
    streamed += _take(iterator, 1)
    iterator.close()
    for want, got in zip([in_memory[0], in_memory[1], in_memory[3]], streamed, strict=True):
        np.testing.assert_array_equal(got, want)


def test_processes_read_their_part_of_the_same_global_batch(data_dir, monkeypatch):
    config = _config(data_dir)
    single = _take(input_pipeline.create_train_iterator(config), 4)  # 1 process x 2 devices.
    monkeypatch.setattr(input_pipeline, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for process in range(2):  # 2 processes x 1 device each.
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        iterator = input_pipeline.create_train_iterator(config)
        parts.append(_take(iterator, 4))
        iterator.close()
    for step in range(4):
        assert parts[0][step].shape == (1, 4, 112, 112, 3)
        union = np.concatenate([parts[0][step], parts[1][step]])  # Device order.
        np.testing.assert_array_equal(union, single[step])


def test_batch_size_must_divide_devices(data_dir):
    config = _config(data_dir)
    config.train.batch_size = 7
    with pytest.raises(ValueError, match="train.batch_size=7"):
        input_pipeline.create_train_iterator(config)


def test_unknown_dataset_and_split(data_dir):
    with pytest.raises(ValueError, match="valid: mnist_hard, tetrominoes"):
        input_pipeline.create_train_iterator(_config(data_dir, name="shapes"))
    with pytest.raises(ValueError, match="no split 'validation'; valid: train, test"):
        list(input_pipeline.create_eval_iterator(_config(data_dir), "validation"))


def test_tetrominoes_eval_batches_ground_truth(data_dir):
    config = _config(data_dir)
    batches = list(input_pipeline.create_eval_iterator(config, "test", batch_size=3))
    assert [b["valid"].tolist() for b in batches] == [[True] * 3, [True] * 3, [True, False, False]]
    assert input_pipeline.get_num_examples(config, "test") == 7
    source = datasets.data_source(config, "test")
    for b, batch in enumerate(batches):
        assert batch["image"].shape == (3, 112, 112, 3)
        assert batch["mask"].shape == (3, 112, 112) and batch["mask"].dtype == np.int32
        assert batch["shape"].shape == (3, 4) and batch["color"].dtype == np.int32
        for k in range(3):
            stored = source[min(3 * b + k, 6)]  # Padding repeats the last example.
            rows = common.nearest_indices(35, 112)
            ids = tetrominoes.entity_ids(stored["mask"][None])[0]
            np.testing.assert_array_equal(batch["mask"][k], ids[rows][:, rows])
            # A pixel of entity e has the colour of e; the background is black.
            for e in range(4):
                pixels = batch["image"][k][batch["mask"][k] == e]
                rgb = np.zeros(3) if e == 0 else tetrominoes.COLORS[batch["color"][k, e]]
                np.testing.assert_allclose(pixels, np.broadcast_to(rgb, pixels.shape))
            np.testing.assert_array_equal(batch["shape"][k, 1:], stored["shape"][1:] - 1)
            assert batch["shape"][k, 1:].max() <= 18
    config.dataset.num_eval_examples = 4
    limited = list(input_pipeline.create_eval_iterator(config, "test", batch_size=3))
    assert sum(b["valid"].sum() for b in limited) == 4


def test_mnist_hard_eval_batches_follow_the_resize(data_dir):
    config = _config(data_dir, name="mnist_hard", image_size=80, num_objects=9)
    (full,) = list(input_pipeline.create_eval_iterator(config, "test", batch_size=7))
    assert full["image"].shape == (7, 80, 80, 3)
    assert full["labels"].shape == (7, 9) and full["labels"].max() <= 9
    # Every digit's box holds ink, the canvas outside the boxes is black.
    for k in range(7):
        inside = np.zeros((80, 80), bool)
        for x0, y0, x1, y1 in full["boxes"][k]:
            box = full["image"][k, int(y0 + 0.5) : int(y1 + 0.5), int(x0 + 0.5) : int(x1 + 0.5)]
            assert box.max() > 0.5
            inside[int(y0 + 0.5) : int(y1 + 0.5), int(x0 + 0.5) : int(x1 + 0.5)] = True
        assert full["image"][k][~inside].max() == 0
    config.dataset.image_size = 40  # Same stored canvases, resized by 1/2.
    (half,) = list(input_pipeline.create_eval_iterator(config, "test", batch_size=7))
    assert half["image"].shape == (7, 40, 40, 3)
    np.testing.assert_allclose(half["centers"], (full["centers"] + 0.5) / 2 - 0.5, atol=1e-5)
    np.testing.assert_allclose(half["boxes"], (full["boxes"] + 0.5) / 2 - 0.5, atol=1e-5)
    np.testing.assert_array_equal(half["labels"], full["labels"])
    train = next(input_pipeline.create_train_iterator(config))
    assert train.shape == (2, 4, 40, 40, 3)
    np.testing.assert_array_equal(train[..., 0], train[..., 2])  # Grey digits, 3 channels.
