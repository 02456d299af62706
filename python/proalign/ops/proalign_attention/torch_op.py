"""The ProAlign attention partials as a torch op, `torch.ops.proalign.attention_partials`: its CUDA
kernel (csrc/proalign_attention.cu in proalign._C), a CPU kernel (the numba kernel on the same
program plan) and a fake (shapes only), so the op composes with torch.compile and
torch.library.opcheck checks it on either device. `host.proalign_ragged` turns the partials into
embeddings; the CUDA backend calls `launch`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..checks import check_launch

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_alloc = torch.empty  # tests swap in a NaN-filling allocator to prove every output is written
TILES = 4  # tiles of _C.ROWS_PER_TILE rows per program

Partials = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def rows_per_program() -> int:
    """Rows one CUDA program covers (the plan `host` makes for this backend)."""
    from ... import _C

    return _C.ROWS_PER_TILE * TILES


def _shapes(x: Tensor, cn: Tensor, inv_taus: Tensor, prog_slide: Tensor, second: bool):
    n_prog, n_t, (k_pad, d) = len(prog_slide), len(inv_taus), cn.shape
    return (n_prog, n_t, k_pad), (n_prog, n_t, k_pad, d), ((n_prog, n_t, k_pad, d) if second else (0,))


def _check(x, cn, inv_taus, prog_slide, prog_start, seg_end, shift, k: int) -> None:
    k_pad, d = cn.shape
    check_launch(x, (prog_slide, prog_start, seg_end), cn=(cn, (k_pad, x.shape[1])),
                 inv_taus=(inv_taus, (len(inv_taus),)), shift=(shift, (d,)))
    if not 1 <= k <= k_pad:
        raise ValueError(f"need 1 <= k <= k_pad, got k={k}, k_pad={k_pad}")


@torch.library.custom_op("proalign::attention_partials", mutates_args=(), device_types="cuda")
def attention_partials(x: Tensor, cn: Tensor, inv_taus: Tensor, prog_slide: Tensor, prog_start: Tensor,
                       seg_end: Tensor, shift: Tensor, k: int, rows_per_prog: int, over_prototypes: bool,
                       second: bool) -> Partials:
    """Per program p of `rows_per_prog` rows, tau t and prototype row: m, l, pi (n_prog, T, k_pad),
    acc (n_prog, T, k_pad, d) and acc2 (the same with `second`, else (0,)), float32; the partials
    contract of `host`. cn (k_pad, d) holds the unit-norm prototypes (rows past k zero)."""
    from ... import _C

    _check(x, cn, inv_taus, prog_slide, prog_start, seg_end, shift, k)
    if rows_per_prog != rows_per_program():
        raise ValueError(f"the CUDA kernel covers {rows_per_program()} rows per program, not {rows_per_prog}")
    small, big, second_shape = _shapes(x, cn, inv_taus, prog_slide, second)
    m, l, pi = (_alloc(small, dtype=torch.float32, device=x.device) for _ in range(3))
    acc = _alloc(big, dtype=torch.float32, device=x.device)
    acc2 = _alloc(second_shape, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):  # launch on x's GPU, not the current one
        _C.proalign_partials(x.data_ptr(), _DTYPES[x.dtype], x.stride(0), cn.data_ptr(), inv_taus.data_ptr(),
                             len(inv_taus), prog_slide.data_ptr(), prog_start.data_ptr(), seg_end.data_ptr(),
                             len(prog_slide), x.shape[1], k, cn.shape[0], TILES, m.data_ptr(), l.data_ptr(),
                             pi.data_ptr(), acc.data_ptr(), int(over_prototypes), int(second),
                             shift.data_ptr() if second else 0, acc2.data_ptr() if second else 0,
                             torch.cuda.current_stream(x.device).cuda_stream)
    return m, l, pi, acc, acc2


@attention_partials.register_kernel("cpu")
def _cpu(x, cn, inv_taus, prog_slide, prog_start, seg_end, shift, k, rows_per_prog, over_prototypes, second):
    from ..numba_simd import kernel_input
    from .numba_cpu import _partials

    _check(x, cn, inv_taus, prog_slide, prog_start, seg_end, shift, k)
    ends = torch.minimum(prog_start + rows_per_prog, seg_end[prog_slide.long()])
    small, big, second_shape = _shapes(x, cn, inv_taus, prog_slide, second)
    n_prog, n_t, _, d = big
    acc = np.zeros((n_prog, n_t, k, d), dtype=np.float64 if second else np.float32)
    acc2 = np.zeros((n_prog if second else 0, n_t, k, d), dtype=np.float64)
    out = _partials(*kernel_input(x), cn[:k].contiguous().numpy(), inv_taus.double().numpy(), prog_start.numpy(),
                    ends.numpy(), over_prototypes, shift.numpy(), second, acc, acc2)
    full = [torch.zeros(s, dtype=torch.float32) for s in (small, small, small, big, second_shape)]
    for f, v in zip(full, out):
        if f.numel():
            f[:, :, :k] = torch.from_numpy(v)  # prototype rows past k stay 0
    return tuple(full)


@attention_partials.register_fake
def _fake(x, cn, inv_taus, prog_slide, prog_start, seg_end, shift, k, rows_per_prog, over_prototypes, second):
    small, big, second_shape = _shapes(x, cn, inv_taus, prog_slide, second)
    return tuple(x.new_empty(s, dtype=torch.float32) for s in (small, small, small, big, second_shape))


def launch(x, cn, inv_taus, prog_slide, prog_start, seg_end, k: int, k_pad: int, over_prototypes: bool = False,
           shift=None, second: bool = False):
    """The CUDA backend's launch for `host.proalign_ragged`: partials m, l, pi, acc, acc2 (None
    unless `second`)."""
    if x.dtype not in _DTYPES:
        x = x.float()
    shift = torch.zeros(x.shape[1]) if shift is None else shift
    m, l, pi, acc, acc2 = attention_partials(x, cn, inv_taus, prog_slide, prog_start, seg_end,
                                             shift.to(x.device, torch.float32).contiguous(), k, rows_per_program(),
                                             bool(over_prototypes), bool(second))
    return m, l, pi, acc, (acc2 if second else None)
