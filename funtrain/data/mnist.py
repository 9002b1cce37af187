"""Reader for the IDX format of MNIST (and Fashion-MNIST, KMNIST) files you supply.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the data, big-endian.
Files may be gzip-compressed; that is detected from the content, not the name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from funtrain.data.dataset import ArrayDataset

_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(ValueError):
    """A file that is not a valid IDX file (wrong magic, truncated, trailing bytes)."""


def parse_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (already decompressed) into an array in native byte order."""
    if len(raw) < 4:
        raise IDXFormatError(f"{source}: truncated IDX header: need 4 magic bytes, file has "
                             f"{len(raw)}")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _TYPES or ndim == 0:
        raise IDXFormatError(
            f"{source}: wrong IDX magic {raw[:4].hex()}: expected 0000 then a type code in "
            f"{{{', '.join(f'{c:02x}' for c in _TYPES)}}} and a rank >= 1 (e.g. 00000803 "
            f"for MNIST images)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{source}: truncated IDX header: rank {ndim} needs {header} "
                             f"bytes, file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise IDXFormatError(f"{source}: truncated IDX data: shape {shape} of {dtype.name} "
                             f"needs {expected} bytes, file has {got}")
    if got > expected:
        raise IDXFormatError(f"{source}: {got - expected} unexpected bytes after the IDX "
                             f"data of shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise IDXFormatError(f"{path}: corrupt or truncated gzip stream: {err}") from err
    return parse_idx(raw, source=str(path))


_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"load_mnist: no {stem}[.gz] in {directory}")


def load_mnist(directory: str | os.PathLike, *, flatten: bool = True
               ) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the four standard MNIST IDX files from ``directory`` as ``(train, test)``.

    ``x`` is float32 in ``[0, 1]``, ``(N, 784)`` or ``(N, 28, 28, 1)``; ``y`` is int32.
    """
    directory = Path(directory)
    arrays = {k: read_idx(_find(directory, stem)) for k, stem in _FILES.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise IDXFormatError(f"load_mnist: {split} images {x.shape} and labels {y.shape} "
                                 f"do not pair up (expected (N, H, W) and (N,))")
        x = x.astype(np.float32) / 255.0
        x = x.reshape(len(x), -1) if flatten else x[..., None]
        out.append(ArrayDataset(x=x, y=y.astype(np.int32)))
    return out[0], out[1]
