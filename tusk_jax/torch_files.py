"""Reading `torch.save` files without PyTorch and without running code from them.

A `torch.save` file (PyTorch >= 1.6) is a zip archive: `<name>/data.pkl`, a
pickle of the saved object in which every tensor is a call of
`torch._utils._rebuild_tensor_v2` on a "persistent id" naming a storage
record `<name>/data/<key>` (the raw little- or big-endian bytes, as the
archive's `<name>/byteorder` says).

Unpickling runs whatever callables a pickle names, so a file from the
internet must never go through `pickle.load` or a plain `torch.load`.
`read_torch_file` uses a restricted unpickler instead: it resolves only the
globals listed in `_ALLOWED_GLOBALS` (the tensor and parameter rebuilders,
the typed storages and `collections.OrderedDict`), each to a function of this
module that builds a NumPy array or a plain container; a pickle that names
any other global is refused with `UnsafeTorchFileError` before anything of it
runs. This is the same policy as `torch.load(weights_only=True)`, written out
here so that reading the authors' checkpoints needs neither PyTorch (about a
gigabyte) nor trust in the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

# PyTorch's typed storages, as a pickle names them, and their NumPy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """A file that is not a readable `torch.save` archive."""


class UnsafeTorchFileError(TorchFileError):
    """A `torch.save` file whose pickle names a global other than tensors and containers."""


class _Storage:
    """One storage record of the archive: a flat NumPy array (`data`)."""

    def __init__(self, data: np.ndarray):
        self.data = data


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a strided view of a storage, copied to a new array.

    Trailing arguments (requires_grad, backward hooks, metadata) carry no data.
    """
    if not isinstance(storage, _Storage):
        raise TorchFileError("a tensor in the file does not refer to a storage record.")
    flat = storage.data
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if any(n == 0 for n in size):
        return np.zeros(size, flat.dtype)
    if storage_offset < 0 or needed > flat.size or any(s < 0 for s in stride):
        raise TorchFileError(
            f"a tensor of shape {size} reaches past its storage of {flat.size} elements "
            "(truncated or corrupt file)."
        )
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=tuple(s * flat.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_parameter`: an `nn.Parameter` is its data."""
    return data


def _ordered_dict(*args) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): name for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; storages are read from the open archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder, self._path = (
            archive,
            prefix,
            byteorder,
            path,
        )
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeTorchFileError(
                f"refusing to read {self._path}: its pickle names the global {module}.{name}, "
                "which is not a tensor or a plain container; only tensors, dicts, lists and "
                "numbers are read from checkpoint files (nothing in them is executed)."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self._path}: unknown persistent id {pid!r} in its pickle.")
        _, storage_type, key, _location, numel = pid
        if storage_type not in _STORAGE_DTYPES:
            raise UnsafeTorchFileError(
                f"refusing to read {self._path}: storage type {storage_type!r} is not one of "
                f"{sorted(_STORAGE_DTYPES)}."
            )
        if key not in self._storages:
            dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder(
                "<" if self._byteorder == "little" else ">"
            )
            record = f"{self._prefix}/data/{key}"
            try:
                raw = self._archive.read(record)
            except KeyError:
                raise TorchFileError(
                    f"{self._path}: the storage record {record} is missing (truncated file?)."
                ) from None
            if len(raw) < int(numel) * dtype.itemsize:
                raise TorchFileError(
                    f"{self._path}: the storage record {record} holds {len(raw)} bytes, "
                    f"{int(numel) * dtype.itemsize} expected (truncated file?)."
                )
            data = np.frombuffer(raw, dtype, count=int(numel)).astype(dtype.newbyteorder("="))
            self._storages[key] = _Storage(data)
        return self._storages[key]


def read_torch_file(path: str) -> Any:
    """The object a `torch.save` file holds, with every tensor as a NumPy array.

    Args:
      path: a file written by `torch.save` (zip format, PyTorch >= 1.6).

    Returns:
      The saved object: dicts (`OrderedDict` for state dicts), lists, tuples,
      numbers and strings as Python values, tensors and parameters as NumPy
      arrays (copies, in native byte order).

    Raises:
      FileNotFoundError: no file at `path`.
      UnsafeTorchFileError: the pickle names a global other than the tensor
        rebuilders, storages and `OrderedDict` (nothing of it is executed).
      TorchFileError: not a zip archive of `torch.save` (e.g. a truncated
        download, or the legacy pre-1.6 format), or a storage is missing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (a torch.save file was expected).")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise TorchFileError(
            f"{path} is not a torch.save zip archive ({error}): a truncated download, or a "
            "file of PyTorch < 1.6's legacy format (load and save it again with a newer PyTorch)."
        ) from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError(
                f"{path} is a zip archive but not one of torch.save (it has "
                f"{len(pickles)} '<name>/data.pkl' records, one expected)."
            )
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = "little"
        if f"{prefix}/byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        try:
            data = archive.read(pickles[0])
            return _RestrictedUnpickler(data, archive, prefix, byteorder, path).load()
        except TorchFileError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as error:
            raise TorchFileError(f"{path}: its pickle cannot be read ({error}).") from None
