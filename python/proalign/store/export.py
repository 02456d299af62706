"""Exports of a store: one `.npy` matrix (+ ids), a parquet table, or TRIDENT-style
`slide_features` `.h5` files (one per slide).

Every output file is written to a temp file in its own folder and renamed over the final name
(os.replace, atomic on one file system), so an export that fails or is killed leaves either the
earlier file or the new complete one, never a partial one (no fsync: a power cut is not covered).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from .lmdb_store import EmbeddingStore, decode_record

FORMATS = ("npy", "parquet", "h5")


def _temp_beside(path: Path) -> Path:
    """A fresh hidden name in `path`'s folder (same file system, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def export_npy(store: EmbeddingStore, out: Path) -> list[Path]:
    """`out` (n_slides, ...) float32 in store order, and `<out stem>.ids.txt`, one id per line.
    `.npy` is added to `out` when missing (as np.save does); the paths written are returned."""
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    ids, rows = [], []
    for sid, rec in store.items():
        ids.append(sid)
        rows.append(rec.embedding.astype(np.float32))
    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"records have different shapes {sorted(shapes)}; export them to parquet instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    ids_path = out.with_suffix(".ids.txt")
    tmp_ids, tmp_arr = _temp_beside(ids_path), _temp_beside(out)
    try:
        tmp_ids.write_text("".join(f"{i}\n" for i in ids))
        with open(tmp_arr, "wb") as f:  # a file object: np.save adds no suffix to it
            np.save(f, np.stack(rows) if rows else np.zeros((0,), np.float32))
        # both complete; ids first, array last, so a finished array always has its ids beside it
        os.replace(tmp_ids, ids_path)
        os.replace(tmp_arr, out)
    except BaseException:
        _discard(tmp_ids, tmp_arr)
        raise
    return [out, ids_path]

def export_parquet(store: EmbeddingStore, out: Path) -> list[Path]:
    """Columns: slide_id, n_patches, shape, embedding (flat list<float32>), meta (JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {"slide_id": [], "n_patches": [], "shape": [], "embedding": [], "meta": []}
    for sid, rec in store.items():
        cols["slide_id"].append(sid)
        cols["n_patches"].append(rec.n_patches)
        cols["shape"].append(list(rec.embedding.shape))
        cols["embedding"].append(rec.embedding.astype(np.float32).ravel())
        cols["meta"].append(json.dumps(rec.meta, sort_keys=True))
    table = pa.table({
        "slide_id": pa.array(cols["slide_id"], pa.string()),
        "n_patches": pa.array(cols["n_patches"], pa.int64()),
        "shape": pa.array(cols["shape"], pa.list_(pa.int32())),
        "embedding": pa.array(cols["embedding"], pa.list_(pa.float32())),
        "meta": pa.array(cols["meta"], pa.string()),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(out)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    except BaseException:
        _discard(tmp)
        raise
    return [out]


def _check_file_name(sid: str) -> None:
    """Slide ids become file names in h5 exports: refuse those that would write elsewhere or fail
    (no silent renaming, so `<id>.h5` always holds slide `<id>`)."""
    if sid in (".", "..") or any(c in sid for c in "/\\\0"):
        raise StoreError(f"slide id {sid!r} cannot be used as a file name (it contains '/', '\\' or NUL, or "
                         f"is '.' or '..'); export to npy or parquet instead, or re-embed it under another id")

def export_h5(store: EmbeddingStore, out: Path) -> list[Path]:
    """TRIDENT `slide_features` layout: `<out>/<slide_id>.h5` with dataset `features` (the
    embedding, float32; 1-D (length,) for one tau) with `name`/`savetodir` attributes as TRIDENT
    writes them, plus our provenance. Slide ids unsafe as file names are refused before anything
    is written."""
    for sid in store:
        _check_file_name(sid)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sid, rec in store.items():
        path = out / f"{sid}.h5"
        tmp = _temp_beside(path)
        try:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("features", data=rec.embedding.astype(np.float32))
                ds.attrs["name"] = sid
                ds.attrs["savetodir"] = str(out)
                ds.attrs["n_patches"] = rec.n_patches
                ds.attrs["method"] = rec.meta.get("method") or ""
                ds.attrs["encoder"] = rec.meta.get("encoder") or ""
                ds.attrs["meta"] = json.dumps(rec.meta, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            _discard(tmp)
            raise
        written.append(path)
    return written

def export_store(store: EmbeddingStore, fmt: str, out: str | Path) -> list[Path]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    return {"npy": export_npy, "parquet": export_parquet, "h5": export_h5}[fmt](store, Path(out))

# Walks every page reachable through the B-tree in a child process: LMDB aborts the process
# (assertion) or raises on a damaged page, and the abort cannot be caught in this process.
_WALK = """
import sys, lmdb
try:
    env = lmdb.open(sys.argv[1], readonly=True, subdir=True, lock=True)
    with env.begin(buffers=True) as txn:
        for k, v in txn.cursor():
            pass
except lmdb.Error as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
"""


def _file_damage(store: EmbeddingStore) -> str | None:
    """Page-level damage of data.mdb (truncation, damaged pages), or None."""
    data = store.path / "data.mdb"
    need = (store.env.info()["last_pgno"] + 1) * store.env.stat()["psize"]
    size = data.stat().st_size
    if size < need:  # reading the missing pages would kill this process with SIGBUS
        return f"the file is truncated: {size} bytes, but its last page ends at byte {need}"
    p = subprocess.run([sys.executable, "-c", _WALK, str(store.path)], capture_output=True, text=True)
    detail = (p.stderr.strip().splitlines() or [""])[-1]
    if p.returncode < 0:
        return f"damaged: LMDB died reading it ({signal.Signals(-p.returncode).name}: {detail})"
    if p.returncode == 3:
        return f"damaged: {detail}"
    if p.returncode != 0:
        raise StoreError(f"{data}: could not check its pages ({detail or f'exit {p.returncode}'})")
    return None


def verify_store(store: EmbeddingStore) -> dict[str, str]:
    """Check the file's pages, then every record (header, size, checksum, finite values).
    Returns id -> problem; damage to the file itself is reported under the path of data.mdb."""
    data = str(store.path / "data.mdb")
    damage = _file_damage(store)
    if damage:
        return {data: damage}
    problems: dict[str, str] = {}
    try:
        with store.read_txn() as txn:
            for k, v in txn.cursor():
                sid = k.decode(errors="replace")
                try:
                    rec = decode_record(v, sid, verify=True)
                    if not np.isfinite(rec.embedding.astype(np.float32)).all():
                        problems[sid] = "embedding contains NaN or inf"
                except Exception as e:  # a broken record must be reported, whatever broke it
                    problems[sid] = str(e)
    except StoreError as e:  # damage met after the walk (e.g. written meanwhile)
        problems[data] = f"damaged: {e.__cause__ or e}"
    return problems
