"""Has a stored record's source file changed since it was embedded?

A record names its source: `feature_source` (features path) or `slide` (slides path), with the
file's path, size (`bytes`), `mtime` and content `fingerprint` (proalign.fingerprint). A source
counts as changed when its size or its fingerprint differs; an mtime that differs alone (a copy,
a `touch`) with the same size and fingerprint is the same content. Records written before
fingerprints were recorded are compared by what they have: size and mtime (slide records: size
only), and the check says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..fingerprint import bytes_fingerprint, describe_change, feature_file_fingerprint

ON_CHANGE = ("redo", "keep", "fail")


@dataclass(frozen=True)
class SourceCheck:
    status: str  # same | changed | missing | unrecorded (the record names no source file)
    path: str | None = None  # the file compared
    detail: str = ""  # what differs, for a person
    legacy: bool = False  # the record has no fingerprint: compared by size (and mtime) only

    @property
    def changed(self) -> bool:
        return self.status in ("changed", "missing")


def recorded_source(meta: dict) -> tuple[str, dict] | None:
    """("features" | "slide", the record's source dict), or None when it names no source file."""
    for kind, key in (("features", "feature_source"), ("slide", "slide")):
        src = meta.get(key)
        if isinstance(src, dict) and src.get("path"):
            return kind, src
    return None


def fingerprint_of(kind: str, path: str | os.PathLike) -> str:
    return feature_file_fingerprint(path) if kind == "features" else bytes_fingerprint(path)


def check_source(meta: dict, path: str | os.PathLike | None = None) -> SourceCheck:
    """Compare the source a record was made from with the file at `path` now (default: the path
    the record names; a run passes the path it would embed, so a moved folder is no change)."""
    rec = recorded_source(meta)
    if rec is None:
        return SourceCheck("unrecorded", detail="the record names no source file")
    kind, src = rec
    path = str(path if path is not None else src["path"])
    try:
        st = os.stat(path)
    except OSError as e:
        return SourceCheck("missing", path, f"{e.strerror or e}")
    if not Path(path).is_file():
        return SourceCheck("missing", path, "not a file")
    old_size, old_mtime, old_fp = src.get("bytes"), src.get("mtime"), src.get("fingerprint")
    what = []
    if old_size is not None and old_size != st.st_size:
        what.append(f"size {old_size:,} -> {st.st_size:,} bytes")
    mtime_differs = old_mtime is not None and int(old_mtime) != int(st.st_mtime)
    if old_fp is None:  # an older record: size and mtime are all it has
        if mtime_differs:
            what.append(f"mtime {int(old_mtime)} -> {int(st.st_mtime)}")
        basis = "size and mtime" if old_mtime is not None else "size"
        note = f"the record has no content fingerprint (an older version wrote it): compared {basis} only"
        return SourceCheck("changed" if what else "same", path, "; ".join([", ".join(what)] * bool(what) + [note]),
                           legacy=True)
    try:  # a few rows or byte ranges, never the whole file
        new_fp = fingerprint_of(kind, path)
    except Exception as e:  # an unreadable file has changed: the redo reports why it fails
        what.append(f"unreadable now ({type(e).__name__}: {e})")
    else:
        if new_fp != old_fp:
            what.append(describe_change(old_fp, new_fp))
    if what and mtime_differs:
        what.append(f"mtime {int(old_mtime)} -> {int(st.st_mtime)}")
    return SourceCheck("changed" if what else "same", path, ", ".join(what))
