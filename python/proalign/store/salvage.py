"""`store salvage DAMAGED --out NEW`: copy every record of a damaged store that reads and passes
its checksum into a new store, byte for byte, and list the slide ids that could not be saved.
Embedding into NEW afterwards redoes exactly the slides that are not there.

DAMAGED is only read: data.mdb is opened read-only and without LMDB's lock file (no lock.mdb is
created), its writer lock, when present, is only shared (a run still writing it is refused).
NEW is built in a temporary folder beside it and renamed into place when complete, so a salvage
that fails or is killed leaves no half-made NEW.

Two ways to read DAMAGED:
- LMDB, when a child process has read every record through it without an error (LMDB can abort
  or die of SIGBUS on a damaged or truncated file, which would take this process with it);
- otherwise a page scan (lmdb_pages.py): every page of data.mdb that reads as a sound leaf page,
  whatever the meta pages or the B-tree above it say. A record may then have several copies:
  LMDB writes changed pages to new places and frees the old ones, so older versions of a page
  stay in the file until reused. Which copy is current:
  * both meta pages sound and the free-page list readable: the copy in the newest snapshot's
    tree; for a slide whose tree page is damaged, a copy in a page neither in the tree nor listed
    as free (a leaf under a damaged branch page); copies only in free pages are not saved (the
    current one is gone and an older version cannot be ruled out);
  * otherwise (a meta page or the free list is damaged): every copy counts and the newest by its
    provenance `time` wins (a tie goes to the tree's copy, else the record is listed), since
    a copy newer than the tree's can only come from a newer snapshot whose meta page is lost. A copy
    outside the tree whose value lies in overflow pages counts only when its provenance names the
    slide (file `<id>.<ext>`): a stale leaf's pointer may lead to pages reused since for another
    record, which passes its own checksum. Records saved from outside the tree are listed in the
    report (`outside_tree`): if one was rewritten and its current copy destroyed, an older version
    may have been saved in its place.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import StoreError
from ..report_file import write_report
from .lmdb_pages import Node, PageFile
from .lmdb_store import MAGIC, EmbeddingStore, decode_record, hold_reader_lock


@dataclass
class SalvageReport:
    damaged: str
    out: str
    method: str = "lmdb"  # lmdb | pages
    why_pages: str | None = None  # why LMDB could not read DAMAGED
    saved: int = 0
    not_saved: dict[str, str] = field(default_factory=dict)  # id -> why
    recorded_entries: int | None = None  # records DAMAGED's (newest sound) meta page counts
    unknown_lost: int = 0  # of those, records whose ids could not be read at all
    outside_tree: list[str] = field(default_factory=list)  # saved where the current copy could not be told
    meta_problems: list[str] = field(default_factory=list)
    tree_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report_path: str | None = None

    @property
    def complete(self) -> bool:
        """Every record saved, as far as the store's own count tells (no count: not known)."""
        return not self.not_saved and not self.unknown_lost and self.recorded_entries is not None

    def summary(self) -> str:
        how = ("read through LMDB" if self.method == "lmdb"
               else f"LMDB could not read it ({self.why_pages}); its pages were scanned")
        s = f"{self.damaged}: {how}. Saved {self.saved} record(s) into {self.out}"
        if self.not_saved:
            s += f"; {len(self.not_saved)} could not be saved (listed)"
        if self.unknown_lost:
            s += (f"; {self.unknown_lost} more of the {self.recorded_entries} records its meta page counts were "
                  "lost with their pages (ids unreadable)")
        if self.recorded_entries is None:
            s += "; no meta page is sound, so how many records the store held is unknown"
        return s + f" in {self.seconds:.1f} s"


# Reads every record through LMDB in a child process (LMDB may abort on a damaged page): exit 0
# when all read, 3 with the reason on stderr when LMDB refused. No lock file (lock=False).
_READ_ALL = """
import os, sys, lmdb
try:
    env = lmdb.open(sys.argv[1], readonly=True, lock=False, subdir=True)
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(os.path.join(sys.argv[1], "data.mdb"))
    if size < need:
        print(f"the file is truncated: {size} bytes, its last page ends at byte {need}", file=sys.stderr)
        sys.exit(3)
    with env.begin() as txn:
        n = sum(1 for _ in txn.cursor())
    if n != env.stat()["entries"]:
        print(f"the tree holds {n} records, its meta page counts {env.stat()['entries']}", file=sys.stderr)
        sys.exit(3)
except lmdb.Error as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
"""


