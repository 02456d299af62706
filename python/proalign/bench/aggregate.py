"""Benchmark of the aggregation backends against torch eager and the machine's limits.

    python -m proalign.bench.aggregate [--method proalign|panther] [--n 100000] [--d 512] [--k 16] [--dtype float32]
        [--tau T ...] [--over patches|prototypes] [--moments 1|2] [--prior P ...]   (default: the default reading)
    python -m proalign.bench.aggregate --suite cpu-limits [--n 100000] [--d 512] [--k 16] [--repeat 5]

On one set of inputs, measured in one run: each live backend's time, its speed-up over torch
eager (the reference formulas in float32, unfused, the input upcast), and its share of the two
limits of the machine, both measured in the same run:
  - compute: the fused pass's multiply-adds / the fp32 FMA peak, measured as the best rate of a
    large float32 matrix product (torch.mm, all cores; on a GPU, TF32 off). Multiply-adds per
    pass: proalign N K d (1 + moments * T) with T the distinct taus (one similarity GEMM, one
    pooling GEMM per tau and moment), PANTHER 4 N K d per EM step (two dots for the
    log-likelihood, two moments);
  - memory: bytes of X read once / the measured streaming bandwidth (a host read on CPU, a
    device-to-device copy on GPU).
Each backend is also checked against the float64 reference on the same data. Timings are the best
of --repeat rounds, each round timing the peak, the bandwidth, then every configuration's torch
eager and backends one after another (interleaved), so a machine busy with other work for a while
slows all of them alike.

--suite cpu-limits runs the CPU configurations of issue 15 in one run: one tau with over=patches
(the issue's), the default reading, PANTHER, each with float32, float16 and bfloat16 input; for
numba it also times the kernel call alone ("pass"), whose share of the limits it reports.

On a small machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE: with libgomp's
default (spinning) wait, a torch operation's parallel region waits for a worker thread another
process has preempted, and the host step's small torch operations took ~40 ms each there.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..aggregate import BACKENDS, aggregate
from ..defaults import DEFAULT_PROALIGN, default_prior, default_taus
from ..ops.panther_moments.reference import panther
from ..ops.proalign_attention.reference import proalign


def _once(fn, sync=lambda: None) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _time(fn, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    return min(_once(fn, sync) for _ in range(repeat))


def host_read_bandwidth(nbytes: int = 512 << 20):
    """A timer of a streaming read of a large array on all cores (numba parallel sum, else numpy):
    returns (bytes read, fn)."""
    a = np.ones(nbytes // 4, np.float32)
    try:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def _sum(v):
            s = 0.0
            for i in prange(v.shape[0]):
                s += v[i]
            return s

        return a.nbytes, lambda: _sum(a)
    except ImportError:
        return a.nbytes, a.sum


def device_copy_bandwidth(nbytes: int = 1 << 30):
    """A timer of a device-to-device copy: returns (bytes moved, fn)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.nbytes, lambda: b.copy_(a)


def fma_peak(device: str, n: int | None = None):
    """A timer of an n x n x n float32 matrix product (all cores / the GPU, TF32 off): returns
    (multiply-adds, fn)."""
    n = n or (2048 if device == "cpu" else 8192)
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return n ** 3, lambda: torch.mm(a, b)


def fma_count(method: str, n: int, d: int, k: int, taus=(), moments: int = 1, em_steps: int = 1) -> int:
    """Multiply-adds of one fused pass (see the module docstring)."""
    if method == "panther":
        return 4 * n * k * d * em_steps
    return n * k * d * (1 + moments * len(set(float(t) for t in taus)))


def torch_eager(x: torch.Tensor, c: torch.Tensor, taus: list[float], method: str = "proalign", **opts) -> torch.Tensor:
    """The unfused baseline: the reference formulas in float32 (the input upcast)."""
    if method == "panther":
        return panther(x.float(), c.float())
    return proalign(x.float(), c.float(), taus, **opts)


@dataclass
class Config:
    label: str
    method: str
    taus: list = field(default_factory=list)
    opts: dict = field(default_factory=dict)
    dtype: str = "float32"


