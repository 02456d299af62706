"""PANTHER (METHOD.md "Baselines"): MAP-EM of a diagonal GMM with the prototypes as prior means,
each EM step one pass over a ragged batch of slides for the E-step moments.

reference.py defines it; host.py runs the EM steps around a backend's moments; numba_cpu.py,
kernels/panther_moments.py (Triton) and csrc/panther_moments.cu with torch_op.py (CUDA C++)
compute the moments.
"""
from __future__ import annotations

import torch

from . import host, numba_cpu, torch_op


def _numba_moments(x, lengths, shift, a, b, cst):
    # x as it is: float16 / bfloat16 reach the kernel as their bits (converted per block)
    out = numba_cpu.moments(x, lengths.numpy(), shift.numpy(), a.numpy(), b.numpy(), cst.numpy())
    return tuple(torch.from_numpy(v) for v in out)


def moments_function(backend: str) -> host.Moments:
    """The fused E-step moments of a backend (numba, triton or cuda); see host.py."""
    if backend == "numba":
        return _numba_moments
    if backend == "triton":
        from ...kernels import panther_moments as pm

        return host.gpu_moments(pm.panther_moments, pm.ROWS_PER_PROGRAM, 0)
    if backend == "cuda":
        return host.gpu_moments(torch_op.launch, torch_op.rows_per_program(), 8)
    raise ValueError(f"backend {backend!r} has no fused PANTHER moments")


def run(backend: str, x: torch.Tensor, lengths: torch.Tensor, prototypes: torch.Tensor, **options) -> torch.Tensor:
    """(S, 1, K + 2*K*d) float64 PANTHER embeddings of the S slides stacked in x on a fused backend."""
    if backend == "numba" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    return host.panther_ragged(moments_function(backend), x, lengths.to(torch.int64), prototypes, **options)
