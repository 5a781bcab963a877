"""Datasets of tusk_jax: one tfds builder module per dataset, TensorFlow-free.

Each dataset module (listed in `MODULES`) declares `DATASETS`, one
`common.DatasetInfo` per dataset it builds, plus `make_builder(config)` and
`preprocess(...)` (SPEC 5); `registry()` collects them for the config checks,
`tusk_jax.evaluate` and `prepare`. README.md in this folder lists the files to
download and how to add a dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import os
import shutil
import time
import types

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from tusk_jax.datasets import common

DataFileError = common.DataFileError  # A data folder or stored file that cannot be read.
# Modules under tusk_jax/datasets/ that declare `DATASETS`.
MODULES = ("mnist_hard", "tetrominoes", "clevr", "celeba_wild", "h36m")


@functools.cache
def registry() -> dict[str, tuple[common.DatasetInfo, types.ModuleType]]:
    """Dataset name -> (its `DatasetInfo`, its module), in `MODULES` order."""
    found = {}
    for module_name in MODULES:
        module = importlib.import_module(f"tusk_jax.datasets.{module_name}")
        for info in module.DATASETS:
            found[info.name] = (info, module)
    return found


def names() -> tuple[str, ...]:
    """Every registered dataset name."""
    return tuple(registry())


def get_info(name: str) -> common.DatasetInfo:
    """The `DatasetInfo` of `name`; ValueError listing the valid names otherwise."""
    if name not in registry():
        raise ValueError(
            f"Unknown dataset {name!r} (config.dataset.name); valid: {', '.join(names())}"
        )
    return registry()[name][0]


def get_module(name: str) -> types.ModuleType:
    """The dataset module of `name`; ValueError listing the valid names otherwise."""
    get_info(name)
    return registry()[name][1]


def check_split(name: str, split: str) -> None:
    """ValueError listing the valid splits of dataset `name` if `split` is not one."""
    splits = get_info(name).splits
    if split not in splits:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; valid: {', '.join(splits)}")


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder `config` asks for (source resolved and logged; not prepared)."""
    return get_module(config.dataset.name).make_builder(config)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """`builder.is_prepared()`, without tfds's warning "... has no dataset_info.json".

    tfds logs that warning for a folder not prepared yet (even a missing one),
    every time it is asked; a dataset about to be prepared is no news.
    """
    info_file = os.path.join(os.fspath(builder.data_path), "dataset_info.json")
    return os.path.exists(info_file) and builder.is_prepared()


def prepare_dataset(
    config: ml_collections.ConfigDict, force: bool = False
) -> tfds.core.DatasetBuilder:
    """Returns the builder for `config`, generating the dataset first if it is missing.

    With `force`, a prepared dataset of this builder config (e.g. one whose
    files were damaged, see `check_split_files`) is removed and prepared anew.

    (Named prepare_dataset because `tusk_jax.datasets.prepare` is the CLI module.)

    Preparation is atomic: tfds writes into `<dir>/incomplete.*` and renames
    it to its final name only when every split is written, so an interrupted
    run leaves nothing that looks complete (the next call starts again).
    Preparers of one builder config take turns (a lock file `.prepare.lock`
    in its folder); the one holding the lock first removes the `incomplete.*`
    folders that a killed run left (no live run can own them), and a process
    that waited finds the dataset prepared.
    """
    builder = get_builder(config)
    if is_prepared(builder) and not force:
        logging.info("Dataset %s found in %s.", config.dataset.name, builder.data_dir)
        return builder
    config_dir = os.fspath(builder.data_path.parent)  # <data_dir>/<builder>/<config>
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, ".prepare.lock"), "w") as lock:
        locked = _lock(lock, config_dir)
        if force and os.path.isdir(builder.data_path):
            logging.warning("Removing %s to prepare it anew (--force).", builder.data_path)
            shutil.rmtree(builder.data_path)
            builder = get_builder(config)
        elif locked and is_prepared(builder):  # By another process, while this one waited.
            logging.info("Dataset %s prepared meanwhile in %s.", config.dataset.name, config_dir)
            return get_builder(config)  # Reads the new dataset_info.json.
        if locked:
            remove_incomplete(config_dir)
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


