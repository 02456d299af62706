"""One LMDB environment holding one record per slide.

A record is a single LMDB value, so writing a slide is atomic: magic `PAE1`, a little-endian
uint32 header length, a JSON header (dtype, shape, N, crc32 of the array bytes, provenance),
then the raw embedding bytes. Writers take an exclusive lock file beside the data so a second
writer gets a clear error instead of interleaving runs; readers never block. Writers are refused
on network file systems (LMDB's locks and shared memory map do not work across hosts).
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import struct
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import lmdb
import numpy as np

from ..errors import StoreError, StoreLockedError, StoreWriteError

MAGIC = b"PAE1"
FORMAT_VERSION = 1
INITIAL_MAP_SIZE = 64 << 20  # grows by doubling on MapFullError
LOCK_NAME = "writer.lock"
ALLOW_NETWORK_ENV = "PROALIGN_ALLOW_NETWORK_STORE"
# file system types (as /proc/self/mountinfo names them) whose locks do not work across hosts
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph-fuse",
              "fuse.ceph"}
HEADER_KEYS = ("dtype", "shape", "n_patches", "crc32", "meta")
RAW_BATCH_RECORDS = 4096  # records per transaction when copying records between stores
RAW_BATCH_BYTES = 256 << 20


@dataclass
class Record:
    embedding: np.ndarray
    n_patches: int
    meta: dict


# Options a record made before they existed was made with: old stores stay readable and
# resumable, their records counting as made with these.
LEGACY_PROALIGN = {"moments": 1, "prior": 0.0}
# A slide-file record (its options name the grid's `min_tissue`) made before pen-mark exclusion
# existed kept the patches under the ink.
LEGACY_SLIDES = {"keep_penmarks": True}


def normalise_options(options: dict | None, slide_options: dict | None = None) -> dict | None:
    """A stored record's `options`, with the options older versions did not record. `slide_options`:
    the record's `slide_options` (all SlideOptions fields), which versions that put keep_penmarks in
    `options` only when true already held in full."""
    if not options:
        return options
    if options.get("method") == "proalign":
        options = {**LEGACY_PROALIGN, **options}
    if "min_tissue" in options and "keep_penmarks" not in options:
        kept = (slide_options or {}).get("keep_penmarks", LEGACY_SLIDES["keep_penmarks"])
        options = {**options, "keep_penmarks": bool(kept or options.get("coords"))}
    return options


def option_diff(a: dict | None, b: dict | None) -> str:
    """The options two (normalised) option sets differ in: 'name: a vs b; ...'."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "one has no options recorded"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{'prototype set' if k == 'prototypes' else k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def encode_record(embedding: np.ndarray, n_patches: int, meta: dict) -> bytes:
    arr = np.ascontiguousarray(embedding)
    header = {"dtype": arr.dtype.str, "shape": list(arr.shape), "n_patches": int(n_patches),
              "crc32": zlib.crc32(arr.tobytes()), "meta": meta}
    h = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + arr.tobytes()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_record(value: bytes, slide_id: str = "?", verify: bool = False, store: str | os.PathLike = "") -> Record:
    """Decode one stored value; any malformed record is a StoreError "<store>: record <id>: why"
    (callers such as the scheduler's scan catch StoreError only)."""
    where = f"{store}: record {slide_id!r}" if store else f"record {slide_id!r}"

    def bad(why: str) -> StoreError:
        return StoreError(f"{where}: {why}")

    if value[:4] != MAGIC:
        raise bad(f"not a proalign record (bad magic {value[:4]!r})")
    if len(value) < 8:
        raise bad(f"too short ({len(value)} bytes)")
    (hlen,) = struct.unpack("<I", value[4:8])
    if 8 + hlen > len(value):
        raise bad(f"header length {hlen} runs past the end of the {len(value)}-byte record")
    try:
        header = json.loads(value[8:8 + hlen])
    except ValueError as e:
        raise bad(f"corrupt header ({e})") from e
    if not isinstance(header, dict):
        raise bad(f"header is not a JSON object ({type(header).__name__})")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise bad(f"header is missing {', '.join(missing)}")
    try:
        dtype = np.dtype(header["dtype"])
    except (TypeError, ValueError) as e:
        raise bad(f"bad dtype {header['dtype']!r} ({e})") from e
    if dtype.kind not in "biufc":  # object or structured dtypes cannot come from raw bytes
        raise bad(f"bad dtype {header['dtype']!r} (not a numeric type)")
    shape = header["shape"]
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise bad(f"bad shape {shape!r}")
    if not _is_int(header["n_patches"]) or not _is_int(header["crc32"]):
        raise bad(f"bad n_patches {header['n_patches']!r} or crc32 {header['crc32']!r}")
    if not isinstance(header["meta"], dict):
        raise bad(f"bad meta {header['meta']!r} (not a JSON object)")
    body = value[8 + hlen:]
    if len(body) != dtype.itemsize * math.prod(shape):
        raise bad(f"{len(body)} bytes of data, header says {tuple(shape)} {dtype}")
    if verify and zlib.crc32(body) != header["crc32"]:
        raise bad("checksum mismatch (data corrupted)")
    emb = np.frombuffer(body, dtype=dtype).reshape(shape)
    return Record(emb, header["n_patches"], header["meta"])


def network_fs_type(path: str, mountinfo: str) -> str | None:
    """The network file system type (NFS, SMB, Lustre, ...) holding absolute `path`, given the text
    of /proc/self/mountinfo; None for a local one. The longest mount point containing `path` wins
    (the later line on a tie: it is mounted over the earlier)."""
    best, best_len = None, -1
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        # fields: id parent major:minor root MOUNT_POINT options [optional...] - FSTYPE source super-options
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 = space
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best_len:
            best, best_len = fstype, len(mount)
    return best if best in NETWORK_FS else None


