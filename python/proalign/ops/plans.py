"""How a ragged batch of slides (rows one after another, `lengths` per slide) is cut into the
units a fused kernel runs: GPU programs of a fixed row count, or numba work items of near-equal
size. Neither unit ever spans two slides, and neither depends on the thread count or on the rest
of the batch, so a slide's embedding is bit-identical however it is batched."""
from __future__ import annotations

import numpy as np
import torch

ITEM_ROWS = 4096  # numba: rows per work item (at most): 25 items for a 100k-patch slide


def gpu_programs(lengths: torch.Tensor, rows_per_prog: int):
    """(slide of each program int32, its first row int64, each slide's end row int64)."""
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    progs = (lengths + rows_per_prog - 1) // rows_per_prog
    prog_slide = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), progs)
    first_prog = torch.cumsum(progs, 0) - progs
    local = torch.arange(len(prog_slide), device=lengths.device) - first_prog[prog_slide]
    prog_start = starts[prog_slide] + local * rows_per_prog
    return prog_slide.to(torch.int32), prog_start, ends


def cpu_items(lengths: np.ndarray, item_rows: int = ITEM_ROWS):
    """numba work items: item_start, item_end (rows), item_slide and the first item of each slide.
    A slide of N rows is cut into ceil(N / item_rows) items that differ by at most one row (the
    partials are combined in item order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    rows = int(item_rows)
    nb = np.maximum(1, -(-lengths // rows))
    first = np.cumsum(nb) - nb
    item_slide = np.repeat(np.arange(len(lengths)), nb)
    local = np.arange(len(item_slide)) - first[item_slide]
    n, parts = lengths[item_slide], nb[item_slide]
    item_start = starts[item_slide] + n * local // parts  # none empty (nb <= n)
    item_end = starts[item_slide] + n * (local + 1) // parts
    return item_start, item_end, item_slide, first


def padded_k(k: int, k_multiple: int) -> int:
    """Prototype rows a kernel computes: the next power of two >= 16 (Triton's tl.arange), or a
    multiple of `k_multiple` (CUDA C++)."""
    return max(16, 1 << (k - 1).bit_length()) if k_multiple == 0 else -(-k // k_multiple) * k_multiple


def check_lengths(n_rows: int, lengths) -> np.ndarray:
    """lengths (S,) int64, each > 0, adding up to the rows of the stacked batch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0 or (lengths <= 0).any() or lengths.sum() != n_rows:
        raise ValueError("lengths must be positive and add up to the rows of x")
    return lengths