def lmdb_reads_whole(path: Path) -> str | None:
    """None when LMDB reads every record of the store at `path`, else why not."""
    p = subprocess.run([sys.executable, "-c", _READ_ALL, str(path)], capture_output=True, text=True)
    detail = (p.stderr.strip().splitlines() or [""])[-1]
    if p.returncode < 0:
        return f"LMDB died reading it ({signal.Signals(-p.returncode).name}{': ' + detail if detail else ''})"
    if p.returncode != 0:
        return detail or f"exit {p.returncode}"
    return None


def _check(value: bytes, sid: str) -> tuple[str | None, dict]:
    """(why it is no good record, or None; its provenance)."""
    try:
        return None, decode_record(value, sid, verify=True).meta
    except StoreError as e:
        return str(e).removeprefix(f"record {sid!r}: "), {}


def _named(meta: dict) -> frozenset[str]:
    """The slide ids a record's provenance names: the stems of its feature or slide file."""
    return frozenset(Path(src["path"]).stem for src in (meta.get("feature_source"), meta.get("slide"))
                     if isinstance(src, dict) and isinstance(src.get("path"), str))


def _from_lmdb(path: Path, report: SalvageReport) -> Iterator[tuple[str, bytes]]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        report.recorded_entries = env.stat()["entries"]
        with env.begin() as txn:
            for k, v in txn.cursor():
                sid = k.decode("utf-8", "replace")
                why = _check(v, sid)[0]
                if why:
                    report.not_saved[sid] = why
                else:
                    yield sid, v
    finally:
        env.close()


@dataclass
class _Copy:
    node: Node
    digest: bytes  # copies with the same bytes are one version
    time: str  # the record's provenance time ("" when it has none): the newest version wins
    tier: int  # 0 in the newest sound snapshot's tree; 1 in none and not free; 2 free or past the last page


def _choose(copies: list[_Copy], certain: bool) -> tuple[_Copy | None, str]:
    """The current copy of one record (see the module docstring), or None and why not."""
    if certain:  # the tree's copy; else one under a damaged branch page; never a free page's
        pool = [c for c in copies if c.tier == 0] or [c for c in copies if c.tier == 1]
    else:  # a copy newer than the tree's can only come from a newer snapshot whose meta page is lost
        pool = copies
    if not pool:
        return None, ("its current copy is damaged or lost; only copies in pages the store lists as free "
                      "survive, and they may hold an older version")
    versions: dict[bytes, _Copy] = {}
    for c in sorted(pool, key=lambda c: c.tier):  # a version's tree copy stands for it
        versions.setdefault(c.digest, c)
    newest = max(c.time for c in versions.values())
    top = [c for c in versions.values() if c.time == newest]
    if len(top) > 1:  # the same time (or none): the tree's copy settles it
        top = [c for c in top if c.tier == 0]
    if len(top) == 1:
        return top[0], ""
    return None, f"{len(versions)} different versions survive and their provenance does not tell the newest"