def network_filesystem(path: str | os.PathLike) -> str | None:
    """The network file system type holding `path` (which need not exist yet), or None when local
    or when the mount table cannot be read (not Linux)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    except OSError:
        return None
    return network_fs_type(os.path.realpath(path), mountinfo)


class EmbeddingStore:
    """`len(store)`, `id in store`, `store[id]` -> numpy embedding, `store.meta(id)`, iteration
    over ids (sorted). Open with `write=True` to add records (one writer at a time)."""

    def __init__(self, path: str | os.PathLike, write: bool = False):
        self.path = Path(path)
        self.write = write
        self._lock_fd: int | None = None
        if write:
            self._refuse_network_fs()
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

    def _refuse_network_fs(self) -> None:
        fstype = network_filesystem(self.path)
        if fstype and os.environ.get(ALLOW_NETWORK_ENV) != "1":
            raise StoreError(
                f"store {self.path} is on a network file system ({fstype}): LMDB's locks do not work across "
                f"hosts, so a writer or reader on another node can corrupt it or read garbage. Write the store "
                f"(or one shard per node) on local disk, join shards with `proalign-engine store merge OUT "
                f"SHARD...` there, and copy the finished store. If only this host will ever open it, set "
                f"{ALLOW_NETWORK_ENV}=1 to write it in place.")

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
    @contextmanager
    def read_txn(self) -> Iterator[lmdb.Transaction]:
        """Every read goes through here. A writer in another process may have grown the map since
        we opened it; LMDB then refuses with MapResizedError until we adopt the new size with
        set_mapsize(0) (which invalidates our other open transactions on this store, if any: reads
        here are short and none is open in normal use). Any other LMDB error becomes a StoreError
        naming the store."""
        try:
            try:
                txn = self.env.begin(buffers=False)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
                txn = self.env.begin(buffers=False)
        except lmdb.Error as e:
            raise StoreError(f"store {self.path}: cannot read ({type(e).__name__}: {e})") from e
        try:
            yield txn
        except lmdb.Error as e:
            raise StoreError(f"store {self.path}: read failed, the file may be damaged ({type(e).__name__}: {e}); "
                             f"check it with `proalign-engine store verify {self.path}`") from e
        finally:
            txn.abort()

    def _get(self, slide_id: str) -> bytes | None:
        with self.read_txn() as txn:
            return txn.get(slide_id.encode())

    def record(self, slide_id: str, verify: bool = False) -> Record:
        value = self._get(slide_id)
        if value is None:
            raise KeyError(slide_id)
        return decode_record(value, slide_id, verify, store=self.path)

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
        with self.read_txn() as txn:
            keys = [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
        return iter(keys)

    def items(self, verify: bool = False) -> Iterator[tuple[str, Record]]:
        with self.read_txn() as txn:
            for k, v in txn.cursor():
                sid = k.decode()
                yield sid, decode_record(v, sid, verify, store=self.path)

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
                self._grow_map()
            except lmdb.Error as e:
                raise self._write_error(e, f"slide {slide_id!r}") from e

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
                self._grow_map()
            except lmdb.Error as e:
                raise self._write_error(e, f"{len(items)} records") from e

    def _write_error(self, e: lmdb.Error, what: str) -> StoreWriteError:
        """A refused commit, named as a full disk when it is one: LMDB reports a short write of a
        large commit as EIO, so the free space decides too."""
        code = getattr(e, "errno", None)
        try:
            low = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize < (1 << 20)
        except OSError:
            low = False
        full = isinstance(e, lmdb.DiskError) or code in (errno.ENOSPC, errno.EFBIG) or (code == errno.EIO and low)
        why = "the disk is full or the file size limit was reached" if full else "write failed"
        return StoreWriteError(f"store {self.path}: {why} while writing {what} ({e}); records already stored "
                               f"are intact")

    def put_raw_batched(self, items: Iterable[tuple[str, bytes]]) -> int:
        """Store already-encoded records in transactions of at most RAW_BATCH_RECORDS records or
        RAW_BATCH_BYTES bytes (a copy of a large store never holds it all in memory). Returns how
        many were stored."""
        batch, size, n = [], 0, 0
        for sid, value in items:
            batch.append((sid, value))
            size += len(value)
            if len(batch) >= RAW_BATCH_RECORDS or size >= RAW_BATCH_BYTES:
                self.put_raw_many(batch)
                n, batch, size = n + len(batch), [], 0
        if batch:
            self.put_raw_many(batch)
            n += len(batch)
        return n

    def _grow_map(self) -> None:
        size = self.env.info()["map_size"] * 2
        try:
            self.env.set_mapsize(size)
        except lmdb.Error as e:
            raise StoreWriteError(f"store {self.path}: cannot grow the map to {size} bytes ({type(e).__name__}: "
                                  f"{e}); the disk may be full (or a memory / address-space limit was reached); "
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


def hold_reader_lock(path: Path, stack: ExitStack) -> str | None:
    """Share the writer lock of the store at `path` until `stack` closes, so no run starts writing
    it meanwhile; returns the writer's pid (text) instead when a run is writing it now. The lock
    file is opened read-only: nothing in the store's folder is written."""
    lock = Path(path) / LOCK_NAME
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return holder
    stack.callback(os.close, fd)
    return None


def open_store(path: str | os.PathLike, write: bool = False) -> EmbeddingStore:
    """Open an embedding store (read-only unless `write=True`)."""
    return EmbeddingStore(path, write=write)
