"""Exports of a store: one `.npy` matrix (+ ids), a parquet table, or TRIDENT-style
`slide_features` `.h5` files (one per slide)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .lmdb_store import EmbeddingStore, decode_record

FORMATS = ("npy", "parquet", "h5")

def export_npy(store: EmbeddingStore, out: Path) -> list[Path]:
    """`out` (n_slides, ...) float32 in store order, and `<out stem>.ids.txt`, one id per line."""
    ids, rows = [], []
    for sid, rec in store.items():
        ids.append(sid)
        rows.append(rec.embedding.astype(np.float32))
    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"records have different shapes {sorted(shapes)}; export them to parquet instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.stack(rows) if rows else np.zeros((0,), np.float32))
    ids_path = out.with_suffix(".ids.txt")
    ids_path.write_text("".join(f"{i}\n" for i in ids))
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
    pq.write_table(table, out)
    return [out]

def export_h5(store: EmbeddingStore, out: Path) -> list[Path]:
    """TRIDENT `slide_features` layout: `<out>/<slide_id>.h5` with dataset `features` (the
    embedding, float32; 1-D (length,) for one tau) with `name`/`savetodir` attributes as TRIDENT
    writes them, plus our provenance."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sid, rec in store.items():
        path = out / f"{sid}.h5"
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("features", data=rec.embedding.astype(np.float32))
            ds.attrs["name"] = sid
            ds.attrs["savetodir"] = str(out)
            ds.attrs["n_patches"] = rec.n_patches
            ds.attrs["method"] = rec.meta.get("method") or ""
            ds.attrs["encoder"] = rec.meta.get("encoder") or ""
            ds.attrs["meta"] = json.dumps(rec.meta, sort_keys=True)
        written.append(path)
    return written

def export_store(store: EmbeddingStore, fmt: str, out: str | Path) -> list[Path]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    return {"npy": export_npy, "parquet": export_parquet, "h5": export_h5}[fmt](store, Path(out))

def verify_store(store: EmbeddingStore) -> dict[str, str]:
    """Check every record (header, size, checksum, finite values); returns id -> problem."""
    problems: dict[str, str] = {}
    with store.env.begin(buffers=False) as txn:
        for k, v in txn.cursor():
            sid = k.decode(errors="replace")
            try:
                rec = decode_record(v, sid, verify=True)
                if not np.isfinite(rec.embedding.astype(np.float32)).all():
                    problems[sid] = "embedding contains NaN or inf"
            except Exception as e:  # a broken record must be reported, whatever broke it
                problems[sid] = str(e)
    return problems
