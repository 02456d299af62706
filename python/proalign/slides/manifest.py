"""The slide manifest of an archive: one CSV row per slide file with what opening it tells (size,
format, dimensions, levels, level-0 mpp and where that came from, objective power), built once
with a process pool (metadata only, no pixels) and reused by `embed --manifest`, so a 30,000-slide
archive on network storage is listed and probed once, not on every run.

A slide that does not open is kept, with status `error` and the reason; a second file with an
already-listed slide id (same name in two folders) gets status `duplicate`.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..features.io import SlideEntry

log = logging.getLogger("proalign.manifest")

COLUMNS = ["slide_id", "path", "size_bytes", "format", "width", "height", "levels", "mpp", "mpp_source",
           "objective_power", "status", "error"]
# what tells a slides manifest from a features manifest (slide_id,path)
SLIDE_MANIFEST_COLUMNS = {"slide_id", "path", "format", "mpp", "mpp_source", "status"}


@dataclass(frozen=True)
class SlideFileEntry(SlideEntry):
    """A slide file for the slides path's worker, with what the manifest recorded (optional):
    `size_bytes` orders the queue without a stat; `mpp` is a user-supplied level-0 mpp (None: the
    slide's own metadata); `source` is the original file when `path` is a local cached copy."""

    size_bytes: int | None = None
    mpp: float | None = None
    source: Path | None = None


@dataclass
class SlideManifest:
    entries: list[SlideFileEntry]  # status ok, plus error rows (tried again: the file may be fixed)
    rows: list[dict]  # every row as read
    duplicates: dict[str, str] = field(default_factory=dict)  # path -> reason (not embedded)

    @property
    def errors(self) -> dict[str, str]:
        return {r["slide_id"]: r["error"] for r in self.rows if r["status"] == "error"}


def _probe(job: tuple[str, str, float | None]) -> dict:
    """One slide's manifest row (runs in a pool process): open_slide reads only the TIFF directory
    or OpenSlide's header; no tile is decoded."""
    from ..errors import ProAlignError
    from .slide import open_slide

    slide_id, path, mpp = job
    row = dict.fromkeys(COLUMNS, "")
    row.update(slide_id=slide_id, path=path, status="ok")
    try:
        row["size_bytes"] = os.stat(path).st_size
        slide = open_slide(path, mpp=mpp, threads=1)
    except ProAlignError as e:
        row.update(status="error", error=getattr(e, "problem", str(e)))
        return row
    except Exception as e:  # a reader that let something else through: still only this slide's problem
        row.update(status="error", error=f"{type(e).__name__}: {e}")
        return row
    try:
        i = slide.info
        row.update(format=i.format, width=i.levels[0][0], height=i.levels[0][1], levels=len(i.levels),
                   mpp=repr(i.mpp) if i.mpp else "", mpp_source=i.mpp_source,
                   objective_power=repr(i.objective_power) if i.objective_power else "")
    finally:
        slide.close()
    return row


def _crashed(job) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(slide_id=job[0], path=job[1], status="error",
               error="the process reading its metadata crashed (e.g. a segfault in OpenSlide)")
    return row


def _probe_all(jobs: list[tuple[str, str, float | None]], workers: int, probe: Callable = _probe) -> list[dict]:
    """Probe every slide, in order. A pool process that crashes (a native reader's segfault) breaks
    the pool: the slides not yet probed are then done one at a time, so only the culprit fails."""
    if workers <= 1 or len(jobs) <= 1:
        return [probe(j) for j in jobs]
    ctx = get_context("forkserver")  # never fork this process (threads, open files)
    out: dict[int, dict] = {}
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        try:
            for i, row in enumerate(pool.map(probe, jobs, chunksize=chunk)):
                out[i] = row
        except BrokenProcessPool:
            log.warning("a metadata reader crashed; probing the remaining slides one at a time")
    for i, job in enumerate(jobs):
        if i in out:
            continue
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                out[i] = pool.submit(probe, job).result()
            except BrokenProcessPool:
                out[i] = _crashed(job)
    return [out[i] for i in range(len(jobs))]


def build_manifest(archive: str | Path | None = None, out: str | Path | None = None, *,
                   paths: Sequence[str | Path] | None = None, slide_mpp: float | None = None,
                   mpp_table: dict[str, float] | None = None, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per slide file under `archive` (or of `paths`), written as CSV to `out` (atomically)
    when given; returns the rows. The mpp rule is `embed --archive`'s: `mpp_table` (file name or
    stem -> mpp, as from --mpp-csv) first, then `slide_mpp` for every slide, else the slide's own;
    `mpp_source` says which (user, metadata, none)."""
    from .patching import list_slide_files

    if paths is None:
        if archive is None:
            raise ValueError("give an archive folder or a list of slide paths")
        paths = list_slide_files(archive)
    table = mpp_table or {}
    files = [Path(p).absolute() for p in paths]
    seen: dict[str, Path] = {}
    jobs, dup = [], {}
    for p in files:
        sid = p.stem
        if sid in seen:
            dup[len(jobs) + len(dup)] = (sid, p, seen[sid])
            continue
        seen[sid] = p
        jobs.append((sid, str(p), table.get(p.name, table.get(p.stem, slide_mpp))))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    rows = _probe_all(jobs, workers)
    for pos in sorted(dup):  # keep the listing order; a duplicate is listed with its reason
        sid, p, first = dup[pos]
        row = dict.fromkeys(COLUMNS, "")
        row.update(slide_id=sid, path=str(p), status="duplicate",
                   error=f"slide id {sid!r} is already taken by {first}; rename one of the files")
        try:
            row["size_bytes"] = p.stat().st_size
        except OSError:
            pass
        rows.insert(pos, row)
    if out is not None:
        write_manifest(rows, out)
    return rows


def write_manifest(rows: Iterable[dict], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)


def is_slide_manifest(path: str | Path) -> bool:
    """True for a manifest written by build_manifest (by its columns), False for a features
    manifest (slide_id,path)."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return SLIDE_MANIFEST_COLUMNS <= {h.strip() for h in header}


def _number(text: str, what: str, where: str, kind=float):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {text!r} is not a number") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{where}: {what} {text!r} is not finite")
    return v


