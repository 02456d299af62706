"""Shared host side of the fused GPU kernels (Triton and CUDA C++): plan the programs of a
ragged batch, launch, and merge the per-program online-softmax partials of each slide with
torch segment ops (a fixed number of launches for the whole batch, no per-slide loop)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def plan(lengths: torch.Tensor, rows_per_prog: int):
    """(slide of each program int32, its first row int64, each slide's end row int64)."""
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    progs = (lengths + rows_per_prog - 1) // rows_per_prog
    prog_slide = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), progs)
    first_prog = torch.cumsum(progs, 0) - progs
    local = torch.arange(len(prog_slide), device=lengths.device) - first_prog[prog_slide]
    prog_start = starts[prog_slide] + local * rows_per_prog
    return prog_slide.to(torch.int32), prog_start, ends


def combine(prog_slide, m, l, pi, acc, lengths, n_slides: int):
    """Merge program partials per slide: pi (S, T, Kp) and h (S, T, Kp, d)."""
    idx = prog_slide.long()
    t, kp = m.shape[1], m.shape[2]
    big_m = torch.full((n_slides, t, kp), float("-inf"), device=m.device).scatter_reduce_(
        0, idx[:, None, None].expand_as(m), m, "amax")
    scale = torch.exp(m - big_m[idx])
    scale = torch.where(torch.isfinite(m), scale, torch.zeros_like(scale))  # programs with no rows
    denom = torch.zeros((n_slides, t, kp), device=m.device).index_add_(0, idx, l * scale)
    h = torch.zeros((n_slides,) + acc.shape[1:], device=m.device).index_add_(0, idx, acc * scale[..., None])
    p = torch.zeros((n_slides, t, kp), device=m.device).index_add_(0, idx, pi) / lengths[:, None, None].float()
    return p, h / denom[..., None]


Launch = Callable[..., tuple]


def proalign_ragged(launch: Launch, rows_per_prog: int, k_multiple: int, x: torch.Tensor, lengths: torch.Tensor,
                    prototypes: torch.Tensor, taus: Sequence[float]) -> torch.Tensor:
    """x (sum N, d): the slides' patches one after another; lengths (S,). Returns (S, T, K + K*d)."""
    n_slides, k, d = len(lengths), prototypes.shape[0], x.shape[1]
    lengths = lengths.to(x.device, torch.int64)
    if n_slides == 0 or bool((lengths <= 0).any()):
        raise ValueError("every slide needs at least one patch")
    k_pad = max(16, 1 << (k - 1).bit_length()) if k_multiple == 0 else -(-k // k_multiple) * k_multiple
    cn = torch.zeros((k_pad, d), dtype=torch.float32, device=x.device)
    cn[:k] = torch.nn.functional.normalize(prototypes.to(x.device, torch.float64), dim=1).float()
    inv_taus = torch.tensor([1.0 / t for t in taus], dtype=torch.float32, device=x.device)
    prog_slide, prog_start, ends = plan(lengths, rows_per_prog)
    m, l, pi, acc = launch(x.contiguous(), cn, inv_taus, prog_slide, prog_start, ends, k, k_pad)
    p, h = combine(prog_slide, m, l, pi, acc, lengths, n_slides)
    return torch.cat([p[..., :k], h[:, :, :k].reshape(n_slides, len(taus), k * d)], dim=2)
