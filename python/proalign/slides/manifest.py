"""The slide manifest of an archive: one CSV row per slide file with what opening it tells (size,
format, dimensions, levels, level-0 mpp and where that came from, objective power), built once
with a process pool (metadata only, no pixels) and reused by `embed --manifest`, so a 30,000-slide
archive on network storage is listed and probed once, not on every run.

A slide that does not open is kept, with status `error` and the reason; a second file with an
already-listed slide id (same name in two folders) gets status `duplicate` (the rule is
`duplicate_ids`, shared with `read_slide_manifest` and `embed --archive`).
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ..features.io import FeatureFileEntry

log = logging.getLogger("proalign.manifest")

COLUMNS = ["slide_id", "path", "size_bytes", "format", "width", "height", "levels", "mpp", "mpp_source",
           "objective_power", "magnification", "status", "error"]
# what tells a slides manifest from a features manifest (slide_id,path)
SLIDE_MANIFEST_COLUMNS = {"slide_id", "path", "format", "mpp", "mpp_source", "status"}


@dataclass(frozen=True)
class SlideFileEntry(FeatureFileEntry):
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
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # slide id -> paths not embedded

    @property
    def errors(self) -> dict[str, str]:
        return {r["slide_id"]: r["error"] for r in self.rows if r["status"] == "error"}


def duplicate_ids(items: Sequence[tuple[str, str | Path]]) -> dict[int, str]:
    """The duplicate rule: of the files (slide id, path) sharing a slide id, the first in sorted
    path order keeps it and the others are not embedded. Returns index in `items` -> the reason."""
    first: dict[str, Path] = {}
    out: dict[int, str] = {}
    for i in sorted(range(len(items)), key=lambda i: Path(items[i][1])):
        sid, p = items[i]
        if sid in first:
            out[i] = f"slide id {sid!r} is already taken by {first[sid]}; rename one of the files"
        else:
            first[sid] = Path(p)
    return out


def user_mpp_table(mpp_table: Mapping[str, float] | None, slide_mpp: float | None) -> dict[str, float]:
    """The user's mpp values as `mpp_for` reads them: per file (name or stem, from --mpp-csv) and
    the default for every other slide under "*" (--slide-mpp, when given)."""
    return {**(mpp_table or {}), **({"*": slide_mpp} if slide_mpp is not None else {})}


def mpp_for(table: Mapping[str, float], path: str | Path) -> float | None:
    """The user mpp of a slide file: by file name, then stem (as --mpp-csv lists them), then the
    default under "*" (--slide-mpp); None: the slide's own metadata."""
    p = Path(path)
    return table.get(p.name, table.get(p.stem, table.get("*")))


def level0_magnification(mpp: float | None, objective_power: float | None) -> float | None:
    """The magnification a grid uses for level 0: the standard bucket of the mpp (0.499 um/px ->
    20x), else the metadata's objective power, else None."""
    from .grid import NOMINAL_MAX_MPP, nominal_magnification

    if mpp is not None and mpp < NOMINAL_MAX_MPP:
        return float(nominal_magnification(mpp))
    return objective_power


def _probe(job: tuple) -> dict:
    """One slide's manifest row (runs in a pool process): open_slide reads only the TIFF directory
    or OpenSlide's header; no tile is decoded. job: (slide id, path, user mpp[, custom mpp keys])."""
    from ..errors import ProAlignError
    from .slide import open_slide

    slide_id, path, mpp = job[:3]
    keys = tuple(job[3]) if len(job) > 3 else ()
    row = dict.fromkeys(COLUMNS, "")
    row.update(slide_id=slide_id, path=path, status="ok")
    try:
        row["size_bytes"] = os.stat(path).st_size
        slide = open_slide(path, mpp=mpp, threads=1, mpp_keys=keys)
        try:  # reading the metadata of an opened slide can fail too
            i = slide.info
            mag = level0_magnification(i.mpp, i.objective_power)
            found = {"format": i.format, "width": i.levels[0][0], "height": i.levels[0][1],
                     "levels": len(i.levels), "mpp": repr(i.mpp) if i.mpp else "", "mpp_source": i.mpp_source,
                     "objective_power": repr(i.objective_power) if i.objective_power else "",
                     "magnification": f"{mag:g}" if mag else ""}
        finally:
            slide.close()
    except ProAlignError as e:
        row.update(status="error", error=getattr(e, "problem", str(e)))
        return row
    except Exception as e:  # a reader that let something else through: still only this slide's problem
        row.update(status="error", error=f"{type(e).__name__}: {e}")
        return row
    row.update(found)
    return row


def _crashed(job) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(slide_id=job[0], path=job[1], status="error",
               error="the process reading its metadata crashed (e.g. a segfault in OpenSlide)")
    return row


