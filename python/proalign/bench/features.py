"""Benchmark of the features path: slides/s and peak RSS for a generated archive.

    python -m proalign.bench.features [--slides 2000] [--d 512] [--k 16]
    python -m proalign.bench.features --read-speed [--files 40] [--warm-reps 3]

Embeds the first 10 slides and then the whole archive, each in a fresh process, and prints
both peak RSS figures and their ratio: streaming means the ratio stays near 1 (peak memory
follows the largest slide, not the archive). Then times reading the files' `features` with h5py
against the fast reader of row-chunked datasets (same arrays required).

`--read-speed` times, on generated sets of TRIDENT/CLAM-style `.h5` files (made once under
--workdir and reused), reading each file: as plain bytes (`open(path, 'rb',
buffering=0).readall()`, and `os.preadv` of 1 MiB at a time into one reused buffer); with our
reader, as features/io.py reads (`h5_chunks.prefetch`, `h5py.File`, `h5_chunks.read_row_chunked`
on `features` and `coords`), with and without numba; and with h5py (`ds[()]` on both). Readers
alternate per file; a warm page cache (every file read before) and a cold one (the file's pages
dropped with `os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)` before each read). MB/s counts
the whole file's bytes for every reader; the target is ours >= 0.5 x plain.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(features: Path, prototypes: Path, store: Path, limit: int, method: str) -> None:
    from ..features import list_feature_files
    from ..pipeline import EmbedOptions, embed_features

    entries = list_feature_files(features=features)[:limit]
    t0 = time.perf_counter()
    rep = embed_features(entries, prototypes, store, EmbedOptions(method=method), progress=False)
    dt = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"slides": len(rep.done), "failed": len(rep.failed), "seconds": dt,
                      "slides_per_s": len(rep.done) / dt, "patches_per_s": rep.patches / dt, "peak_rss_mb": peak_mb,
                      "timing": rep.timing}))


def compare_readers(paths: list[Path]) -> dict:
    """The `features` datasets of `paths` read by h5py (chunk by chunk) and by the fast reader
    (features/h5_chunks.py), alternating per file; both must give the same array."""
    import h5py

    from ..features.h5_chunks import read_row_chunked

    with h5py.File(paths[0], "r") as f:
        read_row_chunked(f["features"])  # load (or compile) the numba half before timing
    rows, t_h5py, t_fast = 0, 0.0, 0.0
    for p in paths:
        with h5py.File(p, "r") as f:
            t0 = time.perf_counter()
            ref = f["features"][()]
            t_h5py += time.perf_counter() - t0
        with h5py.File(p, "r") as f:
            t0 = time.perf_counter()
            fast = read_row_chunked(f["features"])
            t_fast += time.perf_counter() - t0
        if fast is None or not np.array_equal(ref, fast):
            raise SystemExit(f"{p}: the fast reader does not apply or differs from h5py")
        rows += len(ref)
    return {"files": len(paths), "rows": rows, "h5py_us_per_row": 1e6 * t_h5py / rows,
            "fast_us_per_row": 1e6 * t_fast / rows, "speedup": t_h5py / t_fast}


# ---------------------------------------------------------------------------------------------
# --read-speed: whole files, plain bytes vs our reader vs h5py, warm and cold page cache

READ_SETS = {  # name: (format, d, dtype, patches per file)
    "trident-d512-fp16": ("trident", 512, "float16", (500, 8000)),
    "trident-d1024-fp32": ("trident", 1024, "float32", (2000, 8000)),
    "clam-d1024-fp32": ("clam", 1024, "float32", (2000, 8000)),
}


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_plain(path: Path):
    with open(path, "rb", buffering=0) as fh:
        return fh.readall()


_LOOP_BUF = bytearray(1 << 20)


def _read_plain_loop(path: Path):
    """os.preadv of 1 MiB at a time into one reused buffer: the kernel's copy alone (keeps nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        at = 0
        while n := os.preadv(fd, [_LOOP_BUF], at):
            at += n
    finally:
        os.close(fd)


def _read_ours(path: Path, compiled: bool | None = None):
    import h5py

    from ..features.h5_chunks import prefetch, read_row_chunked

    prefetch(path)  # as features/io.py does before opening
    with h5py.File(path, "r") as f:
        out = tuple(read_row_chunked(f[name], compiled=compiled) for name in ("features", "coords"))
    if out[0] is None or out[1] is None:
        raise SystemExit(f"{path}: the fast reader refused it")
    return out


