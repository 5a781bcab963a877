"""Every config and variant builds and validates; bad values are rejected by name."""

import glob
import importlib
import os

import pytest

from tusk_jax import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
DATASET_CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(p).startswith(("base", "__"))
)


def get_config(name, variant=None):
    return importlib.import_module(f"configs.{name}").get_config(variant)


def test_every_dataset_has_a_config():
    expected = {"mnist_hard", "tetrominoes", "clevr6", "celeba", "h36m"}
    assert expected <= set(DATASET_CONFIGS)


@pytest.mark.parametrize("name", DATASET_CONFIGS)
@pytest.mark.parametrize("variant", [None, "cpu", "test"])
def test_config_builds_and_validates(name, variant):
    config = get_config(name, variant)
    if config.loss.recon == "perceptual":  # needs a weights file the user converts
        with pytest.raises(ValueError, match="loss.vgg16_weights"):
            config_lib.validate_config(config, device_count=2)
        return
    config_lib.validate_config(config, device_count=2)
    assert config.is_locked


def test_mnist_cpu_carries_its_measured_descriptor_sampling():
    # The README's measurement: the default collapses MNIST-Hard :cpu's
    # prototype mixture, bilinear with the location gradient holds it. The
    # other configs and MNIST-Hard at paper scale keep the default.
    assert get_config("mnist_hard", "cpu").model.descriptor_sampling == "bilinear"
    for name in DATASET_CONFIGS:
        assert get_config(name).model.descriptor_sampling == "bilinear_stop_gradient", name
    assert get_config("tetrominoes", "cpu").model.descriptor_sampling == "bilinear_stop_gradient"


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        get_config("tetrominoes", "gpu")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.num_keypoints", 0, "model.num_keypoints"),
        ("model.window", 4, "model.window"),
        ("dataset.name", "imagenet", "dataset.name"),
        ("train.batch_size", 3, "train.batch_size"),
        ("model.decoder_mode", "rgb", "model.decoder_mode"),
        ("tps.padding", "wrap", "tps.padding"),
        ("loss.recon", "l1", "loss.recon"),
        ("dataset.image_size", 18, "not divisible"),
        ("train.learning_rate", 0.0, "train.learning_rate"),
        ("train.prototype_objective", "vq", "train.prototype_objective"),
        ("train.lr_schedule", "step", "train.lr_schedule"),
        ("loss.sw_count_rounding", "nearest", "loss.sw_count_rounding"),
        ("train.warmup_steps", 4, "train.warmup_steps"),  # :test trains 4 steps.
    ],
)
def test_invalid_value_named(field, value, message):
    config = get_config("tetrominoes", "test")
    section, leaf = field.split(".")
    with config.unlocked():
        config[section][leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(config, device_count=2)


def test_alpha_mode_rejected_on_landmark_dataset():
    config = get_config("h36m", "test")
    with config.unlocked():
        config.model.decoder_mode = "alpha"
    with pytest.raises(ValueError, match="model.decoder_mode"):
        config_lib.validate_config(config, device_count=2)


def test_saved_config_round_trip(tmp_path):
    config = get_config("mnist_hard", "test")
    config_lib.save_config(config, str(tmp_path))
    loaded = config_lib.load_config(str(tmp_path))
    assert loaded.to_dict() == config.to_dict()
    with pytest.raises(FileNotFoundError, match="config.json"):
        config_lib.load_config(str(tmp_path / "nowhere"))


def test_an_old_run_loads_with_its_values_then_the_base_defaults(tmp_path):
    """Fields an old config.json lacks: the value it was trained with, else the base default."""
    import json

    config = get_config("tetrominoes", "test")
    saved = config.to_dict()
    del saved["model"]["init"]  # Has a legacy value: old runs were trained with lecun.
    del saved["model"]["head_groups"]  # Was model.num_groups.
    del saved["train"]["max_to_keep"]  # No legacy value: the base default.
    del saved["loss"]["sw_weight"]
    with open(tmp_path / config_lib.CONFIG_FILE, "w") as f:
        json.dump(saved, f)
    loaded = config_lib.load_config(str(tmp_path))
    assert loaded.model.init == config_lib.LEGACY_VALUES["model.init"] == "lecun"
    assert loaded.model.head_groups == config.model.num_groups
    assert loaded.train.max_to_keep == 3 and loaded.loss.sw_weight == 1.0
    assert loaded.model.num_prototypes == config.model.num_prototypes  # Saved values kept.
