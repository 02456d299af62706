"""Which GPU backends are live here, and why not."""
from __future__ import annotations

import os

import torch

# TRITON_INTERPRET=1 (set before triton is imported) runs Triton kernels on CPU tensors: tests.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if TRITON_INTERPRET else "cuda"


def triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'proalign-engine[gpu]'"
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None
