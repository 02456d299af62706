"""Scale simulation: a 30,000-slide archive through the features path.

    python -m proalign.bench.archive [--slides 30000] [--workers 2] [--distinct 200] [--workdir DIR]
    python -m proalign.bench.archive --slides 2000          # a quick run

Slides get a lognormal patch count (median 5,000, sigma 0.8: the 5th to 95th percentile span
is about 14x, as in real archives), clipped to [100, 60,000]. So as not to write 30,000 x 5 MB of
features, `--distinct` TRIDENT-style `.h5` files are generated, one at each quantile of that
distribution (float16, d=512, one-row chunks as TRIDENT writes them), and a manifest maps the
slide ids onto them evenly: the run sees the archive's N distribution, its number of slides and
records, its queue and its store, while the feature files are read from the page cache (a real
archive on network storage reads slower: see the per-stage times).

Prints slides/s, slides/h, patches/s, the per-stage times of the run report, the store size and
bytes per slide, and the arithmetic for TCGA on N GPUs (see `--encoder-patches-per-s`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TCGA_SLIDES = 30_000  # TCGA: about 11,800 FFPE diagnostic + 18,000 frozen tissue slides


def patch_counts(n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """`n` patch counts at the quantiles (i + 0.5) / n of a clipped lognormal."""
    from scipy.stats import norm

    q = (np.arange(n) + 0.5) / n
    return np.clip(np.round(median * np.exp(sigma * norm.ppf(q))), lo, hi).astype(np.int64)


def generate(work: Path, slides: int, distinct: int, median: float, sigma: float, lo: int, hi: int, d: int,
             seed: int) -> tuple[Path, np.ndarray]:
    """Feature files (one per quantile) and a manifest of `slides` ids over them; returns the
    manifest path and each slide's N."""
    from ..testing.synthetic_features import grid_coords, slide_features, tissue_centres, write_trident_h5

    feats = work / "features"
    feats.mkdir(parents=True, exist_ok=True)
    ns = patch_counts(distinct, median, sigma, lo, hi)
    centres = tissue_centres(16, d, seed)
    for j, n in enumerate(ns):
        p = feats / f"F{j:05d}.h5"
        if not p.exists():
            x = slide_features(int(n), centres, np.random.default_rng([seed, j])).astype(np.float16)
            write_trident_h5(p, x, grid_coords(int(n)))
    # slide i -> file (i * 7919) mod distinct: every file about equally often, in no sorted order
    pick = (np.arange(slides) * 7919) % distinct
    manifest = work / f"manifest-{slides}.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"TCGA-SIM-{i:06d},features/F{j:05d}.h5\n"
                                                     for i, j in enumerate(pick)))
    return manifest, ns[pick]


def store_bytes(store: Path) -> tuple[int, int]:
    """(bytes on disk, apparent size) of the store's data file."""
    st = (store / "data.mdb").stat()
    return st.st_blocks * 512, st.st_size


