"""Reading row-chunked HDF5 datasets in one pass over the file.

TRIDENT and CLAM grow their `features`/`coords` datasets one batch at a time with chunks of one
row, so a 5,000-patch slide is 5,000 chunks, and HDF5 reads them one by one (about 10 µs each:
most of the features path's time). When a dataset is stored plainly (no filters, every chunk
written, chunks spanning whole rows, default file driver), its chunks are raw bytes at known
file offsets: list them once with H5Dchunk_iter, read each run of neighbouring chunks with one
`pread`, and copy the chunks' rows into place (back-to-back chunks as one block). Anything else
returns None and the caller uses h5py's own reader, which stays the reference (tests compare the
two on every layout).
"""
from __future__ import annotations

import math
import os

import h5py
import numpy as np

# Chunks closer than this are read with one pread, the bytes between them (B-tree nodes) and all.
# Farther apart (another dataset's chunks written in between, as TRIDENT interleaves features and
# coords batch by batch), a new read starts.
MAX_GAP_BYTES = 64 * 1024


def read_row_chunked(ds: h5py.Dataset) -> np.ndarray | None:
    """The whole dataset as ds[()] returns it, or None when the fast path does not apply."""
    layout = _row_layout(ds)
    if layout is None:
        return None
    rows_per_chunk, row_bytes = layout
    n_rows = ds.shape[-2]
    info: list[tuple[int, int, int, int]] = []
    ds.id.chunk_iter(lambda c: info.append((c.chunk_offset[-2], c.byte_offset, c.size, c.filter_mask)))
    chunk_bytes = rows_per_chunk * row_bytes
    if not info or len(info) != math.ceil(n_rows / rows_per_chunk):
        return None  # unwritten chunks read as fill values: h5py's path
    row, offset, size, mask = np.array(info, dtype=np.int64).T
    if (size != chunk_bytes).any() or (mask != 0).any():
        return None
    order = np.argsort(offset, kind="stable")
    row, offset = row[order], offset[order]
    out = bytearray(n_rows * row_bytes + chunk_bytes)  # room for the last chunk's padding
    fd = os.open(ds.file.filename, os.O_RDONLY)
    try:
        for lo, hi in _runs(offset, chunk_bytes, MAX_GAP_BYTES):
            raw = os.pread(fd, int(offset[hi - 1] - offset[lo]) + chunk_bytes, int(offset[lo]))
            if len(raw) != offset[hi - 1] - offset[lo] + chunk_bytes:
                return None  # file shorter than its chunk index says: let h5py report it
            src = memoryview(raw)
            # chunks back to back in the file and in row order are copied as one block
            for a, b in _runs(offset[lo:hi], chunk_bytes, 0, row[lo:hi], rows_per_chunk):
                at = int(offset[lo + a] - offset[lo])
                dst = int(row[lo + a]) * row_bytes
                out[dst:dst + (b - a) * chunk_bytes] = src[at:at + (b - a) * chunk_bytes]
    finally:
        os.close(fd)
    return np.frombuffer(out, dtype=ds.dtype, count=n_rows * (row_bytes // ds.dtype.itemsize)).reshape(ds.shape)


def _runs(offset: np.ndarray, chunk_bytes: int, max_gap: int, row: np.ndarray | None = None,
          rows_per_chunk: int = 0) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of chunks (sorted by file offset) with at most `max_gap` bytes between
    neighbours (and, given `row`, consecutive rows)."""
    cut = np.diff(offset) - chunk_bytes > max_gap
    if row is not None:
        cut |= np.diff(row) != rows_per_chunk
    edges = np.concatenate(([0], np.flatnonzero(cut) + 1, [len(offset)]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _row_layout(ds: h5py.Dataset) -> tuple[int, int] | None:
    """(rows per chunk, bytes per row) for a plain dataset (N, w) or (1, N, w) chunked along N only."""
    f = ds.file
    if (ds.chunks is None or ds.ndim not in (2, 3) or ds.shape[-2] == 0 or ds.dtype.hasobject
            or ds.dtype.kind not in "fiu" or f.driver != "sec2" or f.userblock_size != 0
            or ds.id.get_create_plist().get_nfilters() != 0):
        return None
    if ds.chunks[-1] != ds.shape[-1] or (ds.ndim == 3 and (ds.shape[0] != 1 or ds.chunks[0] != 1)):
        return None
    return ds.chunks[-2], ds.shape[-1] * ds.dtype.itemsize
