"""The PANTHER E-step moments as a torch op, `torch.ops.proalign.panther_moments`: its CUDA kernel
(csrc/panther_moments.cu in proalign._C), a CPU kernel (the numba kernel on the same program
plan) and a fake (shapes only), so the op composes with torch.compile and
torch.library.opcheck checks it on either device. `host.gpu_moments` merges its partials; the
CUDA backend calls `launch`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_launch
from ..proalign_attention.torch_op import _DTYPES, TILES, rows_per_program

_alloc = torch.empty  # tests swap in a NaN-filling allocator to prove every output is written


def _check(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k: int) -> None:
    n_par, k_pad, d = a.shape
    check_launch(x, (prog_slide, prog_start, seg_end), shift=(shift, (x.shape[1],)), a=(a, (n_par, k_pad, x.shape[1])),
                 b=(b, (n_par, k_pad, d)), cst=(cst, (n_par, k_pad)))
    if not 1 <= k <= k_pad:
        raise ValueError(f"need 1 <= k <= k_pad, got k={k}, k_pad={k_pad}")
    if n_par not in (1, len(seg_end)):
        raise ValueError(f"a, b and cst hold one GMM for every slide or one per slide, got {n_par} for "
                         f"{len(seg_end)} slides")


@torch.library.custom_op("proalign::panther_moments", mutates_args=(), device_types="cuda")
def panther_moments(x: Tensor, shift: Tensor, a: Tensor, b: Tensor, cst: Tensor, prog_slide: Tensor,
                    prog_start: Tensor, seg_end: Tensor, k: int, rows_per_prog: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per program p of `rows_per_prog` rows: nq (n_prog, k_pad), s1 and s2 (n_prog, k_pad, d),
    float32, the moments of the responsibilities around `shift` (see host). a, b (P, k_pad, d) and
    cst (P, k_pad) zero-padded past k, with P = 1 or one per slide."""
    from ... import _C

    _check(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k)
    if rows_per_prog != rows_per_program():
        raise ValueError(f"the CUDA kernel covers {rows_per_program()} rows per program, not {rows_per_prog}")
    n_prog, (_, k_pad, d) = len(prog_slide), a.shape
    nq = _alloc((n_prog, k_pad), dtype=torch.float32, device=x.device)
    s1, s2 = (_alloc((n_prog, k_pad, d), dtype=torch.float32, device=x.device) for _ in range(2))
    with torch.cuda.device(x.device):  # launch on x's GPU, not the current one
        _C.panther_moments(x.data_ptr(), _DTYPES[x.dtype], x.stride(0), shift.data_ptr(), a.data_ptr(), b.data_ptr(),
                           cst.data_ptr(), int(a.shape[0] > 1), prog_slide.data_ptr(), prog_start.data_ptr(),
                           seg_end.data_ptr(), n_prog, d, k, k_pad, TILES, nq.data_ptr(), s1.data_ptr(), s2.data_ptr(),
                           torch.cuda.current_stream(x.device).cuda_stream)
    return nq, s1, s2


@panther_moments.register_kernel("cpu")
def _cpu(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k, rows_per_prog):
    from ..numba_simd import kernel_input
    from .numba_cpu import _moments

    _check(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k)
    ends = torch.minimum(prog_start + rows_per_prog, seg_end[prog_slide.long()])
    par = prog_slide.long() if a.shape[0] > 1 else torch.zeros(len(prog_slide), dtype=torch.int64)
    out = _moments(*kernel_input(x), shift.numpy(), a[:, :k].contiguous().numpy(),
                   b[:, :k].contiguous().numpy(), cst[:, :k].double().contiguous().numpy(), prog_start.numpy(),
                   ends.numpy(), par.numpy())
    full = _fake(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k, rows_per_prog)
    for f, v in zip(full, out):
        f.zero_()[:, :k] = torch.from_numpy(v)  # components past k stay 0
    return full


@panther_moments.register_fake
def _fake(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k, rows_per_prog):
    n_prog, (_, k_pad, d) = len(prog_slide), a.shape
    return (x.new_empty((n_prog, k_pad), dtype=torch.float32),
            *(x.new_empty((n_prog, k_pad, d), dtype=torch.float32) for _ in range(2)))


def launch(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k: int, k_pad: int):
    """The CUDA backend's launch for `host.gpu_moments`: partials nq, s1, s2."""
    if x.dtype not in _DTYPES:
        x = x.float()
    return panther_moments(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k, rows_per_program())
