"""`aggregate`: one slide's patch features -> its slide embedding, by any method and backend.

Each method is defined once in torch: ProAlign and PANTHER with their fused ops
(`ops/proalign_attention/`, `ops/panther_moments/`), the others in `reference.py`. Backends are looked up in `BACKENDS`;
`backend=None` picks the fastest live one for the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..defaults import DEFAULT_PROALIGN, default_prior
from ..ops import panther_moments, proalign_attention, runtime
from ..ops.panther_moments import reference as panther_reference
from ..ops.proalign_attention import reference as proalign_reference
from . import reference

METHODS = ("proalign", "panther", "h2t", "protocount", "mean")
FUSED_METHODS = ("proalign", "panther")  # the methods with fused kernels (one pass over X)


def embedding_length(method: str, k: int, d: int, moments: int = 1) -> int:
    """Length of one slide embedding (per tau for proalign)."""
    return {"proalign": k + moments * k * d, "panther": k + 2 * k * d, "h2t": k * d, "protocount": k, "mean": d}[method]


@dataclass(frozen=True)
class Backend:
    name: str
    methods: tuple[str, ...]
    available: Callable[[], str | None]  # None when live, else the reason it is not
    run: Callable[..., torch.Tensor]
    device: str | None = None  # "cpu" / "cuda": the inputs it takes; None: any
    ragged: bool = False  # takes a whole batch of slides in one launch (lengths=...)
    auto: bool = True  # picked by backend=None (False: only when named, e.g. the Triton interpreter)
    fused: bool = False  # fused kernels take every option but space=joint (keys/queries)

    def supports(self, method: str, x: torch.Tensor, options: dict) -> bool:
        if method not in self.methods or (self.device and x.device.type != self.device):
            return False
        return not self.fused or (options.get("keys") is None and options.get("queries") is None)


def _torch_run(method: str, x: torch.Tensor, c: torch.Tensor, taus: Sequence[float], **opts) -> torch.Tensor:
    # float64 on the CPU (the reference); float32 on a GPU, where float64 is slow.
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x, c = x.to(dtype), c.to(device=x.device, dtype=dtype)
    opts = {k: v.to(device=x.device, dtype=dtype) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    if method == "proalign":
        return proalign_reference.proalign(x, c, taus, **opts)
    if method == "panther":
        return panther_reference.panther(x, c, **opts)
    return getattr(reference, method)(x, c, **opts)


def _fused_runner(backend: str):
    # The whole (ragged) batch in one call: x holds the slides one after another.
    def run(method: str, x: torch.Tensor, c: torch.Tensor, taus: Sequence[float], lengths=None, **opts):
        one = lengths is None
        lengths = torch.tensor([x.shape[0]]) if one else lengths
        if method == "proalign":
            out = proalign_attention.run(backend, x, lengths, c, taus, **opts)
        else:
            out = panther_moments.run(backend, x, lengths, c, **opts)
        return out[0] if one else out
    return run


# In order of preference: the first live backend that supports a call runs it.
BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", FUSED_METHODS, runtime.triton_unavailable, _fused_runner("triton"),
                      device=runtime.TRITON_DEVICE, fused=True, auto=not runtime.TRITON_INTERPRET, ragged=True),
    "cuda": Backend("cuda", FUSED_METHODS, runtime.cuda_unavailable, _fused_runner("cuda"), device="cuda",
                    fused=True, ragged=True),
    "numba": Backend("numba", FUSED_METHODS, runtime.numba_unavailable, _fused_runner("numba"), device="cpu",
                     fused=True, ragged=True),
    "torch": Backend("torch", METHODS, lambda: None, _torch_run),
}


def live_backends(method: str = "proalign") -> list[str]:
    return [b.name for b in BACKENDS.values() if method in b.methods and b.available() is None]


def resolve_backend(method: str, backend: str | None, x: torch.Tensor | None = None,
                    options: dict | None = None) -> Backend:
    """The named backend (checked), or the first live one that supports this call."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    x = torch.empty(0, 1) if x is None else x
    options = options or {}
    if backend is None:
        return next(b for b in BACKENDS.values()
                    if b.auto and b.supports(method, x, options) and b.available() is None)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    b = BACKENDS[backend]
    if not b.supports(method, x, options):
        raise ValueError(f"backend {backend!r} does not support method {method!r} with these options on "
                         f"{x.device.type} inputs (fused backends: space=visual only)")
    why_not = b.available()
    if why_not:
        raise RuntimeError(f"backend {backend!r} is not available: {why_not}")
    return b


