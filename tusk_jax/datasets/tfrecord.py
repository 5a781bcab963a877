"""TensorFlow-free TFRecord and `tf.train.Example` reading (and writing, for tests).

This module owns the on-disk format of DeepMind's multi_object_datasets files:
a TFRecord file (optionally one GZIP stream over the whole file) is a sequence
of records

    uint64 length (little endian) | uint32 masked_crc32c(length bytes)
    | length bytes of payload     | uint32 masked_crc32c(payload)

and each payload is a serialised `tf.train.Example`. Both CRCs are verified.

Why by hand: TensorFlow is not a dependency, and no installed library reads
TFRecords or computes CRC-32C (Castagnoli) fast. The `tf.train.Example`
message itself comes from the proto that ships with tensorflow-datasets.
CRC-32C uses the C package `google_crc32c` when installed, else numpy (see
`numpy_crc32c`, ~60 MB/s): a per-byte Python loop (tensorboardX's) would
take hours on CLEVR's 3 MB records.

DeepMind stores images and masks as `bytes_list` features with ONE BYTE PER
ELEMENT (`tf.io.FixedLenFeature(shape, tf.string)` + `decode_raw`);
`parse_example` turns those into uint8 arrays with a fast path that reads the
serialised list directly (3 bytes per element: tag 0x0A, length 1, value).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import struct
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

# ---------------------------------------------------------------------------
# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), vectorised.
# The CRC register update for one byte b is s' = Z(s) ^ TABLE[b] with
# Z(s) = TABLE[s & 0xFF] ^ (s >> 8), linear over GF(2). So the register after a
# chunk of C bytes is Z^C(s) ^ XOR_j Z^(C-1-j)(TABLE[b_j]): the second term is
# one gather + XOR-reduction per chunk, and Z^C is applied with 4 byte tables.
# ---------------------------------------------------------------------------
try:  # Optional accelerator (pip install google-crc32c).
    import google_crc32c as _google_crc32c
except ImportError:
    _google_crc32c = None

_POLY = 0x82F63B78
_CHUNK = 1024  # 1 MB contribution table: fits in L2 (4096 was 2x slower).


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1)
    return table.astype(np.uint32)


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _zero_byte(state: np.ndarray) -> np.ndarray:
    """Z: the register update for one zero byte, elementwise on uint32 states."""
    return _TABLE[state & 0xFF] ^ (state >> 8)


@functools.cache
def _chunk_tables() -> tuple[np.ndarray, list[list[int]]]:
    """Returns (contrib[C, 256], shift[4][256]): contrib[j, b] = Z^(C-1-j)(TABLE[b]),
    shift[i][b] = Z^C(b << 8i)."""
    contrib = np.empty((_CHUNK, 256), np.uint32)
    row = _TABLE.copy()
    for j in range(_CHUNK - 1, -1, -1):
        contrib[j] = row
        row = _zero_byte(row)
    basis = np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]
    for _ in range(_CHUNK):
        basis = _zero_byte(basis)
    return contrib, [[int(v) for v in r] for r in basis]


@functools.cache
def _zero_bytes_of_init(num_bytes: int) -> int:
    """Z^num_bytes(0xFFFFFFFF), the initial register pushed through num_bytes bytes."""
    state = 0xFFFFFFFF
    for _ in range(num_bytes):
        state = _TABLE_LIST[state & 0xFF] ^ (state >> 8)
    return state


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C (Castagnoli) of `data`, as used by TFRecord; crc32c(b"123456789") = 0xE3069283.

    Uses the C package `google_crc32c` when it is installed (~GB/s), else the
    numpy implementation below (~60 MB/s).
    """
    if _google_crc32c is not None:
        return _google_crc32c.value(bytes(data) if isinstance(data, np.ndarray) else data)
    return numpy_crc32c(data)