def _lock(file, folder: str) -> bool:
    """Takes an exclusive lock on the open `file` (waits for it); False where locks fail."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX)
    except OSError as error:
        logging.warning(
            "No file lock in %s (%s): stale incomplete.* folders are kept, and processes "
            "preparing this dataset at the same time may collide.",
            folder,
            error,
        )
        return False
    return True


def remove_incomplete(config_dir: str) -> list[str]:
    """Removes the `incomplete.*` folders and files of a killed preparation; returns their paths.

    Call only while holding the preparation lock of `config_dir`
    (`<data_dir>/<builder>/<config>`): tfds writes there, in
    `incomplete.<random>_<version>/`, until every split is written.
    """
    removed = []
    for name in sorted(os.listdir(config_dir)):
        if not name.startswith("incomplete."):
            continue
        path = os.path.join(config_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(path)
    if removed:
        logging.warning(
            "Removed %d incomplete folder(s) left by an interrupted preparation: %s",
            len(removed),
            ", ".join(removed),
        )
    return removed


def split_name(name: str, split: str) -> str:
    """The stored split behind a public split name (some datasets share storage)."""
    return get_info(name).split_aliases.get(split, split)


def data_source(config: ml_collections.ConfigDict, split: str, image_only: bool = False):
    """Random-access source of stored examples (dicts of numpy arrays) for `split`.

    Prepares the dataset on first use. With `image_only`, the other features
    are left undecoded (raw bytes): the training path skips e.g. CLEVR's
    zlib-compressed masks.
    """
    check_split(config.dataset.name, split)
    builder = prepare_dataset(config)
    check_split_files(config, builder, split_name(config.dataset.name, split))
    decoders = None
    if image_only:
        decoders = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k != "image"}
    return builder.as_data_source(split=split_name(config.dataset.name, split), decoders=decoders)


def prepare_command(config: ml_collections.ConfigDict) -> str:
    """The `tusk_jax.datasets.prepare --force` command that prepares `config`'s dataset anew."""
    dataset = config.dataset
    parts = [f"python -m tusk_jax.datasets.prepare --dataset={dataset.name}"]
    parts.append(f"--data_dir={common.get_data_dir(config)}")
    if dataset.get("manual_dir"):
        parts.append(f"--manual_dir={dataset.manual_dir}")
    for field in ("source", "num_train", "num_test", "num_objects", "image_size"):
        parts.append(f"--{field}={dataset[field]}")
    return " ".join(parts + ["--force"])


def check_split_files(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, split: str
) -> None:
    """Checks that each array_record file of the stored `split` holds all its examples.

    Reads only each file's index (a truncated or empty file has none, or
    fewer records than `dataset_info.json` lists), not the examples.

    Raises:
      common.DataFileError: naming the first missing, unreadable or short file
        and the command that prepares the dataset anew.
    """
    from array_record.python import array_record_module  # noqa: PLC0415 - tfds' reader.

    info = builder.info.splits[split]
    for path, expected in zip(info.filepaths, info.shard_lengths, strict=True):
        path = os.fspath(path)
        if not os.path.isfile(path):
            problem = "is missing"
        else:
            size = os.path.getsize(path)
            try:
                reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
            except (RuntimeError, OSError, ValueError) as error:
                problem = f"is unreadable ({size} bytes: {error})"
            else:
                found = reader.num_records()
                with contextlib.suppress(RuntimeError):  # A damaged file's close raises too.
                    reader.close()
                problem = None
                if found != expected:
                    problem = f"holds {found} of its {expected} examples ({size} bytes)"
        if problem is not None:
            raise common.DataFileError(
                f"dataset file {path} {problem}: damaged or cut short; prepare the dataset "
                f"anew with: {prepare_command(config)}"
            )
