"""CUDA C++ backend: host side of the kernels in csrc/ (module proalign._C), same partials and
combine as the Triton kernels (ProAlign attention, PANTHER moments)."""
from __future__ import annotations

import torch

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_alloc = torch.empty  # tests swap in a NaN-filling allocator to prove every output is written
TILES = 4  # tiles of _C.ROWS_PER_TILE rows per program


def unavailable() -> str | None:
    try:
        from .. import _C
    except ImportError as e:
        return f"proalign._C is not built ({e}); install with nvcc on PATH"
    if _C.device_count() == 0 or not torch.cuda.is_available():
        return "no CUDA device"
    return None


def launch(x, cn, inv_taus, prog_slide, prog_start, seg_end, k: int, k_pad: int, over_prototypes: bool = False,
           shift=None, second: bool = False):
    """ProAlign partials m, l, pi, acc, acc2 (None unless `second`); see aggregate.partials."""
    from .. import _C

    if x.dtype not in _DTYPES:
        x = x.float()
    n_prog, n_t, d = len(prog_slide), len(inv_taus), x.shape[1]
    m, l, pi = (_alloc((n_prog, n_t, k_pad), dtype=torch.float32, device=x.device) for _ in range(3))
    acc = _alloc((n_prog, n_t, k_pad, d), dtype=torch.float32, device=x.device)
    acc2 = _alloc((n_prog, n_t, k_pad, d), dtype=torch.float32, device=x.device) if second else None
    shift = shift.to(x.device, torch.float32).contiguous() if second else None
    assert x.is_contiguous() and cn.is_contiguous() and prog_slide.dtype == torch.int32
    with torch.cuda.device(x.device):  # launch on x's GPU, not the current one
        _C.proalign_partials(x.data_ptr(), _DTYPES[x.dtype], x.stride(0), cn.data_ptr(), inv_taus.data_ptr(), n_t,
                             prog_slide.data_ptr(), prog_start.data_ptr(), seg_end.data_ptr(), n_prog, d, k,
                             k_pad, TILES, m.data_ptr(), l.data_ptr(), pi.data_ptr(), acc.data_ptr(),
                             int(bool(over_prototypes)), int(second), shift.data_ptr() if second else 0,
                             acc2.data_ptr() if second else 0, torch.cuda.current_stream(x.device).cuda_stream)
    return m, l, pi, acc, acc2


def launch_moments(x, shift, a, b, cst, prog_slide, prog_start, seg_end, k: int, k_pad: int):
    """PANTHER moments partials nq (n_prog, k_pad), s1 and s2 (n_prog, k_pad, d), float32; the
    arguments as for proalign.kernels.panther_moments.panther_moments."""
    from .. import _C

    if x.dtype not in _DTYPES:
        x = x.float()
    n_prog, d = len(prog_slide), x.shape[1]
    nq = _alloc((n_prog, k_pad), dtype=torch.float32, device=x.device)
    s1, s2 = (_alloc((n_prog, k_pad, d), dtype=torch.float32, device=x.device) for _ in range(2))
    assert x.stride(1) == 1 and all(t.is_contiguous() and t.dtype == torch.float32 for t in (shift, a, b, cst))
    assert a.shape == b.shape and a.shape[1] == k_pad and prog_slide.dtype == torch.int32
    with torch.cuda.device(x.device):  # launch on x's GPU, not the current one
        _C.panther_moments(x.data_ptr(), _DTYPES[x.dtype], x.stride(0), shift.data_ptr(), a.data_ptr(), b.data_ptr(),
                           cst.data_ptr(), int(a.shape[0] > 1), prog_slide.data_ptr(), prog_start.data_ptr(),
                           seg_end.data_ptr(), n_prog, d, k, k_pad, TILES, nq.data_ptr(), s1.data_ptr(), s2.data_ptr(),
                           torch.cuda.current_stream(x.device).cuda_stream)
    return nq, s1, s2


def rows_per_program() -> int:
    from .. import _C

    return _C.ROWS_PER_TILE * TILES
