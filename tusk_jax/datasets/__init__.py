"""Datasets of tusk_jax: one tfds builder module per dataset, TensorFlow-free.

This package owns the data on disk: builders (array_record files,
`tfds.features.Tensor` features, read back with `as_data_source`), the
choice of source (real files from the manual dir or an embedded generator),
preparation on first use and the per-dataset preprocessing (SPEC 5) that
`tusk_jax.input_pipeline` applies. See README.md in this folder for the files
to download and the commands.

Dataset names (`config.dataset.name`) and their modules:
  mnist_hard -> mnist_hard.py, tetrominoes -> tetrominoes.py,
  clevr6 / clevr10 -> clevr.py, celeba_wild -> celeba_wild.py, h36m -> h36m.py.
"""

from __future__ import annotations

import importlib
import time
import types

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

DATASET_NAMES = ("mnist_hard", "tetrominoes", "clevr6", "clevr10", "celeba_wild", "h36m")
_MODULES = {
    "mnist_hard": "mnist_hard",
    "tetrominoes": "tetrominoes",
    "clevr6": "clevr",
    "clevr10": "clevr",
    "celeba_wild": "celeba_wild",
    "h36m": "h36m",
}
# Splits of each dataset. Landmark datasets: `train` for the unsupervised
# training, `regressor_train` to fit the linear regressor, `test` for the error.
SPLITS = {
    "mnist_hard": ("train", "test"),
    "tetrominoes": ("train", "test"),
    "clevr6": ("train", "test"),
    "clevr10": ("train", "test"),
    "celeba_wild": ("train", "regressor_train", "test"),
    "h36m": ("train", "regressor_train", "test"),
}


def get_module(name: str) -> types.ModuleType:
    """The dataset module of `name`; ValueError listing the valid names otherwise."""
    if name not in _MODULES:
        raise ValueError(
            f"Unknown dataset {name!r} (config.dataset.name); valid: {', '.join(DATASET_NAMES)}"
        )
    return importlib.import_module(f"tusk_jax.datasets.{_MODULES[name]}")


def check_split(name: str, split: str) -> None:
    """ValueError listing the valid splits of dataset `name` if `split` is not one."""
    get_module(name)
    if split not in SPLITS[name]:
        raise ValueError(
            f"Dataset {name!r} has no split {split!r}; valid: {', '.join(SPLITS[name])}"
        )


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder `config` asks for (source resolved and logged; not prepared)."""
    return get_module(config.dataset.name).make_builder(config)


def prepare_dataset(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Returns the builder for `config`, generating the dataset first if it is missing.

    (Named prepare_dataset because `tusk_jax.datasets.prepare` is the CLI module.)

    Preparation is atomic: tfds writes into `<dir>/incomplete.*` and renames
    it to its final name only when every split is written, so an interrupted
    run leaves nothing that looks complete (the next call starts again).
    """
    builder = get_builder(config)
    if builder.is_prepared():
        logging.info("Dataset %s found in %s.", config.dataset.name, builder.data_dir)
        return builder
    logging.info("Preparing dataset %s into %s ...", config.dataset.name, builder.data_dir)
    start = time.time()
    builder.download_and_prepare()
    logging.info(
        "Prepared dataset %s in %.1f s: %s",
        config.dataset.name,
        time.time() - start,
        {k: v.num_examples for k, v in builder.info.splits.items()},
    )
    return builder


def split_name(name: str, split: str) -> str:
    """The stored split behind a public split name (some datasets share storage)."""
    return getattr(get_module(name), "SPLIT_ALIASES", {}).get(split, split)


def data_source(config: ml_collections.ConfigDict, split: str, image_only: bool = False):
    """Random-access source of stored examples (dicts of numpy arrays) for `split`.

    Prepares the dataset on first use. With `image_only`, the other features
    are left undecoded (raw bytes): the training path skips e.g. CLEVR's
    zlib-compressed masks.
    """
    check_split(config.dataset.name, split)
    builder = prepare_dataset(config)
    decoders = None
    if image_only:
        decoders = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k != "image"}
    return builder.as_data_source(split=split_name(config.dataset.name, split), decoders=decoders)
