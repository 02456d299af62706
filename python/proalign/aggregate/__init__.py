"""`aggregate`: one slide's patch features -> its slide embedding, by any method and backend.

The methods are defined once, in `reference.py` (torch). Backends are looked up in `BACKENDS`;
`backend=None` picks the fastest live one for the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import reference

METHODS = ("proalign", "panther", "h2t", "protocount", "mean")


def embedding_length(method: str, k: int, d: int) -> int:
    """Length of one slide embedding (per tau for proalign)."""
    return {"proalign": k + k * d, "panther": k + 2 * k * d, "h2t": k * d, "protocount": k, "mean": d}[method]


@dataclass(frozen=True)
class Backend:
    name: str
    methods: tuple[str, ...]
    available: Callable[[], str | None]  # None when live, else the reason it is not
    run: Callable[..., torch.Tensor]


def _torch_run(method: str, x: torch.Tensor, c: torch.Tensor, taus: Sequence[float], **opts) -> torch.Tensor:
    # float64 on the CPU (the reference); float32 on a GPU, where float64 is slow.
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x, c = x.to(dtype), c.to(device=x.device, dtype=dtype)
    opts = {k: v.to(device=x.device, dtype=dtype) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    if method == "proalign":
        return reference.proalign(x, c, taus, **opts)
    return getattr(reference, method)(x, c, **opts)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", METHODS, lambda: None, _torch_run),
}


def live_backends(method: str = "proalign") -> list[str]:
    return [b.name for b in BACKENDS.values() if method in b.methods and b.available() is None]


def resolve_backend(method: str, backend: str | None) -> Backend:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if backend is None:
        return BACKENDS[live_backends(method)[0]]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    b = BACKENDS[backend]
    if method not in b.methods:
        raise ValueError(f"backend {backend!r} does not implement method {method!r}")
    why_not = b.available()
    if why_not:
        raise RuntimeError(f"backend {backend!r} is not available: {why_not}")
    return b


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def aggregate(
    x,
    prototypes,
    method: str = "proalign",
    tau: float | Sequence[float] = 0.1,
    backend: str | None = None,
    **options,
):
    """Slide embedding of patch features `x` (N, d) with `prototypes` (K, d).

    proalign returns [pi (K), h_1 (d), ..., h_K (d)]; with a sequence of taus, one such row per
    tau (T, K + K*d) computed in one pass. Options for proalign: over="patches"|"prototypes",
    keys/queries (space=joint: projected patches and text prototypes). panther: eps,
    prior_strength, em_steps. Returns numpy (float32) for numpy input, else a float32 tensor on
    x's device.
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
    several = not isinstance(tau, (int, float))
    taus = [float(t) for t in (tau if several else [tau])]
    if method == "proalign" and (not taus or min(taus) <= 0):
        raise ValueError(f"tau must be > 0, got {taus}")
    options = {k: _as_tensor(v) if k in ("keys", "queries") and v is not None else v for k, v in options.items()}
    out = resolve_backend(method, backend).run(method, xt, ct, taus, **options).float()
    if not (several and method == "proalign"):
        out = out[0]
    return out.cpu().numpy() if is_numpy else out
