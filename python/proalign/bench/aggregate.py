"""Benchmark of the aggregation backends against torch eager and the memory limit.

    python -m proalign.bench.aggregate [--method proalign|panther] [--n 100000] [--d 512] [--k 16] [--dtype float32]
        [--tau T ...] [--over patches|prototypes] [--moments 1|2] [--prior P ...]   (default: the default reading)

On one set of inputs, measured in one run: each live backend's time, its speed-up over torch
eager (the reference in the input dtype, unfused), and its share of the memory limit (bytes of
X read once / measured streaming bandwidth: a host read on CPU, a device-to-device copy on GPU).
Each backend is also checked against the float64 reference on the same data.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

from ..aggregate import BACKENDS, aggregate
from ..ops.panther_moments.reference import panther
from ..ops.proalign_attention.reference import proalign
from ..defaults import DEFAULT_PROALIGN, default_prior, default_taus


def _time(fn, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def host_read_bandwidth(nbytes: int = 512 << 20) -> float:
    """Bytes/s of a streaming read of a large array on all cores (numba parallel sum, else numpy)."""
    a = np.ones(nbytes // 4, np.float32)
    try:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def _sum(v):
            s = 0.0
            for i in prange(v.shape[0]):
                s += v[i]
            return s

        fn = lambda: _sum(a)  # noqa: E731
    except ImportError:
        fn = a.sum
    return a.nbytes / _time(fn, 5)


def device_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s moved by a device-to-device copy (read + write)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.nbytes / _time(lambda: b.copy_(a), 10, torch.cuda.synchronize)


def torch_eager(x: torch.Tensor, c: torch.Tensor, taus: list[float], method: str = "proalign", **opts) -> torch.Tensor:
    """The unfused baseline: the reference formulas in float32 (the input upcast)."""
    if method == "panther":
        return panther(x.float(), c.float())
    return proalign(x.float(), c.float(), taus, **opts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="proalign", choices=["proalign", "panther"],
                    help="panther: the fused E-step moments + M-step (default eps and prior strength)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tau", type=float, nargs="+", default=None,
                    help=f"proalign: temperature(s) in one pass [default reading: {default_taus()}]")
    ap.add_argument("--over", default=DEFAULT_PROALIGN["over"], choices=["patches", "prototypes"])
    ap.add_argument("--moments", type=int, default=DEFAULT_PROALIGN["moments"], choices=[1, 2])
    ap.add_argument("--prior", type=float, nargs="+", default=None,
                    help="over=prototypes: one, or one per tau [the default reading's]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="Exit 1 when a backend differs from float64 (rtol 1e-3).")
    args = ap.parse_args(argv)
    taus = args.tau or list(default_taus())
    prior = default_prior(args.over, taus) if args.prior is None else (
        args.prior[0] if len(args.prior) == 1 else args.prior)  # one value: every row
    opts = {"over": args.over, "moments": args.moments, "prior": prior} if args.method == "proalign" else {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    print(f"proalign.bench.aggregate  {args.method}  N={args.n} d={args.d} K={args.k} tau={taus} {opts} {args.dtype}  "
          f"torch {torch.__version__}  {platform.processor() or platform.machine()}  threads={torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(args.n, args.d, generator=gen, dtype=torch.float64) + torch.randn(args.d, generator=gen, dtype=torch.float64)
    c64 = torch.randn(args.k, args.d, generator=gen, dtype=torch.float64)
    dtype = getattr(torch, args.dtype)
    failed = []
    for dev in devices:
        x, c = x64.to(dev, dtype), c64.to(dev, torch.float32)
        want = (panther(x.double(), c.double()) if args.method == "panther" else
                proalign(x.double(), c.double(), taus, **opts)).cpu().numpy()
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        bw = device_copy_bandwidth() if dev == "cuda" else host_read_bandwidth()
        limit_s = x.numel() * x.element_size() / bw
        name = torch.cuda.get_device_name() if dev == "cuda" else "host"
        print(f"\n[{dev}] {name}: streaming bandwidth {bw / 1e9:.1f} GB/s -> memory limit {limit_s * 1e3:.2f} ms "
              f"(X = {x.numel() * x.element_size() / 1e6:.0f} MB read once)")
        t_eager = _time(lambda: torch_eager(x, c, taus, args.method, **opts), args.repeat, sync)
        print(f"  {'torch eager':12s} {t_eager * 1e3:9.2f} ms   1.00x eager   {limit_s / t_eager * 100:5.1f}% of memory limit")
        for b in BACKENDS.values():
            if b.name == "torch" or not b.supports(args.method, x, opts) or b.available() is not None:
                continue
            got = aggregate(x, c, method=args.method, tau=taus, backend=b.name, **opts).cpu().numpy()
            err = float(np.abs(got - want).max())
            if err > 1e-3 * max(1.0, float(np.abs(want).max())):
                failed.append(f"{b.name} on {dev}: max |err| {err:.2e}")
            t = _time(lambda: aggregate(x, c, method=args.method, tau=taus, backend=b.name, **opts), args.repeat, sync)
            print(f"  {b.name:12s} {t * 1e3:9.2f} ms  {t_eager / t:5.2f}x eager   {limit_s / t * 100:5.1f}% of memory "
                  f"limit   max |err| vs float64 {err:.1e}")
    for f in failed:
        print(f"WRONG: {f}")
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
