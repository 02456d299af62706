"""A local copy of the next slides, made ahead of use: slides on network storage are copied by one
background thread to a local folder, in queue order, at most `ahead` slides ahead of the ones
handed out; a worker reads the local copy, which is deleted once the slide's record is stored
(or kept with keep=True, and reused by a later run when its size and mtime still match).

Each copy is written to a `.part` file and renamed when whole (atomic), after checking the free
space (the slide plus `min_free` must fit) and, afterwards, the copied size. If a copy fails the
slide is read from its original path and the failure is noted (`fallback` in the run report; a
later try whose copy succeeds clears it). Multi-file formats (DICOM series, MRXS, VMS, VMU) are
read in place by design (`in_place`: a count, no warning).

The scheduler calls `plan(next entries)` after each hand-out, `take(entry, timeout)` to get the
entry to submit (its `path` the local copy, its `source` the original; None while the copy is
still being made) and `release(entry)` once the slide is stored or its try failed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger("proalign.embed")

MULTI_FILE_SUFFIXES = {".dcm", ".mrxs", ".vms", ".vmu"}
_PART = ".part-"


class CacheCopyError(OSError):
    """A slide could not be copied to the cache (the worker then reads the original)."""


@dataclass
class _Copy:
    entry: object
    status: str = "queued"  # queued | copying | ready | failed
    local: Path | None = None
    reason: str | None = None
    taken: bool = False  # claimed by take(): no longer counts as ahead


def cache_path(cache_dir: str | Path, slide_id: str, name: str) -> Path:
    """Where a slide's copy goes: a folder per slide (hashed id: any id is a safe name) holding the
    file under its own name, so per-file lookups by name (mpp CSV) still match."""
    key = hashlib.blake2b(slide_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return Path(cache_dir) / key / name


def _in_place(entry) -> bool:
    """A multi-file slide (its other files sit next to it): read from where it is."""
    return Path(entry.path).suffix.lower() in MULTI_FILE_SUFFIXES


def _with_path(entry, local: Path):
    """The entry to hand to the worker: same slide, path = the local copy, source = the original."""
    from ..slides.manifest import SlideFileEntry

    if dataclasses.is_dataclass(entry) and any(f.name == "source" for f in dataclasses.fields(entry)):
        return dataclasses.replace(entry, path=local, source=Path(entry.path))
    return SlideFileEntry(entry.slide_id, local, source=Path(entry.path))


class SlideCache:
    def __init__(self, cache_dir: str | Path, ahead: int = 2, keep: bool = False, min_free: int = 256 << 20):
        if ahead < 0:
            raise ValueError(f"cache ahead must be >= 0, got {ahead}")
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ahead, self.keep, self.min_free = int(ahead), keep, int(min_free)
        self._cv = threading.Condition()
        self._todo: deque[str] = deque()  # slide ids to copy, in queue order
        self._state: dict[str, _Copy] = {}
        self._stop = False
        self.stats = {"copied": 0, "reused": 0, "bytes": 0, "copy_s": 0.0, "wait_s": 0.0, "deleted": 0,
                      "peak_ahead": 0}
        self.fallback: dict[str, str] = {}  # slide id -> why it was read from the original path
        self.in_place: set[str] = set()  # multi-file slides, read from the original path by design
        self._clean_stale_parts()
        self._thread = threading.Thread(target=self._run, name="proalign-slide-cache", daemon=True)
        self._thread.start()

    # -- the scheduler's side (main thread) ------------------------------------------------------
    def plan(self, upcoming: Sequence) -> None:
        """The next slides in queue order: copy the first `ahead` of them (multi-file slides are
        not copied). A planned slide leaves the window only by being taken (the queue's head is
        handed out first), so nothing planned is ever dropped here."""
        with self._cv:
            for e in list(upcoming)[: self.ahead]:
                if e.slide_id not in self._state and not _in_place(e):
                    self._state[e.slide_id] = _Copy(e)
                    self._todo.append(e.slide_id)
            self._note_peak()
            self._cv.notify_all()

    def take(self, entry, timeout: float | None = None):
        """The entry to submit for `entry`: its local copy once made (copied now when it was not
        planned), or `entry` itself when the copy failed, the format is read in place, or the
        cache holds another file under this slide id. None when the copy is not made within
        `timeout` seconds (None: wait until it is): the slide stays claimed; take it again."""
        sid = entry.slide_id
        if _in_place(entry):
            self.in_place.add(sid)
            return entry
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            c = self._state.get(sid)
            if c is not None and Path(c.entry.path) != Path(entry.path):  # never hand out another file's copy
                self.fallback[sid] = f"not cached: the cache holds {c.entry.path} under the same slide id"
                log.warning("%s: reading the original %s (%s)", sid, entry.path, self.fallback[sid])
                return entry
            if c is None:
                c = self._state[sid] = _Copy(entry)
                self._todo.appendleft(sid)
            elif c.status == "queued" and self._todo[0] != sid:
                self._todo.remove(sid)
                self._todo.appendleft(sid)
            c.taken = True
            self._cv.notify_all()
            while c.status in ("queued", "copying"):
                if not self._thread.is_alive():  # nobody will make the copy: read the original
                    c.status, c.reason = "failed", "not cached: the copier thread stopped"
                    break
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0:
                    self.stats["wait_s"] += time.perf_counter() - t0
                    return None
                self._cv.wait(left)
            self.stats["wait_s"] += time.perf_counter() - t0
            if c.status == "ready":
                self.fallback.pop(sid, None)  # an earlier try's failed copy: this one worked
                return _with_path(entry, c.local)
            self.fallback[sid] = c.reason or "copy failed"
            log.warning("%s: reading the original (%s)", sid, self.fallback[sid])
            return entry

    def release(self, entry) -> None:
        """`entry`'s slide is stored (or its try failed): delete its copy unless keeping them."""
        with self._cv:
            c = self._state.get(entry.slide_id)
            if c is None or Path(c.entry.path) != Path(entry.path):
                return  # no copy of this file (read in place, or another file's copy: not ours to delete)
            del self._state[entry.slide_id]
        self._discard(c)

    def close(self) -> None:
        """Stop copying; delete the copies not used (and any partial file) unless keeping them."""
        with self._cv:
            self._stop = True
            self._todo.clear()
            self._cv.notify_all()
        self._thread.join(60)
        with self._cv:
            left, self._state = list(self._state.values()), {}
        for c in left:
            self._discard(c)
        self._clean_stale_parts()

    def summary(self) -> dict:
        return {"dir": str(self.dir), "ahead": self.ahead, "keep": self.keep, **self.stats,
                "in_place": len(self.in_place), "fallback": dict(self.fallback)}

    # -- the copier thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._todo and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                c = self._state[self._todo.popleft()]
                c.status = "copying"
            t0 = time.perf_counter()
            try:  # everything about this copy: a failure fails the copy, never the thread
                local, reused = self._copy(c.entry)
                size = local.stat().st_size
                status, reason = "ready", None
            except Exception as e:  # noqa: BLE001 - any failure: the worker reads the original
                local, reused, size, status, reason = None, False, 0, "failed", (
                    str(e) if isinstance(e, CacheCopyError) else f"cache copy failed: {type(e).__name__}: {e}")
            with self._cv:
                c.local, c.status, c.reason = local, status, reason
                if status == "ready":
                    self.stats["reused" if reused else "copied"] += 1
                    if not reused:
                        self.stats["bytes"] += size
                        self.stats["copy_s"] += time.perf_counter() - t0
                self._note_peak()
                self._cv.notify_all()

    def _copy(self, entry) -> tuple[Path, bool]:
        src = Path(entry.path)
        st = src.stat()
        dest = cache_path(self.dir, entry.slide_id, src.name)
        try:
            d = dest.stat()
            if dest.is_file() and d.st_size == st.st_size and int(d.st_mtime) == int(st.st_mtime):
                return dest, True  # a kept copy of the same file
        except OSError:
            pass
        free = shutil.disk_usage(self.dir).free  # before the slide's folder exists: no empty folder left
        if st.st_size + self.min_free > free:
            raise CacheCopyError(f"not cached: {free / 2**30:.2f} GiB free in {self.dir}, the slide needs "
                                 f"{st.st_size / 2**30:.2f} GiB plus {self.min_free / 2**30:.2f} GiB kept free")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}{_PART}{os.getpid()}")
        try:
            with open(src, "rb") as fi, open(part, "wb") as fo:
                while chunk := fi.read(8 << 20):
                    if self._stop:
                        raise CacheCopyError("not cached: the run is stopping")
                    fo.write(chunk)
            got = part.stat().st_size
            if got != st.st_size:
                raise CacheCopyError(f"cache copy is {got} bytes, the slide {st.st_size} (changed or truncated "
                                     "while copying)")
            os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            try:
                dest.parent.rmdir()  # the slide's folder, when empty
            except OSError:
                pass
            raise
        return dest, False

    # -- helpers -------------------------------------------------------------------------------
    def _note_peak(self) -> None:
        ahead = sum(1 for c in self._state.values() if not c.taken and c.status in ("copying", "ready"))
        self.stats["peak_ahead"] = max(self.stats["peak_ahead"], ahead)

    def _discard(self, c: _Copy) -> None:
        if c.local is None or self.keep:
            return
        try:
            c.local.unlink()
            self.stats["deleted"] += 1
        except OSError:
            pass
        try:
            c.local.parent.rmdir()  # the slide's folder, when empty
        except OSError:
            pass

    def _clean_stale_parts(self) -> None:
        """Partial copies left by a run that was killed (its pid is gone) or by this one."""
        for p in self.dir.glob(f"*/.*{_PART}*"):
            try:
                pid = int(p.name.rsplit(_PART, 1)[1])
            except ValueError:
                continue
            if pid == os.getpid() or not Path(f"/proc/{pid}").exists():
                p.unlink(missing_ok=True)
