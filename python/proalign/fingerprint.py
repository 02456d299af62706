"""Cheap content fingerprints of source files, so a resumed run notices a file replaced under the
same name (re-extracted features, a rescanned slide) without reading it whole.

- `.h5` feature files: the `features` dataset's shape and dtype plus a hash of a few rows (first,
  last and evenly spaced between). The embedding worker hashes the rows of the array it has just
  read; a resume reads only those rows from disk; both give the same string.
- `.pt` feature files and slide files: the size plus a hash of three fixed byte ranges (the head,
  where TIFF headers and first tiles live, the middle and the tail).

A fingerprint is a string `<kind>-v1:...`; two fingerprints of one kind compare as strings.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

SAMPLE_ROWS = 8
RANGE_BYTES = 64 << 10  # each of the three byte ranges


def sample_rows(n: int) -> list[int]:
    """The rows hashed in an n-row features dataset: first, last and evenly spaced between."""
    return sorted({int(r) for r in np.linspace(0, n - 1, SAMPLE_ROWS).round()}) if n > 0 else []


def _rows_fingerprint(shape: tuple[int, int], dtype: np.dtype, rows) -> str:
    le = dtype.newbyteorder("<")  # a big-endian file and its little-endian copy hold the same values
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update(np.ascontiguousarray(r, dtype=le).tobytes())
    return f"rows-v1:{shape[0]}x{shape[1]}:{le.str}:{h.hexdigest()}"


def features_fingerprint(features: np.ndarray) -> str:
    """Fingerprint of an (N, d) features array as read from an `.h5` file (its own dtype)."""
    return _rows_fingerprint(features.shape, features.dtype, (features[r] for r in sample_rows(len(features))))


def h5_fingerprint(path: str | os.PathLike) -> str:
    """The same fingerprint read from the file: the dataset's shape and a few rows, nothing more."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f["features"]
        batch = ds.ndim == 3 and ds.shape[0] == 1  # (1, N, d), as some tools write it
        shape = ds.shape[1:] if batch else ds.shape
        if len(shape) != 2:
            raise ValueError(f"dataset 'features' has shape {ds.shape}, expected (N, d)")
        rows = (ds[0, r] if batch else ds[r] for r in sample_rows(shape[0]))
        return _rows_fingerprint(shape, ds.dtype, rows)


def bytes_fingerprint(path: str | os.PathLike) -> str:
    """Size plus a hash of the head, middle and tail of the file (a few preads, whatever its size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
        for start in sorted({0, max(0, size // 2 - RANGE_BYTES // 2), max(0, size - RANGE_BYTES)}):
            h.update(os.pread(fd, RANGE_BYTES, start))
    finally:
        os.close(fd)
    return f"bytes-v1:{h.hexdigest()}"


def feature_file_fingerprint(path: str | os.PathLike) -> str:
    """A feature file's fingerprint read from disk (`.h5`: rows; others: byte ranges)."""
    return h5_fingerprint(path) if Path(path).suffix == ".h5" else bytes_fingerprint(path)


def describe_change(old: str | None, new: str | None) -> str:
    """What differs between two fingerprints, for a person: the features' shape when it changed."""
    if old == new:
        return "same content"
    o, n = (old or "").split(":"), (new or "").split(":")
    if o[0] == n[0] == "rows-v1" and len(o) == len(n) == 4:
        if o[1] != n[1]:
            return f"features {o[1].replace('x', ' x ')} -> {n[1].replace('x', ' x ')}"
        if o[2] != n[2]:
            return f"features dtype {o[2]} -> {n[2]}"
    return "content fingerprint differs"
