"""The one place that validates what a kernel launch receives. The CUDA C++ launches take raw
device pointers, so a wrong dtype, a strided tensor or a buffer on another device would be read
as garbage (or fault) instead of failing: every launch checks its tensors here first and raises
ValueError / TypeError naming the argument."""
from __future__ import annotations

from typing import Sequence

import torch

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_launch(x: torch.Tensor, plan: Sequence[torch.Tensor],
                 **float32: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """x: (N, d) fp32/fp16/bf16 with contiguous rows. plan: (slide of each program int32, its first
    row int64, each slide's end row int64), 1-D and contiguous. float32: name=(tensor, shape),
    contiguous float32 of exactly that shape. Every tensor on x's device."""
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be (N, d) with d >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in FEATURE_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (stride {x.stride()})")
    named = dict(zip(("prog_slide", "prog_start", "seg_end"), plan))
    want = {"prog_slide": torch.int32, "prog_start": torch.int64, "seg_end": torch.int64}
    if len(named) != 3:
        raise ValueError("plan must be (prog_slide, prog_start, seg_end)")
    if named["prog_slide"].shape != named["prog_start"].shape:
        raise ValueError("prog_slide and prog_start must have one entry per program")
    for name, t in named.items():
        if t.dtype != want[name] or t.ndim != 1 or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous 1-D {want[name]} tensor, got {t.dtype} {tuple(t.shape)}")
    for name, (t, shape) in float32.items():
        if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != tuple(shape):
            raise TypeError(f"{name} must be a contiguous float32 tensor of shape {tuple(shape)}, got "
                            f"{t.dtype} {tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'}")
    for name, t in list(named.items()) + [(n, t) for n, (t, _) in float32.items()]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
