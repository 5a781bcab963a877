r"""Command line: prepare a dataset (generate or convert it into the tfds data dir).

  python -m tusk_jax.datasets.prepare --dataset=tetrominoes
  python -m tusk_jax.datasets.prepare --dataset=mnist_hard --manual_dir=~/mnist
  python -m tusk_jax.datasets.prepare --config=configs/clevr6.py --manual_dir=/data/dm

`tusk_jax.datasets.prepare_dataset(config)` does the work (training calls it
on first use). Without --config, the dataset's own config
(`tusk_jax/configs/<DatasetInfo.config>.py`, `get_config()`) is used; the flags
below override either. An interrupted run leaves only an `incomplete.*`
folder that the next run removes. A file or setting that cannot give the
dataset (missing, corrupt, digits that do not fit) ends the command with a
one-line `error: ...` and exit status 1. `--force` removes the prepared
files of that dataset first (a damaged file names this command).
"""

from __future__ import annotations

import importlib
import sys
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from tusk_jax import cli, datasets

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file (configs/*.py).")
_DATASET = flags.DEFINE_enum("dataset", None, list(datasets.names()), "Dataset name.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder holding the real downloaded files.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
_SOURCE = flags.DEFINE_enum(
    "source", None, ["auto", "real", "procedural"], "Where the data comes from."
)
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "Procedural/real: training examples.")
_NUM_TEST = flags.DEFINE_integer("num_test", None, "Procedural/real: test examples.")
_NUM_OBJECTS = flags.DEFINE_integer("num_objects", None, "Procedural: objects per scene.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Training resolution (pixels).")
_FORCE = flags.DEFINE_bool(
    "force", False, "Remove this dataset's prepared files (e.g. damaged ones) and prepare anew."
)


def dataset_config(dataset: str) -> ml_collections.ConfigDict:
    """An unlocked copy of `tusk_jax/configs/<config>.py`'s `get_config()` for `dataset`.

    The paper settings, read from the package (never from a `configs` folder
    of the working directory).
    """
    info = datasets.get_info(dataset)
    module = importlib.import_module(f"tusk_jax.configs.{info.config}")
    config = ml_collections.ConfigDict(module.get_config().to_dict())
    config.dataset.name = dataset
    return config


def build_config(
    config: ml_collections.ConfigDict | None, dataset: str | None, **overrides
) -> ml_collections.ConfigDict:
    """The config to prepare: --config (or the dataset's own config) with overrides."""
    if config is None:
        if dataset is None:
            raise app.UsageError("give --dataset or --config")
        config = dataset_config(dataset)
    else:
        config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
        if dataset is not None and dataset != config.dataset.name:
            config.dataset.name = dataset
    for key, value in overrides.items():
        if value is not None:
            config.dataset[key] = value
    datasets.get_module(config.dataset.name)  # Validates the name.
    return config


# The dataset flags above, as `build_config` overrides.
OVERRIDE_FLAGS = (
    "manual_dir",
    "data_dir",
    "source",
    "num_train",
    "num_test",
    "num_objects",
    "image_size",
)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ml_collections.ConfigDict:
    """`build_config` from the parsed dataset flags (also read by tools.montage and benchmarks)."""
    overrides = {name: flag_values[name].value for name in OVERRIDE_FLAGS}
    return build_config(flag_values.config, flag_values.dataset, **overrides)


def main(argv):
    cli.start(argv)
    config = config_from_flags()
    start = time.time()
    try:
        builder = datasets.prepare_dataset(config, force=_FORCE.value)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    splits = {name: split.num_examples for name, split in builder.info.splits.items()}
    logging.info(
        "%s ready in %s (%.1f s): %s",
        config.dataset.name,
        builder.data_dir,
        time.time() - start,
        splits,
    )
    print(f"{config.dataset.name}: {builder.data_dir} {splits} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    app.run(main)