def _read_h5py(path: Path):
    import h5py

    with h5py.File(path, "r") as f:
        return f["features"][()], f["coords"][()]


def read_speed(paths: list[Path], warm_reps: int = 3, numpy_path: bool = True) -> dict:
    """Seconds and MB/s per reader over `paths`, warm and cold; readers alternate per file (the
    order rotating), and ours must equal h5py's arrays."""
    from ..features.h5_chunks import compiled_unavailable

    readers = {"plain": _read_plain, "pread-1MiB": _read_plain_loop, "ours": _read_ours}
    if numpy_path and compiled_unavailable() is None:
        readers["ours-numpy"] = lambda p: _read_ours(p, compiled=False)
    readers["h5py"] = _read_h5py
    names = list(readers)
    total = sum(p.stat().st_size for p in paths)
    for p in paths:  # warm every file, compile, and check ours == h5py
        _read_plain(p)
        for got, ref in zip(_read_ours(p), _read_h5py(p)):
            if got.dtype != ref.dtype or not np.array_equal(got, ref):
                raise SystemExit(f"{p}: the fast reader differs from h5py")
    res = {}
    modes = (("warm", warm_reps), ("cold", 1)) if hasattr(os, "posix_fadvise") else (("warm", warm_reps),)
    for mode, reps in modes:
        secs = {n: [] for n in names}
        for r in range(reps):
            t = dict.fromkeys(names, 0.0)
            for i, p in enumerate(paths):
                for k in range(len(names)):
                    n = names[(i + r + k) % len(names)]
                    if mode == "cold":
                        _drop_cache(p)
                    t0 = time.perf_counter()
                    readers[n](p)
                    t[n] += time.perf_counter() - t0
            for n in names:
                secs[n].append(t[n])
        res[mode] = {n: {"seconds": float(np.median(v)), "mb_per_s": total / 1e6 / float(np.median(v))}
                     for n, v in secs.items()}
        res[mode]["ours_over_plain"] = res[mode]["ours"]["mb_per_s"] / res[mode]["plain"]["mb_per_s"]
    res["files"], res["mb"] = len(paths), total / 1e6
    return res