def _probe_all(jobs: list[tuple[str, str, float | None]], workers: int, probe: Callable = _probe,
               progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Probe every slide; rows in the jobs' order. One future per slide, at most two per process
    queued, so a pool process that crashes (a native reader's segfault) breaks the pool with few
    slides in flight: only those are probed again, one at a time in a process of their own (to find
    the culprit), and the rest go on in a fresh pool."""
    out: dict[int, dict] = {}

    def done(i: int, row: dict) -> None:
        out[i] = row
        if progress is not None:
            progress(len(out), len(jobs))

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            done(i, probe(job))
        return [out[i] for i in range(len(jobs))]
    ctx = get_context("forkserver")  # never fork this process (threads, open files)
    todo = deque(range(len(jobs)))
    while todo:
        suspects: list[int] = []
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            running: dict[Future, int] = {}
            broken = False
            while running or (todo and not broken):
                while todo and not broken and len(running) < 2 * workers:
                    try:
                        running[pool.submit(probe, jobs[todo[0]])] = todo[0]
                        todo.popleft()
                    except BrokenProcessPool:
                        broken = True
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                if broken or any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                    broken = True
                    finished = list(running)  # the pool is gone: each slide it held gets its answer now
                for f in finished:
                    i = running.pop(f)
                    if isinstance(f.exception(), BrokenProcessPool):
                        suspects.append(i)
                    else:
                        done(i, f.result())
        if suspects:
            log.warning("a metadata reader crashed; probing the %d slide(s) in flight one at a time",
                        len(suspects))
            _probe_alone(sorted(suspects), jobs, probe, ctx, done)
    return [out[i] for i in range(len(jobs))]


def _probe_alone(indices: list[int], jobs: list, probe: Callable, ctx, done: Callable[[int, dict], None]) -> None:
    """Probe each slide alone in a one-process pool (a new process only after a crash)."""
    pool = None
    try:
        for i in indices:
            if pool is None:
                pool = ProcessPoolExecutor(1, mp_context=ctx)
            try:
                done(i, pool.submit(probe, jobs[i]).result())
            except BrokenProcessPool:
                done(i, _crashed(jobs[i]))
                pool.shutdown()
                pool = None
    finally:
        if pool is not None:
            pool.shutdown()


def build_manifest(archive: str | Path | None = None, out: str | Path | None = None, *,
                   paths: Sequence[str | Path] | None = None, slide_mpp: float | None = None,
                   mpp_table: dict[str, float] | None = None, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   mpp_keys: Sequence[str] = ()) -> list[dict]:
    """One row per slide file under `archive` (or of `paths`), written as CSV to `out` when given
    (once, at the end: a temporary file renamed); returns the rows. The mpp rule is `embed
    --archive`'s (`mpp_for`): `mpp_table` (file name or stem -> mpp, as from --mpp-csv) first, then
    `slide_mpp` for every slide, else the slide's own, else the first of `mpp_keys` (custom
    property names, --custom-mpp-keys) that holds one; `mpp_source` says which (user, metadata,
    key:<property>, none); `magnification` is the level-0 magnification grids use (the mpp's
    standard bucket). `progress(done, total)` is called as slides are probed."""
    from .patching import list_slide_files

    if paths is None:
        if archive is None:
            raise ValueError("give an archive folder or a list of slide paths")
        paths = list_slide_files(archive)
    table = user_mpp_table(mpp_table, slide_mpp)
    files = [Path(p).absolute() for p in paths]
    dup = duplicate_ids([(p.stem, p) for p in files])
    keys = tuple(mpp_keys or ())
    jobs = [(p.stem, str(p), mpp_for(table, p), *((keys,) if keys else ())) for n, p in enumerate(files)
            if n not in dup]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    rows = _probe_all(jobs, workers, progress=progress)
    for pos in sorted(dup):  # keep the listing order; a duplicate is listed with its reason
        p = files[pos]
        row = dict.fromkeys(COLUMNS, "")
        row.update(slide_id=p.stem, path=str(p), status="duplicate", error=dup[pos])
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
    are opened as they are; an mpp found under a custom key (mpp_source key:<property>) is reused
    like a user one; `slide_mpp` / `mpp_table` fill only slides that have none (mpp_source none). Rows with status error are kept (tried again: quarantined with their reason if still
    bad); rows with status duplicate, and any further file with a listed slide id (`duplicate_ids`:
    the first in sorted path order is kept), are left out and returned in `duplicates` (pass them
    on to run_archive/embed_archive, which report them). Relative paths are taken from the
    manifest's folder."""
    mpath = Path(path)
    with open(mpath, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.strip() for c in reader.fieldnames or []}
        if not SLIDE_MANIFEST_COLUMNS <= cols:
            raise ValueError(f"{mpath} is not a slide manifest: lacks column(s) "
                             f"{sorted(SLIDE_MANIFEST_COLUMNS - cols)} (build one with `proalign-engine manifest`)")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    table = user_mpp_table(mpp_table, slide_mpp)
    listed: list[tuple[int, str, Path]] = []  # (line, slide id, path) of the rows not marked duplicate
    skipped: list[tuple[str, Path]] = []  # (slide id, path) not embedded
    for n, r in enumerate(rows, start=2):
        sid, p = r["slide_id"], r["path"]
        if not sid or not p:
            raise ValueError(f"{mpath} line {n}: empty slide_id or path")
        full = Path(p) if Path(p).is_absolute() else mpath.parent / p
        if r["status"] == "duplicate":
            skipped.append((sid, full))
        else:
            listed.append((n, sid, full))
    dup = duplicate_ids([(sid, full) for _, sid, full in listed])
    entries: list[SlideFileEntry] = []
    for k, (n, sid, full) in enumerate(listed):
        if k in dup:
            skipped.append((sid, full))
            continue
        r, where = rows[n - 2], f"{mpath} line {n}"
        size = _number(r["size_bytes"], "size_bytes", where, int) if r.get("size_bytes") else None
        mpp = None
        if r["mpp_source"] == "user" or r["mpp_source"].startswith("key:"):
            mpp = _number(r["mpp"], "mpp", where)
        elif r["mpp_source"] in ("", "none"):
            mpp = mpp_for(table, full)
        entries.append(SlideFileEntry(sid, full, size_bytes=size, mpp=mpp))
    duplicates: dict[str, list[str]] = {}
    for sid, full in skipped:
        duplicates.setdefault(sid, []).append(str(full))
    return SlideManifest(entries, rows, duplicates)