def with_defaults(method: str, tau, options: dict):
    """(tau, options) with the default reading's value for every ProAlign option not given (the
    prior only with over=prototypes; one number, or a list with one per tau), checked. Other
    methods: unchanged."""
    if method != "proalign":
        return (0.1 if tau is None else tau), options
    tau = DEFAULT_PROALIGN["tau"] if tau is None else tau
    taus = [tau] if isinstance(tau, (int, float)) else list(tau)
    full = {k: v for k, v in DEFAULT_PROALIGN.items() if k not in ("tau", "prior")}
    full.update(options)
    if full.get("prior") is None:
        full["prior"] = default_prior(full["over"], taus)
    proalign_reference.check_options(**{k: full[k] for k in ("over", "moments", "prior")})
    full["prior"] = proalign_reference.compact_prior(full["prior"], len(taus))  # one per row, or one number
    return tau, full


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def aggregate(
    x,
    prototypes,
    method: str = "proalign",
    tau: float | Sequence[float] | None = None,
    backend: str | None = None,
    **options,
):
    """Slide embedding of patch features `x` (N, d) with `prototypes` (K, d).

    proalign returns [pi (K), h_1 (d), ..., h_K (d)] (+ [v_1, ..., v_K] with moments=2); with a
    sequence of taus, one such row per tau (T, K + moments*K*d) computed in one pass. Options for
    proalign (ops/proalign_attention/reference.py): over="patches"|"prototypes", moments=1|2, prior (pseudo-patches
    per prototype, over=prototypes), keys/queries (space=joint: projected patches and text
    prototypes); tau and options not given are the default reading's (proalign.defaults).
    panther: eps, prior_strength, em_steps. Returns numpy (float32) for numpy input, else a
    float32 tensor on x's device.
    """
    is_numpy = not isinstance(x, torch.Tensor)
    xt, ct = _as_tensor(x), _as_tensor(prototypes)
    if xt.ndim != 2 or ct.ndim != 2:
        raise ValueError(f"x must be (N, d) and prototypes (K, d); got {tuple(xt.shape)} and {tuple(ct.shape)}")
    if xt.shape[0] == 0:
        raise ValueError("x has zero patches")
    if xt.shape[1] != ct.shape[1]:
        raise ValueError(f"feature dim {xt.shape[1]} does not match prototype dim {ct.shape[1]}")
    if not xt.is_floating_point() or not ct.is_floating_point():
        raise TypeError("x and prototypes must be floating point")
    tau, options = with_defaults(method, tau, options)
    several = not isinstance(tau, (int, float))
    taus = [float(t) for t in (tau if several else [tau])]
    if method == "proalign" and (not taus or min(taus) <= 0):
        raise ValueError(f"tau must be > 0, got {taus}")
    options = {k: _as_tensor(v) if k in ("keys", "queries") and v is not None else v for k, v in options.items()}
    out = resolve_backend(method, backend, xt, options).run(method, xt, ct, taus, **options).float()
    if not (several and method == "proalign"):
        out = out[0]
    return out.cpu().numpy() if is_numpy else out


def aggregate_batch(xs: Sequence, prototypes, method: str = "proalign", tau: float | Sequence[float] | None = None,
                    backend: str | None = None, **options) -> list:
    """`aggregate` for a batch of slides of different N. The fused backends (numba, Triton, CUDA
    C++) embed the whole batch in one call (one launch per pass); the torch reference goes slide
    by slide. Returns one embedding per slide."""
    if not xs:
        return []
    xt = [_as_tensor(x) for x in xs]
    tau, options = with_defaults(method, tau, options)
    b = resolve_backend(method, backend, xt[0], options)
    if not b.ragged:
        return [aggregate(x, prototypes, method, tau, b.name, **options) for x in xs]
    dims = {x.shape[1] for x in xt}
    if len(dims) != 1 or any(x.ndim != 2 or x.shape[0] == 0 for x in xt):
        raise ValueError("every slide must be (N>0, d) with the same d")
    several = not isinstance(tau, (int, float))
    taus = [float(t) for t in (tau if several else [tau])]
    lengths = torch.tensor([x.shape[0] for x in xt])
    out = b.run(method, torch.cat(xt), _as_tensor(prototypes), taus, lengths=lengths, **options).float()
    out = out if (several and method == "proalign") else out[:, 0]
    return [o.cpu().numpy() if not isinstance(x, torch.Tensor) else o for o, x in zip(out, xs)]