def read_slide_manifest(path: str | Path, *, slide_mpp: float | None = None,
                        mpp_table: dict[str, float] | None = None) -> SlideManifest:
    """The slides of a manifest as entries for the slides path. The recorded mpp is reused:
    user-supplied ones (mpp_source user) ride on the entry; slides with their own metadata mpp
    are opened as they are; `slide_mpp` / `mpp_table` fill only slides that have none (mpp_source
    none). Rows with status error are kept (tried again: quarantined with their reason if still
    bad); duplicates are left out and returned. Relative paths are taken from the manifest's folder."""
    mpath = Path(path)
    with open(mpath, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.strip() for c in reader.fieldnames or []}
        if not SLIDE_MANIFEST_COLUMNS <= cols:
            raise ValueError(f"{mpath} is not a slide manifest: lacks column(s) "
                             f"{sorted(SLIDE_MANIFEST_COLUMNS - cols)} (build one with `proalign-engine manifest`)")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    table = mpp_table or {}
    entries: list[SlideFileEntry] = []
    dups: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n, r in enumerate(rows, start=2):
        where = f"{mpath} line {n}"
        sid, p = r["slide_id"], r["path"]
        if not sid or not p:
            raise ValueError(f"{where}: empty slide_id or path")
        if r["status"] == "duplicate":
            dups[p] = r.get("error") or "duplicate slide id"
            continue
        if sid in seen:
            raise ValueError(f"{where}: slide id {sid!r} appears twice ({seen[sid]} and {p})")
        seen[sid] = p
        full = Path(p) if Path(p).is_absolute() else mpath.parent / p
        size = _number(r["size_bytes"], "size_bytes", where, int) if r.get("size_bytes") else None
        mpp = None
        if r["mpp_source"] == "user":
            mpp = _number(r["mpp"], "mpp", where)
        elif r["mpp_source"] in ("", "none"):
            mpp = table.get(full.name, table.get(full.stem, slide_mpp))
        entries.append(SlideFileEntry(sid, full, size_bytes=size, mpp=mpp))
    return SlideManifest(entries, rows, dups)
