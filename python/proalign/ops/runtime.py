"""Which kernel runtimes are live here (numba, Triton, the CUDA C++ module), and why not."""
from __future__ import annotations

import os

import torch

# TRITON_INTERPRET=1 (set before triton is imported) runs Triton kernels on CPU tensors: tests.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if TRITON_INTERPRET else "cuda"


def numba_unavailable() -> str | None:
    try:
        import numba  # noqa: F401
    except ImportError as e:  # the package runs without numba; doctor says why this backend is off
        return f"numba is not installed ({e})"
    return None


def triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'proalign-engine[gpu]'"
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def cuda_unavailable() -> str | None:
    try:
        from .. import _C
    except ImportError as e:
        return f"proalign._C is not built ({e}); install with nvcc on PATH"
    if _C.device_count() == 0 or not torch.cuda.is_available():
        return "no CUDA device"
    return None