def tcga_lines(mean_n: float, path_patches_s: float, write_slides_s: float, bytes_per_slide: float,
               encoder_rate: float, gpus: list[int]) -> list[str]:
    p = TCGA_SLIDES * mean_n
    out = [f"TCGA ({TCGA_SLIDES:,} slides x mean {mean_n:,.0f} patches = {p / 1e6:,.0f} M patches):",
           f"  store: {TCGA_SLIDES * bytes_per_slide / 2**30:.2f} GiB; the one LMDB writer alone: "
           f"{TCGA_SLIDES / write_slides_s / 60:.1f} min at {write_slides_s:,.0f} slides/s",
           f"  features path on this machine: {p / path_patches_s / 3600:.1f} h "
           f"(measured {path_patches_s / 1e6:.2f} M patches/s: read + aggregate + write)",
           f"  encoder at {encoder_rate:,.0f} patches/s per GPU (ASSUMED, replace with bench/device_check.sh):"]
    for g in gpus:
        out.append(f"    {g:3d} GPU(s): {p / (g * encoder_rate) / 3600:7.1f} h   "
                   f"({TCGA_SLIDES / (p / (g * encoder_rate)) * 3600:,.0f} slides/h)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=30_000)
    ap.add_argument("--distinct", type=int, default=200, help="Distinct feature files generated.")
    ap.add_argument("--median-patches", type=float, default=5000)
    ap.add_argument("--sigma", type=float, default=0.8, help="Lognormal sigma of N.")
    ap.add_argument("--min-patches", type=int, default=100)
    ap.add_argument("--max-patches", type=int, default=60_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--method", default="proalign")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None,
                    help="Where to generate (default: a temp dir); feature files are reused.")
    ap.add_argument("--encoder-patches-per-s", type=float, default=2000.0,
                    help="Encoder throughput per GPU for the TCGA arithmetic (an assumption until measured).")
    ap.add_argument("--gpus", default="1,4,8,16,32")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    from ..features import list_feature_files
    from ..pipeline import EmbedOptions, run_embedding
    from ..prototypes.io import save_prototypes

    work = Path(args.workdir or tempfile.mkdtemp(prefix="proalign-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest, ns = generate(work, args.slides, args.distinct, args.median_patches, args.sigma, args.min_patches,
                            args.max_patches, args.d, args.seed)
    p5, p50, p95 = np.percentile(ns, [5, 50, 95])
    print(f"archive: {args.slides:,} slides over {args.distinct} distinct float16 files (d={args.d}) under {work}, "
          f"N median {p50:,.0f}, 5%-95% {p5:,.0f}-{p95:,.0f} ({p95 / p5:.0f}x), mean {ns.mean():,.0f}, "
          f"{ns.sum() / 1e6:.1f} M patches; generated in {time.perf_counter() - t0:.1f} s")
    protos = work / "prototypes.safetensors"
    save_prototypes(protos, np.random.default_rng(args.seed).standard_normal((args.k, args.d)).astype(np.float32), {})
    store = work / f"store-{args.slides}-{time.time_ns()}.lmdb"
    entries = list_feature_files(manifest=manifest)
    t0 = time.perf_counter()
    rep = run_embedding(entries, protos, store, EmbedOptions(method=args.method), workers=args.workers,
                        handle_signals=True)
    wall = time.perf_counter() - t0
    on_disk, apparent = store_bytes(store)
    t = rep.timing
    n_done = len(rep.done)
    res = {
        "slides": n_done, "failed": len(rep.failed), "workers": args.workers, "wall_s": wall,
        "slides_per_s": n_done / wall, "slides_per_h": 3600 * n_done / wall, "patches_per_s": rep.patches / wall,
        "stages_s": {k: t[k] for k in ("scan_s", "start_workers_s", "read_s", "aggregate_s", "write_s") if k in t},
        "store_bytes": on_disk, "store_apparent_bytes": apparent, "bytes_per_slide": on_disk / max(n_done, 1),
        "n_median": float(p50), "n_mean": float(ns.mean()),
    }
    if rep.interrupted:
        print(f"stopped by {rep.interrupted} after {n_done:,} of {args.slides:,} slides: "
              f"the numbers below are for those")
    print(f"embedded {n_done:,} slides ({res['failed']} failed) with {args.workers} worker(s) in {wall:.1f} s: "
          f"{res['slides_per_s']:.1f} slides/s = {res['slides_per_h']:,.0f} slides/h, "
          f"{res['patches_per_s'] / 1e6:.2f} M patches/s")
    print("stages (summed over workers): " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in res["stages_s"].items()))
    print(f"store: {on_disk / 2**20:.1f} MiB on disk ({res['bytes_per_slide'] / 1024:.1f} KiB per slide), "
          f"map {apparent / 2**20:.0f} MiB")
    write_rate = n_done / max(t["write_s"], 1e-9)
    res["writer_slides_per_s"] = write_rate
    for line in tcga_lines(float(ns.mean()), max(res["patches_per_s"], 1e-9), write_rate, res["bytes_per_slide"],
                           args.encoder_patches_per_s, [int(g) for g in args.gpus.split(",")]):
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