def numpy_crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C computed with numpy (chunked linear form, see the comment above)."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    buf = buf.reshape(-1)
    contrib, shift = _chunk_tables()
    head = buf.size % _CHUNK
    state = _zero_bytes_of_init(head)
    if head:
        rows = np.arange(_CHUNK - head, _CHUNK)
        state ^= int(np.bitwise_xor.reduce(contrib[rows, buf[:head]]))
    if buf.size > head:
        chunks = buf[head:].reshape(-1, _CHUNK)
        parts = np.bitwise_xor.reduce(contrib[np.arange(_CHUNK)[None, :], chunks], axis=1)
        s0, s1, s2, s3 = shift
        for part in parts.tolist():
            state = (
                s0[state & 0xFF]
                ^ s1[(state >> 8) & 0xFF]
                ^ s2[(state >> 16) & 0xFF]
                ^ s3[state >> 24]
                ^ part
            )
    return state ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add 0xA282EAD8 (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# TFRecord files.
# ---------------------------------------------------------------------------
def _open_maybe_gzip(path: str) -> io.BufferedIOBase:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_records(
    path: str | os.PathLike, verify_crc: bool = True, indices: Container[int] | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yields (record index, payload) of a TFRecord file, GZIP-compressed or not (detected).

    Args:
      path: the file.
      verify_crc: check the payload CRC of every yielded record (the length
        CRC is always checked).
      indices: if given, only records whose index is in it are yielded (the
        others are read past without a payload CRC check); reading stops
        after max(indices) when `indices` is a range, list, tuple or set.

    Raises:
      FileNotFoundError: naming `path` when it does not exist.
      ValueError: naming the file and the record index when a record is
        truncated, a CRC does not match, or the GZIP stream is corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TFRecord file not found: {path}")
    last = None
    if isinstance(indices, (range, list, tuple, set, frozenset)):
        last = max(indices, default=-1)
    index = 0
    with _open_maybe_gzip(path) as f:
        while last is None or index <= last:
            try:
                header = f.read(12)
                if not header:
                    return
                if len(header) < 12:
                    raise ValueError(
                        f"{path}: record {index} is truncated (header has {len(header)} of 12 "
                        "bytes); the file was cut short, download it again."
                    )
                (length,) = struct.unpack("<Q", header[:8])
                (length_crc,) = struct.unpack("<I", header[8:])
                if masked_crc32c(header[:8]) != length_crc:
                    raise ValueError(
                        f"{path}: record {index} has a corrupt length field (CRC mismatch)."
                    )
                payload = f.read(length)
                footer = f.read(4)
            except (EOFError, OSError, gzip.BadGzipFile) as e:
                raise ValueError(
                    f"{path}: record {index}: the GZIP stream is truncated or corrupt ({e})."
                ) from e
            if len(payload) < length or len(footer) < 4:
                raise ValueError(
                    f"{path}: record {index} is truncated ({len(payload)} of {length} payload "
                    "bytes); the file was cut short, download it again."
                )
            if indices is None or index in indices:
                if verify_crc and masked_crc32c(payload) != struct.unpack("<I", footer)[0]:
                    raise ValueError(f"{path}: record {index} is corrupt (payload CRC mismatch).")
                yield index, payload
            index += 1


def write_records(
    path: str | os.PathLike, payloads: Iterable[bytes], compression: str | None = "GZIP"
) -> None:
    """Writes payloads as a TFRecord file (compression: 'GZIP' or None)."""
    opener = gzip.open if compression == "GZIP" else open
    if compression not in ("GZIP", None):
        raise ValueError(f"compression must be 'GZIP' or None, got {compression!r}")
    with opener(os.fspath(path), "wb") as f:
        for payload in payloads:
            length = struct.pack("<Q", len(payload))
            f.write(length)
            f.write(struct.pack("<I", masked_crc32c(length)))
            f.write(payload)
            f.write(struct.pack("<I", masked_crc32c(payload)))


# ---------------------------------------------------------------------------
# tf.train.Example.
# ---------------------------------------------------------------------------
def _bytes_list_to_uint8(bytes_list, name: str) -> np.ndarray:
    """A bytes_list of one-byte elements (DeepMind's layout) as uint8[N]."""
    raw = np.frombuffer(bytes_list.SerializeToString(), np.uint8)
    if raw.size % 3 == 0:
        triples = raw.reshape(-1, 3)
        if np.all(triples[:, 0] == 0x0A) and np.all(triples[:, 1] == 1):
            return triples[:, 2].copy()
    values = list(bytes_list.value)
    if len(values) == 1:  # One string holding the whole array.
        return np.frombuffer(values[0], np.uint8).copy()
    if any(len(v) != 1 for v in values):
        raise ValueError(
            f"feature {name!r}: expected one byte per bytes_list element or a single string"
        )
    return np.frombuffer(b"".join(values), np.uint8).copy()


def parse_example(
    serialized: bytes, spec: Mapping[str, tuple[str, Sequence[int]]]
) -> dict[str, np.ndarray]:
    """Parses a serialised `tf.train.Example` into numpy arrays.

    Args:
      serialized: the payload of one TFRecord record.
      spec: feature name -> (kind, shape), kind in {'bytes' (uint8, one byte
        per element), 'float' (float32), 'int' (int64)}; shape as in
        `tf.io.FixedLenFeature` (the product must equal the element count).

    Returns:
      name -> array reshaped to `shape`.

    Raises:
      ValueError: naming the feature when it is missing, of another kind, or
        of the wrong size.
    """
    example = example_pb2.Example.FromString(serialized)
    features = example.features.feature
    out = {}
    for name, (kind, shape) in spec.items():
        if name not in features:
            raise ValueError(f"feature {name!r} missing from tf.train.Example")
        feature = features[name]
        which = feature.WhichOneof("kind")
        expected = {"bytes": "bytes_list", "float": "float_list", "int": "int64_list"}[kind]
        if which != expected:
            raise ValueError(f"feature {name!r}: expected {expected}, found {which}")
        if kind == "bytes":
            values = _bytes_list_to_uint8(feature.bytes_list, name)
        elif kind == "float":
            values = np.asarray(feature.float_list.value, np.float32)
        else:
            values = np.asarray(feature.int64_list.value, np.int64)
        size = int(np.prod(shape))
        if values.size != size:
            raise ValueError(
                f"feature {name!r}: {values.size} values, expected {size} for shape {tuple(shape)}"
            )
        out[name] = values.reshape(shape)
    return out


def make_example(features: Mapping[str, np.ndarray]) -> bytes:
    """Serialises arrays as a `tf.train.Example` in DeepMind's layout.

    uint8 arrays become bytes_lists with one byte per element, floating arrays
    float_lists, integer arrays int64_lists (all flattened in C order).
    """
    example = example_pb2.Example()
    for name, value in features.items():
        value = np.asarray(value)
        feature = example.features.feature[name]
        if value.dtype == np.uint8:
            flat = value.reshape(-1).tobytes()
            feature.bytes_list.value.extend([flat[i : i + 1] for i in range(len(flat))])
        elif np.issubdtype(value.dtype, np.floating):
            feature.float_list.value.extend(value.reshape(-1).astype(np.float32).tolist())
        elif np.issubdtype(value.dtype, np.integer):
            feature.int64_list.value.extend(value.reshape(-1).astype(np.int64).tolist())
        else:
            raise ValueError(f"feature {name!r}: unsupported dtype {value.dtype}")
    return example.SerializeToString()


def read_examples(
    path: str | os.PathLike,
    spec: Mapping[str, tuple[str, Sequence[int]]],
    indices: Container[int] | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (record index, parsed example) of a TFRecord file in file order.

    Only records in `indices` when given (see `read_records`). Errors name
    the file and the record index.
    """
    for index, payload in read_records(path, indices=indices):
        try:
            yield index, parse_example(payload, spec)
        except Exception as e:  # Protobuf DecodeError or a spec mismatch.
            raise ValueError(f"{os.fspath(path)}: record {index}: {e}") from e