def numba_pass(cfg: Config, x: torch.Tensor, c: torch.Tensor):
    """A timer of the numba kernel call alone (the fused pass, without the float64 host step that
    merges the work items' partials and finishes the embedding): the kernel's share of the limits."""
    from ..ops.numba_simd import kernel_input
    from ..ops.plans import cpu_items

    arr, fmt = kernel_input(x)
    n, d = arr.shape
    k = c.shape[0]
    start, end, _, _ = cpu_items(np.array([n]))
    if cfg.method == "panther":
        from ..ops.panther_moments import host as panther_host, numba_cpu as panther_numba
        from ..ops.panther_moments.reference import PANTHER_EPS

        m0 = c.double()
        shift = m0.mean(dim=0).float()
        log_pi = torch.full((1, k), -float(np.log(k)), dtype=torch.float64)
        a, b, cst = panther_host.estep_params(m0[None], torch.full_like(m0, PANTHER_EPS)[None], log_pi, shift.double())
        par = np.zeros(len(start), dtype=np.int64)
        args = (shift.numpy(), a.numpy(), b.numpy(), cst.double().numpy(), start, end, par)
        return lambda: panther_numba._moments(arr, fmt, *args)
    from ..ops.proalign_attention import host as attention_host, numba_cpu as attention_numba

    distinct, _ = attention_host.distinct_taus(cfg.taus)
    inv_taus = 1.0 / np.asarray(distinct, dtype=np.float64)
    cn = torch.nn.functional.normalize(c.double(), dim=1).float().numpy()
    shift = attention_host.second_moment_shift(c.double()).numpy()
    second = cfg.opts.get("moments", 1) == 2
    acc_dtype = np.float64 if second else np.float32

    def run():
        acc = np.zeros((len(start), len(distinct), k, d), dtype=acc_dtype)
        acc2 = np.zeros((len(start) if second else 0, len(distinct), k, d), dtype=acc_dtype)
        return attention_numba._partials(arr, fmt, cn, inv_taus, start, end, cfg.opts.get("over") == "prototypes",
                                         shift, second, acc, acc2)
    return run


def _reference(x64, c64, cfg: Config):
    return (panther(x64, c64) if cfg.method == "panther" else proalign(x64, c64, cfg.taus, **cfg.opts)).cpu().numpy()


