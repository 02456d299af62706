"""Peak memory of one slide through the whole slides path, small slide vs a 100,000-patch slide.

    python -m proalign.bench.slide_memory [--size 20000] [--patches 100000] [--device cpu|cuda]

One generated dense Aperio SVS (40x) is embedded twice, each run in a fresh process: once with
non-overlapping 256 px patches at 40x (a few thousand patches), once with the overlap that gives
at least `--patches` patches (the same tiles, each still read and decoded once: neighbouring
patches share them through the tile cache). Features are pooled as they stream, so peak host
memory (VmHWM) and peak GPU memory (torch's allocator) should not grow with the patch count:
the benchmark prints both runs and their ratios. The encoder is CONCH v1's architecture with
random weights (`tiny` on the CPU, `base` = ViT-B/16 at 448 px on a GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATCH = 256  # px at 40x: the slide's own level 0, so no level resampling enters the measure


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(slide: str, model_dir: str, overrides: str, overlap: int, device: str, batch_size: int) -> None:
    import numpy as np
    import torch

    from ..encoders import create_encoder
    from ..pipeline.embed_slides import SlideOptions, embed_slide

    enc = create_encoder("conch_v1", model_dir, device=device, **json.loads(overrides))
    c = np.random.default_rng(0).normal(size=(16, enc.feature_dim)).astype(np.float32)
    opts = SlideOptions(magnification=40, patch_size=PATCH, overlap=overlap, batch_size=batch_size,
                        decoder="auto" if device.startswith("cuda") else "cpu")
    rss_before = _vm("VmRSS")  # imports + model: what any slide costs
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None
    t0 = time.perf_counter()
    res = embed_slide(slide, enc, c, options=opts, device=device)
    dt = time.perf_counter() - t0
    print(json.dumps({
        "patches": res.n_patches, "overlap": overlap, "seconds": dt, "patches_per_s": res.n_patches / dt,
        "rss_before_mb": rss_before, "peak_rss_mb": _vm("VmHWM"),
        "gpu_before_mb": gpu_before,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "finite": bool(np.isfinite(res.embedding).all()), "timing": res.timing}))


def _run(args, slide: Path, model_dir: Path, over: dict, overlap: int) -> dict:
    cmd = [sys.executable, "-m", "proalign.bench.slide_memory", "--child", str(slide), str(model_dir),
           json.dumps(over), str(overlap), args.device, str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child run failed (overlap {overlap}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        _child(a[0], a[1], a[2], int(a[3]), a[4], int(a[5]))
        return 0
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="Side of the generated slide (40x, 0.25 mpp).")
    ap.add_argument("--patches", type=int, default=100_000, help="Patches wanted in the large run.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["tiny", "base"], default=None, help="Default: base on cuda, tiny on cpu.")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    model = args.model or ("base" if args.device.startswith("cuda") else "tiny")

    from ..testing.random_weights import write_random_conch
    from ..testing.synthetic_slides import write_aperio_svs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="proalign-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"dense_{args.size}.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        write_aperio_svs(slide, args.size, args.size, tissue="dense", seed=7)
        print(f"# generated {slide.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    model_dir = work / f"conch_{model}"
    over = write_random_conch(model_dir, **({} if model == "tiny" else {
        "image_size": 448, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "embed_dim": 512,
        "pooler_heads": 8, "text_width": 768, "text_layers": 12, "text_heads": 12, "context_length": 128}))

    small = _run(args, slide, model_dir, over, 0)
    # stride s gives about (side / s)^2 patches on dense tissue: pick it from the measured count,
    # one pixel shorter for the patches lost at the edges
    stride = max(1, min(PATCH, math.floor(PATCH * math.sqrt(small["patches"] / args.patches)) - 1))
    large = _run(args, slide, model_dir, over, PATCH - stride)
    out = {"device": args.device, "model": model, "slide": f"{args.size}^2 dense, 40x", "small": small, "large": large,
           "patches_ratio": large["patches"] / small["patches"],
           "peak_rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
           "rss_growth_ratio": (large["peak_rss_mb"] - large["rss_before_mb"])
           / max(1e-9, small["peak_rss_mb"] - small["rss_before_mb"])}
    if args.device.startswith("cuda"):
        out["peak_gpu_ratio"] = large["peak_gpu_mb"] / small["peak_gpu_mb"]
    print(json.dumps(out))
    for name, r in (("small", small), ("large", large)):
        gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MiB" if r["peak_gpu_mb"] is not None else ""
        print(f"{name}: {r['patches']:,} patches (overlap {r['overlap']} px) in {r['seconds']:.0f} s "
              f"({r['patches_per_s']:.0f}/s); host RSS {r['rss_before_mb']:.0f} MiB before the slide, peak "
              f"{r['peak_rss_mb']:.0f} MiB{gpu}")
    line = (f"{out['patches_ratio']:.1f}x the patches: peak host RSS x{out['peak_rss_ratio']:.2f} "
            f"(growth over the loaded model x{out['rss_growth_ratio']:.2f})")
    if "peak_gpu_ratio" in out:
        line += f", peak GPU memory x{out['peak_gpu_ratio']:.2f}"
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