def _from_pages(path: Path, report: SalvageReport) -> Iterator[tuple[str, bytes]]:
    with PageFile(path / "data.mdb") as pf:
        report.meta_problems = list(pf.meta_problems)
        authority = pf.metas[0] if pf.metas else None
        tree_leaves: set[int] = set()
        free = None
        if authority is not None:
            report.recorded_entries = authority.main_entries
            walk = pf.walk(authority.main_root)
            tree_leaves = set(walk.leaves)
            report.tree_problems = walk.problems
            free = pf.free_pages(authority)
            if free is None:
                report.tree_problems.append("the free-page list cannot be read whole")
        # both meta pages sound and the free list read: every page is in the tree, free, or under
        # a damaged branch page; otherwise stale copies cannot be told from current ones
        certain = len(pf.metas) == 2 and free is not None
        # (why unusable, digest, time, slides its provenance names) per value: leaf copies share overflow pages
        checked: dict[tuple[int, int], tuple[str | None, bytes, str, frozenset[str]]] = {}
        copies: dict[str, list[_Copy]] = {}
        bad: dict[str, tuple[int, str]] = {}  # id -> (tier, why) of its best-placed unusable copy
        for pgno, nodes in pf.all_leaves():
            tier = 0 if pgno in tree_leaves else 1
            if certain and (pgno in free or pgno > authority.last_pgno):
                tier = 2
            for node in nodes:
                try:
                    sid = node.key.decode("utf-8")
                except UnicodeDecodeError:  # not a slide id (the free-page list's keys, or damage)
                    continue
                where = (node.offset, node.size)
                if where not in checked:
                    value = pf.data(node)
                    why, meta = _check(value, sid) if value[:4] == MAGIC else ("not a record", {})
                    t = meta.get("time")
                    checked[where] = (why, hashlib.blake2b(value, digest_size=16).digest(),
                                      t if isinstance(t, str) else "", _named(meta))
                why, digest, t, named = checked[where]
                if why == "not a record":  # e.g. the free-page list's leaves
                    continue
                if not why and tier == 1 and not certain and node.overflow is not None and sid not in named:
                    # a stale leaf's pointer may lead to overflow pages reused for another record
                    why = ("its copy outside the store's tree points to overflow pages that may hold another "
                           "record (its provenance does not name the slide)")
                if why:
                    if sid not in bad or tier < bad[sid][0]:
                        bad[sid] = (tier, why)
                    continue
                copies.setdefault(sid, []).append(_Copy(node, digest, t, tier))
        for sid in sorted(set(copies) | set(bad)):
            chosen, why = _choose(copies.get(sid, []), certain)
            if chosen is None:
                report.not_saved[sid] = bad[sid][1] if sid in bad and sid not in copies else why
                continue
            value = pf.data(chosen.node)
            if hashlib.blake2b(value, digest_size=16).digest() != chosen.digest:
                report.not_saved[sid] = "it changed while it was read"
                continue
            if chosen.tier != 0 and not certain:
                report.outside_tree.append(sid)
            yield sid, value


def salvage_store(damaged: str | os.PathLike, out: str | os.PathLike, method: str = "auto",
                  report_path: str | os.PathLike | None = None) -> SalvageReport:
    """Copy every sound record of the store at `damaged` into a new store at `out`; see the module
    docstring. `method`: auto (LMDB when it reads the whole file, else the page scan), lmdb, pages."""
    t0 = time.perf_counter()
    damaged, out = Path(damaged), Path(out)
    if method not in ("auto", "lmdb", "pages"):
        raise ValueError(f"unknown method {method!r}; choose auto, lmdb or pages")
    if not (damaged / "data.mdb").is_file():
        raise StoreError(f"no store at {damaged} (data.mdb not found)")
    if out.resolve() == damaged.resolve():
        raise StoreError(f"{out} is the damaged store itself; salvage into a new store")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} already exists and is not an empty folder; salvage into a new store")
    report = SalvageReport(str(damaged), str(out))
    tmp = out.parent / f".{out.name}.salvage-{os.getpid()}"
    with ExitStack() as stack:
        holder = hold_reader_lock(damaged, stack)
        if holder:
            raise StoreError(f"{damaged} is being written by a run (pid {holder}); salvage it when that run has "
                             "finished")
        why = lmdb_reads_whole(damaged) if method == "auto" else None
        if method == "pages" or why:
            report.method, report.why_pages = "pages", why or "page scan asked for"
        records = _from_pages(damaged, report) if report.method == "pages" else _from_lmdb(damaged, report)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with EmbeddingStore(tmp, write=True) as dest:
                report.saved += dest.put_raw_batched(records)
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if report.recorded_entries is not None:
        report.unknown_lost = max(0, report.recorded_entries - report.saved - len(report.not_saved))
    report.seconds = time.perf_counter() - t0
    if report_path is None:
        report_path = out / "reports" / f"salvage-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.report_path = str(write_report(report_path, {**asdict(report), "complete": report.complete}))
    return report