def run_configs(configs: list[Config], n: int, d: int, k: int, device: str, repeat: int, check: bool,
                backends: list[str] | None = None) -> list[str]:
    """Time every config on `device`, print one table; returns the failures (results off float64 by
    more than rtol 1e-3). Each of the `repeat` rounds times everything once, one after another
    (the peak, the bandwidth, then every config's torch eager and backends); each is reported at
    its best round, so a machine busy with other work for a while slows every timing alike."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, d, generator=gen, dtype=torch.float64) + torch.randn(d, generator=gen, dtype=torch.float64)
    c64 = torch.randn(k, d, generator=gen, dtype=torch.float64)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bw_bytes, bw_fn = device_copy_bandwidth() if device == "cuda" else host_read_bandwidth()
    peak_fmas, peak_fn = fma_peak(device)
    timers = {"bw": bw_fn, "peak": peak_fn}
    failed, rows, inputs = [], [], {}
    for i, cfg in enumerate(configs):
        if cfg.dtype not in inputs:
            inputs[cfg.dtype] = x64.to(device, getattr(torch, cfg.dtype))
        x, c = inputs[cfg.dtype], c64.to(device, torch.float32)
        live = [b for b in BACKENDS.values() if b.name != "torch" and b.supports(cfg.method, x, cfg.opts)
                and b.available() is None and (backends is None or b.name in backends)]
        want = _reference(x.double(), c.double(), cfg)  # the rounded input's own float64 result

        def ours(name, x=x, c=c, cfg=cfg):
            return aggregate(x, c, method=cfg.method, tau=cfg.taus, backend=name, **cfg.opts)
        errs = {}
        for b in live:
            got = ours(b.name).cpu().numpy()
            errs[b.name] = float(np.abs(got - want).max())
            if errs[b.name] > 1e-3 * max(1.0, float(np.abs(want).max())):
                failed.append(f"{cfg.label}, {b.name} on {device}: max |err| {errs[b.name]:.2e}")
        timers[i, "eager"] = lambda x=x, c=c, cfg=cfg: torch_eager(x, c, cfg.taus, cfg.method, **cfg.opts)
        timers.update({(i, b.name): (lambda name=b.name, f=ours: f(name)) for b in live})
        if any(b.name == "numba" for b in live):
            timers[i, "numba pass"] = numba_pass(cfg, x, c)
        rows.append((i, cfg, x.numel() * x.element_size(), errs))
    for fn in timers.values():  # warm-up (numba compiles on its first call)
        fn()
    sync()
    times = {name: float("inf") for name in timers}
    for _ in range(repeat):
        for name, fn in timers.items():
            times[name] = min(times[name], _once(fn, sync))
    best = {"bw": times["bw"], "peak": times["peak"]}
    bw, peak = bw_bytes / best["bw"], peak_fmas / best["peak"]
    name = torch.cuda.get_device_name() if device == "cuda" else f"host, {torch.get_num_threads()} threads"
    print(f"\n[{device}] {name}: fp32 FMA peak {peak / 1e9:.1f} G FMA/s (torch.mm, {round(peak_fmas ** (1 / 3))}^3), "
          f"streaming bandwidth {bw / 1e9:.1f} GB/s; N={n} d={d} K={k}, best of {repeat} interleaved rounds")
    print("  G FMA: multiply-adds of the pass; floor: max(G FMA / peak, bytes of X / bandwidth); time: aggregate() "
          "end to end; pass: the numba kernel call alone (no host step); % peak, % mem: the pass's share of each "
          "limit (GPU backends: end to end)")
    print(f"  {'config':44s} {'G FMA':>6s} {'floor':>8s} {'eager':>9s} {'backend':>8s} {'time':>9s} {'x eager':>7s} "
          f"{'pass':>9s} {'% peak':>6s} {'% mem':>6s}  max |err| vs float64")
    for i, cfg, nbytes, errs in rows:
        fmas = fma_count(cfg.method, n, d, k, cfg.taus, cfg.opts.get("moments", 1))
        floor = max(fmas / peak, nbytes / bw)
        eager = times[i, "eager"]
        for b, err in errs.items():
            t = times[i, b]
            tp = times.get((i, f"{b} pass"), t)
            print(f"  {cfg.label:44s} {fmas / 1e9:6.2f} {floor * 1e3:6.2f}ms {eager * 1e3:7.2f}ms {b:>8s} "
                  f"{t * 1e3:7.2f}ms {eager / t:6.2f}x {tp * 1e3:7.2f}ms {fmas / tp / peak * 100:5.1f}% "
                  f"{nbytes / tp / bw * 100:5.1f}%  {err:.1e}")
        if not errs:
            print(f"  {cfg.label:44s} {fmas / 1e9:6.2f} {floor * 1e3:6.2f}ms {eager * 1e3:7.2f}ms  (no fused backend)")
    return failed


def cpu_limits_suite() -> list[Config]:
    """Issue 15's CPU configurations: the one-tau pass (over=patches), the default reading, PANTHER,
    each with float32, float16 and bfloat16 input."""
    default = {k: v for k, v in DEFAULT_PROALIGN.items() if k != "tau"}
    taus = list(default_taus())
    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        out += [Config(f"proalign tau=0.1 over=patches, {dtype}", "proalign", [0.1],
                       {"over": "patches", "moments": 1, "prior": 0.0}, dtype),
                Config(f"default reading (3 distinct tau), {dtype}", "proalign", taus, dict(default), dtype),
                Config(f"panther (1 EM step), {dtype}", "panther", [], {}, dtype)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu-limits"], default=None,
                    help="cpu-limits: issue 15's CPU configurations in one run (ignores the per-config options)")
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
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    if args.suite:
        configs = cpu_limits_suite()
        devices = ["cpu"] if args.device == "auto" else devices
        head = f"suite {args.suite}"
    else:
        taus = args.tau or list(default_taus())
        prior = default_prior(args.over, taus) if args.prior is None else (
            args.prior[0] if len(args.prior) == 1 else args.prior)  # one value: every row
        opts = {"over": args.over, "moments": args.moments, "prior": prior} if args.method == "proalign" else {}
        configs = [Config(f"{args.method} {args.dtype}", args.method, taus if args.method == "proalign" else [],
                          opts, args.dtype)]
        head = f"{args.method} tau={taus} {opts} {args.dtype}"
    print(f"proalign.bench.aggregate  {head}  N={args.n} d={args.d} K={args.k}  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()}  threads={torch.get_num_threads()}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    failed = []
    for dev in devices:
        failed += run_configs(configs, args.n, args.d, args.k, dev, args.repeat, args.check)
    for f in failed:
        print(f"WRONG: {f}")
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
