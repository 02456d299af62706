"""ProAlign attention (METHOD.md Step 5): prototypes as queries, patches as keys and values, one
embedding row per tau, in one pass over a ragged batch of slides.

reference.py defines it (and checks its options); host.py plans, merges and finishes the
backends' partials; numba_cpu.py, kernels/proalign_attention.py (Triton) and
csrc/proalign_attention.cu with torch_op.py (CUDA C++) compute them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import host, numba_cpu, torch_op


def run(backend: str, x: torch.Tensor, lengths: torch.Tensor, prototypes: torch.Tensor, taus: Sequence[float],
        **options) -> torch.Tensor:
    """(S, T, K + moments*K*d) float64 embeddings of the S slides stacked in x (lengths (S,)) on a
    fused backend: numba (CPU), triton or cuda."""
    if backend == "numba":
        # float16 / bfloat16 reach the kernel as their bits (converted per block), never as a float32 copy
        out = numba_cpu.proalign_ragged(x, lengths.to(torch.int64).numpy(), prototypes.double().numpy(), taus,
                                        **options)
        return torch.from_numpy(out)
    if backend == "triton":
        from ...kernels import proalign_attention as kern

        return host.proalign_ragged(kern.proalign_partials, kern.ROWS_PER_PROGRAM, 0, x, lengths, prototypes, taus,
                                    **options)
    if backend == "cuda":
        return host.proalign_ragged(torch_op.launch, torch_op.rows_per_program(), 8, x, lengths, prototypes, taus,
                                    **options)
    raise ValueError(f"backend {backend!r} has no fused ProAlign attention")
