"""Triton: fused ProAlign prototype attention (METHOD.md Step 5) over a ragged batch of slides.

One program streams TILES consecutive tiles of BLOCK_N rows of one slide: per tile, cosine
similarities to the K prototypes (tl.dot over d in BLOCK_D chunks), then for each tau the
per-patch softmax over prototypes (pi) and an online softmax over patches (running max m,
sum l, accumulator rescaled by exp(m_old - m_new)); with OVER_PROTOTYPES the weights are the
per-patch softmax itself (no running max: m stays 0); with SECOND a second accumulator sums
weight * (x - shift)^2 (the per-prototype variance, moments=2). The accumulator lives in the
program's own
partial slot (L2-resident); the N x K matrix is never written. proalign.ops.proalign_attention.host plans
the programs and merges their partials per slide.
Accumulation is fp32 whatever the input dtype (fp16/bf16/fp32); dots run in IEEE fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def proalign_partials_kernel(
    x_ptr, cn_ptr, inv_tau_ptr, prog_slide_ptr, prog_start_ptr, seg_end_ptr, shift_ptr,
    m_ptr, l_ptr, pi_ptr, acc_ptr, acc2_ptr,
    d, k, stride_x,
    T: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr,
    OVER_PROTOTYPES: tl.constexpr, SECOND: tl.constexpr,
):
    pid = tl.program_id(0)
    slide = tl.load(prog_slide_ptr + pid)
    start = tl.load(prog_start_ptr + pid)
    end = tl.load(seg_end_ptr + slide)
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = offs_k < k
    for t in tl.static_range(T):
        base = (pid * T + t) * K_PAD
        tl.store(m_ptr + base + offs_k, tl.full((K_PAD,), 0.0 if OVER_PROTOTYPES else float("-inf"), tl.float32))
        tl.store(l_ptr + base + offs_k, tl.zeros((K_PAD,), tl.float32))
        tl.store(pi_ptr + base + offs_k, tl.zeros((K_PAD,), tl.float32))
    for tile in range(TILES):
        rows = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = rows < end
        # similarities: S = X_tile C^T and the row norms, over d in chunks
        s = tl.zeros((BLOCK_N, K_PAD), tl.float32)
        sq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dd[None, :],
                         mask=r_ok[:, None] & (dd[None, :] < d), other=0.0).to(tl.float32)
            ct = tl.load(cn_ptr + offs_k[:, None] * d + dd[None, :], mask=k_ok[:, None] & (dd[None, :] < d), other=0.0)
            s += tl.dot(xt, tl.trans(ct), input_precision="ieee")
            sq += tl.sum(xt * xt, axis=1)
        s = s / tl.maximum(tl.sqrt(sq), 1e-12)[:, None]
        valid = r_ok[:, None] & k_ok[None, :]
        for t in tl.static_range(T):
            base = (pid * T + t) * K_PAD
            z = tl.where(valid, s * tl.load(inv_tau_ptr + t), float("-inf"))
            # pi: softmax over prototypes per row, summed over the tile's rows
            zr = tl.where(r_ok[:, None], z, 0.0)
            e = tl.where(valid, tl.exp(zr - tl.max(tl.where(k_ok[None, :], zr, float("-inf")), axis=1)[:, None]), 0.0)
            pr = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
            tl.store(pi_ptr + base + offs_k, tl.load(pi_ptr + base + offs_k) + tl.sum(pr, axis=0))
            if OVER_PROTOTYPES:  # weights: the per-patch softmax; nothing to rescale
                p = pr
                alpha = tl.full((K_PAD,), 1.0, tl.float32)
            else:  # online softmax over patches, per prototype
                m_old = tl.load(m_ptr + base + offs_k)
                m_new = tl.maximum(m_old, tl.max(z, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-empty column stays empty
                alpha = tl.exp(m_old - m_safe)
                p = tl.where(valid, tl.exp(z - m_safe[None, :]), 0.0)
                tl.store(m_ptr + base + offs_k, m_new)
            tl.store(l_ptr + base + offs_k, tl.load(l_ptr + base + offs_k) * alpha + tl.sum(p, axis=0))
            for d0 in range(0, d, BLOCK_D):
                dd = d0 + offs_d
                xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dd[None, :],
                             mask=r_ok[:, None] & (dd[None, :] < d), other=0.0).to(tl.float32)
                a_ptrs = acc_ptr + (base + offs_k[:, None]).to(tl.int64) * d + dd[None, :]
                a_mask = dd[None, :] < d
                if tile == 0:
                    a = tl.dot(tl.trans(p), xt, input_precision="ieee")
                else:
                    a = tl.load(a_ptrs, mask=a_mask, other=0.0) * alpha[:, None] + tl.dot(
                        tl.trans(p), xt, input_precision="ieee")
                tl.store(a_ptrs, a, mask=a_mask)
                if SECOND:
                    xs = tl.where(r_ok[:, None] & (dd[None, :] < d),
                                  xt - tl.load(shift_ptr + dd, mask=dd < d, other=0.0)[None, :], 0.0)
                    a2_ptrs = acc2_ptr + (base + offs_k[:, None]).to(tl.int64) * d + dd[None, :]
                    if tile == 0:
                        a2 = tl.dot(tl.trans(p), xs * xs, input_precision="ieee")
                    else:
                        a2 = tl.load(a2_ptrs, mask=a_mask, other=0.0) * alpha[:, None] + tl.dot(
                            tl.trans(p), xs * xs, input_precision="ieee")
                    tl.store(a2_ptrs, a2, mask=a_mask)


_alloc = torch.empty  # tests swap in a NaN-filling allocator to prove every output is written
BLOCK_N, BLOCK_D, TILES = 64, 64, 4
ROWS_PER_PROGRAM = BLOCK_N * TILES


def proalign_partials(x: torch.Tensor, cn: torch.Tensor, inv_taus: torch.Tensor, prog_slide: torch.Tensor,
                      prog_start: torch.Tensor, seg_end: torch.Tensor, k: int, k_pad: int,
                      over_prototypes: bool = False, shift: torch.Tensor | None = None, second: bool = False):
    """Launch over a ragged batch planned with ROWS_PER_PROGRAM rows per program; returns the
    partials m, l, pi (n_prog, T, k_pad), acc and (with `second`, else None) acc2
    (n_prog, T, k_pad, d), float32 (see proalign.ops.proalign_attention.host)."""
    from proalign.ops.checks import FEATURE_DTYPES, check_launch

    x = x if x.dtype in FEATURE_DTYPES else x.float()  # float64: read as fp32, as the CUDA launch does
    n_prog, n_t, d = len(prog_slide), len(inv_taus), x.shape[1]
    check_launch(x, (prog_slide, prog_start, seg_end), cn=(cn, (k_pad, d)), inv_taus=(inv_taus, (n_t,)),
                 **({} if shift is None else {"shift": (shift, (d,))}))
    m, l, pi = (_alloc((n_prog, n_t, k_pad), dtype=torch.float32, device=x.device) for _ in range(3))
    acc = _alloc((n_prog, n_t, k_pad, d), dtype=torch.float32, device=x.device)
    acc2 = _alloc((n_prog, n_t, k_pad, d), dtype=torch.float32, device=x.device) if second else acc
    shift = torch.zeros(d, dtype=torch.float32, device=x.device) if shift is None else shift
    proalign_partials_kernel[(n_prog,)](
        x, cn, inv_taus, prog_slide, prog_start, seg_end, shift, m, l, pi, acc, acc2, d, k, x.stride(0),
        T=n_t, K_PAD=k_pad, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, TILES=TILES,
        OVER_PROTOTYPES=bool(over_prototypes), SECOND=bool(second))
    return m, l, pi, acc, (acc2 if second else None)