def _read_speed_main(args) -> int:
    import h5py

    from ..features.h5_chunks import chunk_index, compiled_unavailable
    from ..testing.synthetic_features import write_cohort

    work = Path(args.workdir or tempfile.mkdtemp(prefix="proalign-readspeed-"))
    print(f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}; compiled reader: "
          f"{compiled_unavailable() or 'numba'}; {os.cpu_count()} CPUs; files under {work}")
    print("warm: every file read once before; cold: the file's pages dropped from the page cache with "
          "os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) before each read")
    print("MB/s = the whole file's bytes / time, for every reader (ours and h5py read `features` and "
          f"`coords`); median of {args.warm_reps} warm passes, one cold pass; plain = open(path, 'rb', "
          "buffering=0).readall(), pread-1MiB = os.preadv of 1 MiB at a time into one reused buffer; "
          "ours-numpy = our reader without numba")
    for name in args.sets.split(","):
        fmt, d, dtype, n_range = READ_SETS[name]
        folder = work / name
        paths = sorted(folder.glob("*.h5"))[:args.files]
        if len(paths) < args.files:
            paths = write_cohort(folder, n_slides=args.files, d=d, n_range=n_range, seed=1, fmt=fmt, dtype=dtype)
        with h5py.File(paths[0], "r") as f:
            lister = chunk_index(f["features"]).source
        r = read_speed(paths, args.warm_reps)
        print(f"\n{name}: {r['files']} files, {r['mb']:.0f} MB ({n_range[0]}-{n_range[1]} rows of {d} {dtype}, "
              f"one-row chunks, {fmt} layout; chunk lister: {lister})")
        names = [n for n in r["warm"] if n != "ours_over_plain"]
        print(f"  {'':4s} " + "".join(f"{n:>20s}" for n in names) + "  ours/plain  ours/pread-1MiB")
        for mode in ("warm", "cold")[:len(r) - 2]:
            row = "".join(f"{r[mode][n]['mb_per_s']:8.0f} MB/s {1e3 * r[mode][n]['seconds'] / r['files']:5.1f}ms"
                          for n in names)
            loop = r[mode]["ours"]["mb_per_s"] / r[mode]["pread-1MiB"]["mb_per_s"]
            print(f"  {mode:4s} {row}  {r[mode]['ours_over_plain']:10.2f}  {loop:14.2f}")
        print("  (ms: per file)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--min-patches", type=int, default=500)
    ap.add_argument("--max-patches", type=int, default=8000)
    ap.add_argument("--method", default="proalign")
    ap.add_argument("--workdir", default=None, help="Where to generate the archive (default: a temp dir).")
    ap.add_argument("--read-speed", action="store_true",
                    help="Only time reading whole files: plain bytes vs our reader vs h5py, warm and cold.")
    ap.add_argument("--files", type=int, default=40, help="--read-speed: files per set.")
    ap.add_argument("--warm-reps", type=int, default=3, help="--read-speed: warm passes (median).")
    ap.add_argument("--sets", default=",".join(READ_SETS), help="--read-speed: comma-separated sets.")
    ap.add_argument("--child", nargs=4, metavar=("FEATURES", "PROTOTYPES", "STORE", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        f, p, s, limit = args.child
        _child(Path(f), Path(p), Path(s), int(limit), args.method)
        return 0
    if args.read_speed:
        return _read_speed_main(args)

    from ..prototypes.io import save_prototypes
    from ..testing.synthetic_features import write_cohort

    work = Path(args.workdir or tempfile.mkdtemp(prefix="proalign-bench-"))
    feats = work / "features"
    t0 = time.perf_counter()
    write_cohort(feats, n_slides=args.slides, d=args.d, n_range=(args.min_patches, args.max_patches), seed=0,
                 dtype="float16")
    print(f"generated {args.slides} slides ({args.min_patches}-{args.max_patches} patches, d={args.d}, float16) "
          f"in {time.perf_counter() - t0:.1f} s under {work}")
    protos = work / "prototypes.safetensors"
    save_prototypes(protos, np.random.default_rng(0).standard_normal((args.k, args.d)).astype(np.float32), {})
    results = {}
    for limit in (10, args.slides):
        store = work / f"store-{limit}.lmdb"
        if store.exists():  # a reused --workdir: a new store, not a resume with nothing left to do
            shutil.rmtree(store) if store.is_dir() else store.unlink()
        out = subprocess.run([sys.executable, "-m", "proalign.bench.features", "--method", args.method, "--child",
                              str(feats), str(protos), str(store), str(limit)],
                             capture_output=True, text=True, check=True)
        results[limit] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[limit]
        print(f"{r['slides']:6d} slides: {r['slides_per_s']:8.1f} slides/s  {r['patches_per_s'] / 1e6:6.2f} M patches/s  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MiB  (read {r['timing']['read_s']:.1f} s, aggregate "
              f"{r['timing']['aggregate_s']:.1f} s, write {r['timing']['write_s']:.1f} s)")
    ratio = results[args.slides]["peak_rss_mb"] / results[10]["peak_rss_mb"]
    print(f"peak RSS ratio, {args.slides} slides vs 10 slides: {ratio:.2f}x (streaming: close to 1)")
    r = compare_readers(sorted(feats.glob("*.h5"))[:200])
    print(f"reading `features` of {r['files']} files ({r['rows']:,} one-row chunks): h5py "
          f"{r['h5py_us_per_row']:.2f} us/row, fast reader {r['fast_us_per_row']:.3f} us/row = "
          f"{r['speedup']:.1f}x")
    r = read_speed(sorted(feats.glob("*.h5"))[:100], warm_reps=3, numpy_path=False)
    print(f"whole files (features + coords), 100 files, {r['mb']:.0f} MB: " + "; ".join(
        f"{mode}: plain {r[mode]['plain']['mb_per_s']:.0f} MB/s, ours {r[mode]['ours']['mb_per_s']:.0f}, "
        f"h5py {r[mode]['h5py']['mb_per_s']:.0f} (ours/plain {r[mode]['ours_over_plain']:.2f})"
        for mode in ("warm", "cold")) + " (cold: POSIX_FADV_DONTNEED before each read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
