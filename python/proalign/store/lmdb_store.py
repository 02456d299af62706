"""One LMDB environment holding one record per slide.

A record is a single LMDB value, so writing a slide is atomic: magic `PAE1`, a little-endian
uint32 header length, a JSON header (dtype, shape, N, crc32 of the array bytes, provenance),
then the raw embedding bytes. Writers take an exclusive lock file beside the data so a second
writer gets a clear error instead of interleaving runs; readers never block.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np

from ..errors import StoreError, StoreLockedError, StoreWriteError

MAGIC = b"PAE1"
FORMAT_VERSION = 1
INITIAL_MAP_SIZE = 64 << 20  # grows by doubling on MapFullError
LOCK_NAME = "writer.lock"


@dataclass
class Record:
    embedding: np.ndarray
    n_patches: int
    meta: dict


def encode_record(embedding: np.ndarray, n_patches: int, meta: dict) -> bytes:
    arr = np.ascontiguousarray(embedding)
    header = {"dtype": arr.dtype.str, "shape": list(arr.shape), "n_patches": int(n_patches),
              "crc32": zlib.crc32(arr.tobytes()), "meta": meta}
    h = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + arr.tobytes()


def decode_record(value: bytes, slide_id: str = "?", verify: bool = False) -> Record:
    if value[:4] != MAGIC:
        raise StoreError(f"record {slide_id!r}: not a proalign record (bad magic {value[:4]!r})")
    (hlen,) = struct.unpack("<I", value[4:8])
    try:
        header = json.loads(value[8:8 + hlen])
    except ValueError as e:
        raise StoreError(f"record {slide_id!r}: corrupt header ({e})") from e
    body = value[8 + hlen:]
    dtype, shape = np.dtype(header["dtype"]), tuple(header["shape"])
    if len(body) != dtype.itemsize * int(np.prod(shape)):
        raise StoreError(f"record {slide_id!r}: {len(body)} bytes of data, header says {shape} {dtype}")
    if verify and zlib.crc32(body) != header["crc32"]:
        raise StoreError(f"record {slide_id!r}: checksum mismatch (data corrupted)")
    emb = np.frombuffer(body, dtype=dtype).reshape(shape)
    return Record(emb, header["n_patches"], header["meta"])


class EmbeddingStore:
    """`len(store)`, `id in store`, `store[id]` -> numpy embedding, `store.meta(id)`, iteration
    over ids (sorted). Open with `write=True` to add records (one writer at a time)."""

    def __init__(self, path: str | os.PathLike, write: bool = False):
        self.path = Path(path)
        self.write = write
        self._lock_fd: int | None = None
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
            self._take_lock()
        elif not (self.path / "data.mdb").exists():
            raise StoreError(f"no store at {self.path} (data.mdb not found)")
        try:
            self.env = lmdb.open(str(self.path), map_size=INITIAL_MAP_SIZE, subdir=True, readonly=not write,
                                 lock=True, max_dbs=0, readahead=True, meminit=False)
        except lmdb.Error as e:
            self._release_lock()
            raise StoreError(f"cannot open store {self.path}: {e}") from e

    # -- writer lock -------------------------------------------------------------------------
    def _take_lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"store {self.path} is open for writing by another process "
                                   f"(pid {holder}); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # -- reading ------------------------------------------------------------------------------
    def _get(self, slide_id: str) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            return txn.get(slide_id.encode())

    def record(self, slide_id: str, verify: bool = False) -> Record:
        value = self._get(slide_id)
        if value is None:
            raise KeyError(slide_id)
        return decode_record(value, slide_id, verify)

    def __getitem__(self, slide_id: str) -> np.ndarray:
        return self.record(slide_id).embedding

    def meta(self, slide_id: str) -> dict:
        rec = self.record(slide_id)
        return {**rec.meta, "n_patches": rec.n_patches}

    def __contains__(self, slide_id: object) -> bool:
        return isinstance(slide_id, str) and self._get(slide_id) is not None

    def __len__(self) -> int:
        return self.env.stat()["entries"]

    def __iter__(self) -> Iterator[str]:
        with self.env.begin() as txn:
            keys = [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
        return iter(keys)

    def items(self, verify: bool = False) -> Iterator[tuple[str, Record]]:
        with self.env.begin(buffers=False) as txn:
            for k, v in txn.cursor():
                sid = k.decode()
                yield sid, decode_record(v, sid, verify)

    # -- writing ------------------------------------------------------------------------------
    def put(self, slide_id: str, embedding: np.ndarray, n_patches: int, meta: dict) -> None:
        """Store one slide atomically (replacing an earlier record). Grows the map when full."""
        if not self.write:
            raise StoreError(f"store {self.path} was opened read-only")
        value = encode_record(embedding, n_patches, meta)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(slide_id.encode(), value)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                full = isinstance(e, lmdb.DiskError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG)
                why = "the disk is full or the file size limit was reached" if full else "write failed"
                raise StoreWriteError(f"store {self.path}: {why} while writing slide {slide_id!r} ({e}); "
                                 f"records already stored are intact") from e

    def put_raw_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store already-encoded records (as read from another store) in one transaction: all of
        them or none. Grows the map when full."""
        if not self.write:
            raise StoreError(f"store {self.path} was opened read-only")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for sid, value in items:
                        txn.put(sid.encode(), value)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise StoreWriteError(f"store {self.path}: write failed ({e}); "
                                      f"records already stored are intact") from e

    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None
        self._release_lock()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(path: str | os.PathLike, write: bool = False) -> EmbeddingStore:
    """Open an embedding store (read-only unless `write=True`)."""
    return EmbeddingStore(path, write=write)
