"""Benchmark of the features path: slides/s and peak RSS for a generated archive.

    python -m proalign.bench.features [--slides 2000] [--d 512] [--k 16]

Embeds the first 10 slides and then the whole archive, each in a fresh process, and prints
both peak RSS figures and their ratio: streaming means the ratio stays near 1 (peak memory
follows the largest slide, not the archive). Then times reading the files' `features` with h5py
against the one-pass reader of row-chunked datasets (same arrays required).
"""
from __future__ import annotations

import argparse
import json
import resource
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
    """The `features` datasets of `paths` read by h5py (chunk by chunk) and by the one-pass reader
    (features/h5_chunks.py), alternating per file; both must give the same array."""
    import h5py

    from ..features.h5_chunks import read_row_chunked

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
            raise SystemExit(f"{p}: the one-pass reader does not apply or differs from h5py")
        rows += len(ref)
    return {"files": len(paths), "rows": rows, "h5py_us_per_row": 1e6 * t_h5py / rows,
            "one_pass_us_per_row": 1e6 * t_fast / rows, "speedup": t_h5py / t_fast}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--min-patches", type=int, default=500)
    ap.add_argument("--max-patches", type=int, default=8000)
    ap.add_argument("--method", default="proalign")
    ap.add_argument("--workdir", default=None, help="Where to generate the archive (default: a temp dir).")
    ap.add_argument("--child", nargs=4, metavar=("FEATURES", "PROTOTYPES", "STORE", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        f, p, s, limit = args.child
        _child(Path(f), Path(p), Path(s), int(limit), args.method)
        return 0

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
        out = subprocess.run([sys.executable, "-m", "proalign.bench.features", "--method", args.method, "--child",
                              str(feats), str(protos), str(work / f"store-{limit}.lmdb"), str(limit)],
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
          f"{r['h5py_us_per_row']:.2f} us/row, one-pass reader {r['one_pass_us_per_row']:.2f} us/row = "
          f"{r['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
