"""Host side of the ProAlign attention op, shared by its fused backends (numba, Triton, CUDA C++):
plan the programs of a ragged batch (`plans`), merge the per-program online-softmax partials of
each slide with torch segment ops (a fixed number of launches for the whole batch, no per-slide
loop), and turn the merged sums into embeddings (the same float64 formulas as reference.proalign).

A kernel returns, per program (or numba work item) p, tau t and prototype k: m (running max of
s/tau; 0 for over=prototypes, which needs no rescaling), l (sum of weights), pi (sum of the
per-patch softmax over prototypes), acc (sum of weight * x) and, for moments=2, acc2 (sum of
weight * (x - shift)^2 around a fixed shift, see `second_moment_shift`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..plans import gpu_programs, padded_k
from .reference import row_priors


def second_moment_shift(prototypes: torch.Tensor) -> torch.Tensor:
    """The fixed centre second moments are summed around, float32 (d,): the prototypes' mean. Sums
    of (x - shift)^2 lose far less to cancellation than sums of x^2 with a large common offset."""
    return prototypes.double().mean(dim=0).float()


def combine(prog_slide, m, l, pi, acc, acc2, n_slides: int):
    """Merge program partials per slide in float64: (pi sum, weight sum, acc, acc2 or None) per slide."""
    idx = prog_slide.long()
    m, l, pi = m.double(), l.double(), pi.double()
    t, kp = m.shape[1], m.shape[2]
    big_m = torch.full((n_slides, t, kp), float("-inf"), dtype=m.dtype, device=m.device).scatter_reduce_(
        0, idx[:, None, None].expand_as(m), m, "amax")
    scale = torch.exp(m - big_m[idx])
    scale = torch.where(torch.isfinite(m), scale, torch.zeros_like(scale))  # programs with no rows

    def seg(v):
        return torch.zeros((n_slides,) + v.shape[1:], dtype=torch.float64, device=m.device).index_add_(0, idx, v)
    pi_sum, denom = seg(pi), seg(l * scale)
    s1 = seg(acc.double() * scale[..., None])
    s2 = seg(acc2.double() * scale[..., None]) if acc2 is not None else None
    return pi_sum, denom, s1, s2


def distinct_taus(taus: Sequence[float]) -> tuple[list[float], list[int]]:
    """(each tau once, the distinct tau of each row): a tau that repeats with another prior (the
    default reading's sharpest) is computed once and finished twice."""
    distinct = list(dict.fromkeys(float(t) for t in taus))
    return distinct, [distinct.index(float(t)) for t in taus]


def rows_of(sums: tuple, rows: Sequence[int]) -> tuple:
    """Merged sums per distinct tau -> per embedding row."""
    return tuple(None if v is None else v[:, list(rows)] for v in sums)


def finish(pi_sum, denom, s1, s2, lengths, prototypes, shift, over: str,
           prior: float | Sequence[float]) -> torch.Tensor:
    """Merged sums (S, T, K[, d]) -> (S, T, K + moments*K*d) float64 embeddings; `prior` one
    number or one per row."""
    n_slides, t, k = pi_sum.shape
    c = prototypes.to(s1.device, torch.float64)
    rho = torch.tensor(row_priors(prior, t) if over == "prototypes" else (0.0,) * t, dtype=torch.float64,
                       device=s1.device)[None, :, None, None]  # (1, T, 1, 1)
    mass = (denom[..., None] + rho).clamp_min(torch.finfo(torch.float64).tiny)  # as reference.proalign
    h = (s1 + rho * c) / mass
    parts = [pi_sum / lengths.to(pi_sum.device, torch.float64)[:, None, None], h.reshape(n_slides, t, -1)]
    if s2 is not None:
        sh = shift.to(s1.device, torch.float64)
        var = (s2 + rho * (c - sh) ** 2) / mass - (h - sh) ** 2
        parts.append(var.reshape(n_slides, t, -1))
    return torch.cat(parts, dim=2)


Launch = Callable[..., tuple]


def proalign_ragged(launch: Launch, rows_per_prog: int, k_multiple: int, x: torch.Tensor, lengths: torch.Tensor,
                    prototypes: torch.Tensor, taus: Sequence[float], over: str = "patches", moments: int = 1,
                    prior: float | Sequence[float] = 0.0) -> torch.Tensor:
    """x (sum N, d): the slides' patches one after another; lengths (S,). Returns (S, T, K + moments*K*d)."""
    n_slides, k, d = len(lengths), prototypes.shape[0], x.shape[1]
    lengths = lengths.to(x.device, torch.int64)
    if n_slides == 0 or bool((lengths <= 0).any()):
        raise ValueError("every slide needs at least one patch")
    k_pad = padded_k(k, k_multiple)
    cn = torch.zeros((k_pad, d), dtype=torch.float32, device=x.device)
    cn[:k] = torch.nn.functional.normalize(prototypes.to(x.device, torch.float64), dim=1).float()
    distinct, rows = distinct_taus(taus)
    inv_taus = torch.tensor([1.0 / t for t in distinct], dtype=torch.float32, device=x.device)
    shift = second_moment_shift(prototypes).to(x.device)
    prog_slide, prog_start, ends = gpu_programs(lengths, rows_per_prog)
    m, l, pi, acc, acc2 = launch(x.contiguous(), cn, inv_taus, prog_slide, prog_start, ends, k, k_pad,
                                 over == "prototypes", shift, moments == 2)
    sums = combine(prog_slide, m[..., :k], l[..., :k], pi[..., :k], acc[:, :, :k],
                   None if acc2 is None else acc2[:, :, :k], n_slides)
    return finish(*rows_of(sums, rows), lengths, prototypes, shift, over, prior)
