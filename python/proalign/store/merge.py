"""`store merge OUT SHARD...`: join the stores of a sharded run (one per node) into one.

Checks first, then writes, so a refused merge leaves OUT as it was (a new OUT is not created):
- every shard is read in full and every record's checksum verified (a damaged record stops it);
- all records (and those already in OUT) must have been embedded with the same options and
  prototype set (their `options`: method, tau, over, dtype, prototype hash): otherwise an error
  naming the shards and the options that differ;
- a slide in several shards (or already in OUT) with the identical embedding and N is stored
  once; with a different embedding or N it is an error naming the slide and the shards.
Records are copied byte for byte (provenance kept), in transactions of a few thousand, so a
merge that is killed can be rerun: what it already copied counts as an identical duplicate.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import StoreError
from ..report_file import write_report
from .lmdb_store import decode_record, hold_reader_lock, normalise_options, open_store, option_diff


class StoreMergeError(StoreError):
    """Shards that cannot be joined: options differ, a slide conflicts, a record is damaged."""


@dataclass
class MergeReport:
    out: str
    shards: list[str]
    added: int = 0
    already_in_out: int = 0
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # id -> stores holding the same record
    per_shard: dict[str, int] = field(default_factory=dict)
    options: dict | None = None
    seconds: float = 0.0
    report_path: str | None = None

    def summary(self) -> str:
        return (f"{self.added} records added from {len(self.shards)} shard(s) ({self.already_in_out} already in "
                f"{self.out}, {len(self.duplicates)} identical duplicate(s) stored once) in {self.seconds:.1f} s")


@dataclass
class _Seen:
    source: int  # index into the list of sources (0 = OUT itself when it has records)
    crc: int
    n_patches: int
    dtype: str
    shape: tuple


def _describe_options(o) -> str:
    return json.dumps(o, sort_keys=True) if o is not None else "(no options recorded)"


def _value_diff(a, b) -> str:
    """Why two records of one slide differ, with what their provenance says about it."""
    d = float(np.max(np.abs(a.embedding.astype(np.float64) - b.embedding.astype(np.float64))))
    how = []
    for label, get in (("backend", lambda m: m.get("backend")),
                       ("threads per worker", lambda m: (m.get("worker") or {}).get("threads")),
                       ("feature file", lambda m: (m.get("feature_source") or {}).get("path"))):
        va, vb = get(a.meta), get(b.meta)
        if va != vb:
            how.append(f"{label} {va} vs {vb}")
    hint = f" (the records differ in {', '.join(how)})" if how else ""
    return f"different embedding values (max |difference| {d:.3g}){hint}"


def _scan(name: str, store, idx: int, sources: list, seen: dict, options: dict, dup: dict, conflicts: list) -> int:
    """Verify every record of one source; note its options and compare duplicates."""
    count = 0
    with store.read_txn() as txn:
        for k, v in txn.cursor():
            sid = k.decode("utf-8", "replace")
            try:
                rec = decode_record(v, sid, verify=True, store=name)  # the error names the shard
            except StoreError as e:
                raise StoreMergeError(f"{e}; repair or re-embed that slide before merging") from e
            o = normalise_options(rec.meta.get("options"), rec.meta.get("slide_options"))
            options.setdefault(json.dumps(o, sort_keys=True), (o, idx, sid))
            count += 1
            body = rec.embedding.tobytes()
            info = _Seen(idx, zlib.crc32(body), rec.n_patches, rec.embedding.dtype.str, tuple(rec.embedding.shape))
            prev = seen.get(sid)
            if prev is None:
                seen[sid] = info
                continue
            pname, pstore = sources[prev.source]
            same = (prev.crc, prev.n_patches, prev.dtype, prev.shape) == (info.crc, info.n_patches, info.dtype,
                                                                        info.shape)
            if same:  # the checksums match: confirm byte for byte
                same = pstore.record(sid).embedding.tobytes() == body
            if not same:
                what = (f"N {prev.n_patches} vs {info.n_patches}" if prev.n_patches != info.n_patches
                        else f"shape {prev.shape} vs {info.shape}" if prev.shape != info.shape
                        else f"dtype {prev.dtype} vs {info.dtype}" if prev.dtype != info.dtype
                        else _value_diff(pstore.record(sid), rec))
                conflicts.append(f"slide {sid!r} is in {pname} and {name} with {what}")
                continue
            dup.setdefault(sid, [pname]).append(name)
    return count


def merge_stores(out: str | os.PathLike, shards: Sequence[str | os.PathLike],
                 report_path: str | os.PathLike | None = None) -> MergeReport:
    """Join `shards` into the store at `out` (created if missing); see the module docstring."""
    t0 = time.perf_counter()
    out = Path(out)
    paths: list[Path] = []
    for s in shards:  # the same store named twice is read once (two handles on one env break its locks)
        p = Path(s)
        if p.resolve() not in {q.resolve() for q in paths}:
            paths.append(p)
    if not paths:
        raise StoreMergeError("give at least one shard to merge")
    for p in paths:
        if not (p / "data.mdb").exists():
            raise StoreMergeError(f"no store at {p} (data.mdb not found)")
        if p.resolve() == out.resolve():
            raise StoreMergeError(f"{p} is the output store itself; merge into a new or another store")
    report = MergeReport(str(out), [str(p) for p in paths])
    with ExitStack() as stack:
        # An existing OUT is opened (and its writer lock held, so nobody writes it meanwhile) and
        # checked with the shards; a new OUT is created only once the checks have passed.
        dest = stack.enter_context(open_store(out, write=True)) if (out / "data.mdb").exists() else None
        sources: list[tuple[str, object]] = [(str(out), dest)] if dest is not None and len(dest) else []
        for p in paths:
            holder = hold_reader_lock(p, stack)
            if holder:
                raise StoreMergeError(f"shard {p} is still being written (pid {holder}); merge it when that run "
                                      f"has finished")
        sources += [(str(p), stack.enter_context(open_store(p))) for p in paths]
        seen: dict[str, _Seen] = {}
        options: dict = {}
        conflicts: list[str] = []
        for i, (name, store) in enumerate(sources):
            n = _scan(name, store, i, sources, seen, options, report.duplicates, conflicts)
            if store is dest:
                report.already_in_out = n
            else:
                report.per_shard[name] = n
        if len(options) > 1:
            vals = list(options.values())
            (oa, ia, sa), (ob, ib, sb) = vals[0], vals[1]
            raise StoreMergeError(
                f"the stores were embedded with different options or prototype sets and cannot be merged: "
                f"{sources[ia][0]} (e.g. slide {sa!r}) has {_describe_options(oa)}, {sources[ib][0]} (e.g. slide "
                f"{sb!r}) has {_describe_options(ob)} [{option_diff(oa, ob)}]"
                + (f" ({len(vals)} different option sets in all)" if len(vals) > 2 else ""))
        if conflicts:
            more = f" (and {len(conflicts) - 20} more)" if len(conflicts) > 20 else ""
            raise StoreMergeError("conflicting records for the same slide: " + "; ".join(conflicts[:20]) + more)
        report.options = next(iter(options.values()))[0] if options else None
        if dest is None:
            dest = stack.enter_context(open_store(out, write=True))
            if len(dest):  # another process created OUT while we checked: its records were not compared
                raise StoreMergeError(f"{out} was created by another process during the merge; run the merge again")
        # copy each slide from the first source that has it; what OUT holds stays
        for i, (name, store) in enumerate(sources):
            if store is dest:
                continue
            with store.read_txn() as txn:
                ours = ((sid, v) for sid, v in ((k.decode("utf-8", "replace"), v) for k, v in txn.cursor())
                        if seen[sid].source == i)
                report.added += dest.put_raw_batched(ours)
    report.seconds = time.perf_counter() - t0
    if report_path is None:
        report_path = out / "reports" / f"merge-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.json"
    report.report_path = str(write_report(report_path, asdict(report)))
    return report
