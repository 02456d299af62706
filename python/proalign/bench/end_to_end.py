"""Benchmark of the whole slides path: slide files -> tissue -> grid -> engine -> decode -> encoder ->
streaming aggregation, against its stages alone and a TRIDENT-style baseline on the same slides.

    python -m proalign.bench.end_to_end [--slides 3] [--size 8000] [--model tiny|base] [--device cpu|cuda]

The encoder is CONCH v1's architecture with random weights (nothing is downloaded): `tiny` (64 px
input, 2 layers) makes the CPU run about the pipeline, `base` is the real ViT-B/16 at 448 px (use it
on a GPU). Prints, measured in one run: slides/hour and patches/s of the whole path; the patch
stage alone (engine + decode, no model) and the encoder alone (preprocess + forward on the same
number of patches already in memory); the per-stage split (tissue + grid, once per slide, is
reported apart from the streaming part); and the baseline: OpenSlide
read_region + PIL resize in a torch DataLoader (2 workers) + the same model in fp32, on the same
grids. Peak host memory (VmHWM) and, on a GPU, peak GPU memory, and the encoder alone with CUDA
graphs against eager at the run's batch size and at 32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _OpenSlidePatches(torch.utils.data.Dataset):
    """TRIDENT-style reader: OpenSlide read_region + PIL resize, one patch per item."""

    def __init__(self, path: str, coords: np.ndarray, level: int, read_size: int, out_size: int):
        self.path, self.coords, self.level, self.read, self.out = path, coords, level, read_size, out_size
        self._os = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        import openslide
        from PIL import Image

        if self._os is None:  # one handle per DataLoader worker
            self._os = openslide.OpenSlide(self.path)
        x, y = (int(v) for v in self.coords[i])
        img = self._os.read_region((x, y), self.level, (self.read, self.read)).convert("RGB")
        return torch.from_numpy(np.asarray(img.resize((self.out, self.out), Image.BILINEAR)))


def _encoder_alone(enc, n: int, batch_size: int, device: str) -> float:
    """Seconds to preprocess + encode `n` patches already on the device (after one warm-up batch)."""
    fake = torch.randint(0, 256, (batch_size, enc.patch_size, enc.patch_size, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        enc.encode_image(enc.preprocess(fake))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            enc.encode_image(enc.preprocess(fake[:b]))
            done += b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--size", type=int, default=8000, help="Side of each generated slide (40x, 0.25 mpp).")
    ap.add_argument("--model", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    from ..slides.patches import iter_patches
    from ..encoders import create_encoder
    from ..testing.random_weights import write_random_conch
    from ..pipeline.embed_slides import SlideOptions, embed_slide
    from ..testing.synthetic_slides import write_aperio_svs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="proalign-bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.slides):
        p = work / f"slide{i}_{args.size}.svs"
        if not p.exists():
            write_aperio_svs(p, args.size, args.size, tissue="dense", seed=100 + i)
        paths.append(p)
    over = write_random_conch(work / f"conch_{args.model}", **({} if args.model == "tiny" else {
        "image_size": 448, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "embed_dim": 512,
        "pooler_heads": 8, "text_width": 768, "text_layers": 12, "text_heads": 12, "context_length": 128}))
    enc = create_encoder("conch_v1", work / f"conch_{args.model}", device=args.device, **over)
    c = np.random.default_rng(0).normal(size=(16, enc.feature_dim)).astype(np.float32)
    opts = SlideOptions(magnification=20, patch_size=enc.patch_size, batch_size=args.batch_size,
                        decoder="auto" if args.device.startswith("cuda") else "cpu")
    print(f"# {args.slides} slides of {args.size}^2 (generated, 40x), {enc!r}, random weights: the "
          f"embeddings mean nothing; device {args.device}, {os.cpu_count()} cores")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    # 1. the whole path
    split = {"grid_s": 0.0, "patches_s": 0.0, "encode_s": 0.0, "aggregate_s": 0.0}
    n_total, t0 = 0, time.perf_counter()
    grids = []
    for p in paths:
        res = embed_slide(p, enc, c, options=opts, device=args.device)
        n_total += res.n_patches
        grids.append(res.grid)
        for k in split:
            split[k] += res.timing[k]
    whole = time.perf_counter() - t0

    # 2. the patch stage alone (engine + decode + resize, no model)
    t0 = time.perf_counter()
    for p, g in zip(paths, grids):
        from ..slides.slide import open_slide
        with open_slide(p) as s:
            for _ in iter_patches(s, g.coords, g.patch_size_level0, g.patch_size, batch_size=args.batch_size,
                                  decoder=opts.decoder):
                pass
    patches_alone = time.perf_counter() - t0

    # 3. the encoder alone, same number of patches already in memory
    encoder_alone = _encoder_alone(enc, n_total, args.batch_size, args.device)
    graphs = {}
    if args.device.startswith("cuda"):  # CUDA graphs vs eager, at the run's batch size and a small one
        genc = create_encoder("conch_v1", work / f"conch_{args.model}", device=args.device, cuda_graphs=True, **over)
        for b in sorted({args.batch_size, 32}):
            eager_s = _encoder_alone(enc, max(n_total, 8 * b), b, args.device)
            graph_s = _encoder_alone(genc, max(n_total, 8 * b), b, args.device)
            graphs[str(b)] = {"eager_patches_per_s": max(n_total, 8 * b) / eager_s,
                              "graphs_patches_per_s": max(n_total, 8 * b) / graph_s, "speedup": eager_s / graph_s}
        del genc

    # 4. TRIDENT-style baseline: OpenSlide + PIL in a DataLoader, the same model in fp32, mean pooling
    base_enc = create_encoder("conch_v1", work / f"conch_{args.model}", device=args.device, dtype=torch.float32,
                              **over)
    t0 = time.perf_counter()
    for p, g in zip(paths, grids):
        ds = _OpenSlidePatches(str(p), g.coords, g.level, g.read_size, g.patch_size)
        dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=2)
        feats = []
        with torch.inference_mode():
            for batch in dl:
                feats.append(base_enc.encode_image(base_enc.preprocess(batch.to(args.device))).float().mean(0))
    baseline = time.perf_counter() - t0

    slowest = max(patches_alone, encoder_alone)
    streamed = whole - split["grid_s"]  # tissue + grid run once per slide before streaming: reported apart
    out = {
        "slides": args.slides, "patches": n_total, "device": args.device, "model": args.model,
        "whole_s": whole, "slides_per_hour": args.slides / whole * 3600, "patches_per_s": n_total / whole,
        "patch_stage_alone_patches_per_s": n_total / patches_alone,
        "encoder_alone_patches_per_s": n_total / encoder_alone,
        "streamed_patches_per_s": n_total / streamed, "streamed_vs_slowest_stage": slowest / streamed,
        "split_s": split, "baseline_s": baseline, "baseline_patches_per_s": n_total / baseline,
        "speedup_vs_baseline": baseline / streamed, "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        "cuda_graphs": graphs,
    }
    print(json.dumps(out))
    print(f"\nwhole path: {out['slides_per_hour']:.0f} slides/h, {out['patches_per_s']:.0f} patches/s "
          f"({n_total} patches)")
    print(f"streaming part (after tissue + grid): {out['streamed_patches_per_s']:.0f} patches/s; patch stage "
          f"alone {out['patch_stage_alone_patches_per_s']:.0f}/s, encoder alone "
          f"{out['encoder_alone_patches_per_s']:.0f}/s: at {100 * out['streamed_vs_slowest_stage']:.0f}% of its "
          f"slowest stage")
    print("split (s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in split.items()))
    print(f"TRIDENT-style baseline (reading + model, same grids): {out['baseline_patches_per_s']:.0f} patches/s; "
          f"ours (streaming part) {out['speedup_vs_baseline']:.2f}x")
    for b, g in graphs.items():
        print(f"encoder alone at batch {b}: eager {g['eager_patches_per_s']:.0f}/s, CUDA graphs "
              f"{g['graphs_patches_per_s']:.0f}/s = {g['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
