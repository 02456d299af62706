"""CUDA C++ backend: host side of the kernel in csrc/ (module proalign._C), same partials and
combine as the Triton kernel."""
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


def launch(x, cn, inv_taus, prog_slide, prog_start, seg_end, k: int, k_pad: int):
    from .. import _C

    if x.dtype not in _DTYPES:
        x = x.float()
    n_prog, n_t, d = len(prog_slide), len(inv_taus), x.shape[1]
    m, l, pi = (_alloc((n_prog, n_t, k_pad), dtype=torch.float32, device=x.device) for _ in range(3))
    acc = _alloc((n_prog, n_t, k_pad, d), dtype=torch.float32, device=x.device)
    assert x.is_contiguous() and cn.is_contiguous() and prog_slide.dtype == torch.int32
    with torch.cuda.device(x.device):  # launch on x's GPU, not the current one
        _C.proalign_partials(x.data_ptr(), _DTYPES[x.dtype], x.stride(0), cn.data_ptr(), inv_taus.data_ptr(), n_t,
                             prog_slide.data_ptr(), prog_start.data_ptr(), seg_end.data_ptr(), n_prog, d, k,
                             k_pad, TILES, m.data_ptr(), l.data_ptr(), pi.data_ptr(), acc.data_ptr(),
                             torch.cuda.current_stream(x.device).cuda_stream)
    return m, l, pi, acc


def rows_per_program() -> int:
    from .. import _C

    return _C.ROWS_PER_TILE * TILES
