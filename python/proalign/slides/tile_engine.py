"""Reading compressed tiles: the C++ engine (proalign._C.TileReader/TileStream) or its Python twin.

Both take (offsets, sizes) arrays, read tiles with positional reads on several threads (the GIL is
released: pread in C++, os.pread in Python), splice a JPEG prefix (tables) into each tile, and
return (list of bytes, list of (position, error)). A stream reads batches ahead of the consumer
through a bounded queue.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# APP14 "Adobe" segment with transform 0: tells every JPEG decoder (libjpeg-turbo, nvJPEG) that the
# three components are RGB, not YCbCr. Aperio writes RGB JPEG tiles (Photometric RGB) without it.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

TileBatch = tuple[list[bytes], list[tuple[int, str]]]


def jpeg_prefix(tables: bytes | None, photometric: int) -> bytes:
    """What goes before a tile's bytes (minus its SOI): SOI, the Adobe RGB marker when the TIFF says
    the JPEG data are RGB, and the tables (JPEGTables without its SOI and EOI)."""
    body = b""
    if tables:
        body = tables[2:] if tables.startswith(SOI) else tables
        body = body[:-2] if body.endswith(EOI) else body
    return SOI + (ADOBE_RGB if photometric == 2 else b"") + body


def native_available() -> bool:
    try:
        from .. import _C  # noqa: F401
        return hasattr(_C, "TileReader")
    except ImportError:
        return False


class PyTileReader:
    """The Python twin of proalign._C.TileReader, same arguments and output."""

    def __init__(self, path: str, prefix: bytes = b"", splice_jpeg: bool = False, threads: int = 4):
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.file_size = os.fstat(self._fd).st_size
        self.prefix, self.splice_jpeg, self.threads = prefix, splice_jpeg, max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _read_one(self, offset: int, size: int) -> tuple[bytes, str]:
        try:
            return self._read_one_unguarded(offset, size)
        except (MemoryError, OSError) as e:  # like the C++ reader: the tile's error, not a crash
            return b"", f"the tile reader failed: {type(e).__name__}: {e or 'out of memory'}"

    def _read_one_unguarded(self, offset: int, size: int) -> tuple[bytes, str]:
        if size == 0:
            return b"", ""
        if offset > self.file_size or size > self.file_size - offset:
            return b"", (f"tile bytes {offset}+{size} lie past the end of the {self.file_size}-byte file "
                         "(truncated slide?)")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            return b"", f"read failed at byte {offset + len(data)}: unexpected end of file"
        if self.splice_jpeg and len(self.prefix) >= 2:
            if not data.startswith(SOI):
                return b"", "tile does not start with a JPEG SOI marker (corrupt tile or wrong offset)"
            data = self.prefix + data[2:]
        return data, ""

    def read(self, offsets: np.ndarray, sizes: np.ndarray) -> TileBatch:
        pairs = list(zip(np.asarray(offsets, np.uint64).tolist(), np.asarray(sizes, np.uint64).tolist()))
        results = (self._pool.map(lambda p: self._read_one(*p), pairs) if self._pool and len(pairs) > 1
                   else [self._read_one(*p) for p in pairs])
        data, errors = [], []
        for i, (d, err) in enumerate(results):
            data.append(d)
            if err:
                errors.append((i, err))
        return data, errors

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PyTileStream:
    """The Python twin of proalign._C.TileStream: a reader thread, at most `max_ahead` batches queued.
    An exception in the reader thread is queued in place of its batch and raised by the consumer, so
    the consumer never waits on a thread that died."""

    def __init__(self, reader: PyTileReader, batches: Sequence[tuple[np.ndarray, np.ndarray]], max_ahead: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, max_ahead))
        self._n = len(batches)
        self._stop = threading.Event()
        self.max_queued = 0

        def run() -> None:
            for offsets, sizes in batches:
                try:
                    item = reader.read(offsets, sizes)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
                    item = e
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set() or isinstance(item, BaseException):
                    return
                self.max_queued = max(self.max_queued, self._q.qsize())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[TileBatch]:
        for _ in range(self._n):
            item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def __del__(self):
        self._stop.set()


def open_reader(path: str | Path, prefix: bytes = b"", splice_jpeg: bool = False, threads: int = 4,
                native: bool | None = None):
    """A TileReader: the C++ one when proalign._C is built (or `native=True`), else the Python twin."""
    if native is None:
        native = native_available()
    if native:
        from .. import _C
        return _C.TileReader(str(path), prefix, splice_jpeg, threads)
    return PyTileReader(str(path), prefix, splice_jpeg, threads)


def stream_batches(reader, batches: Sequence[tuple[np.ndarray, np.ndarray]], max_ahead: int = 2) -> Iterator[TileBatch]:
    """Batches of tiles read ahead by the reader's engine, in order."""
    if isinstance(reader, PyTileReader):
        return iter(PyTileStream(reader, batches, max_ahead))
    from .. import _C
    return iter(_C.TileStream(reader, [(np.ascontiguousarray(o, np.uint64), np.ascontiguousarray(s, np.uint64))
                                       for o, s in batches], max_ahead))
