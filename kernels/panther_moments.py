"""Triton: fused PANTHER E-step moments (METHOD.md "Baselines") over a ragged batch of slides.

One program streams TILES consecutive tiles of BLOCK_N rows of one slide. Per tile: the
log-likelihood of each row under each of the K diagonal Gaussians, expanded into two dots over
d in BLOCK_D chunks (x'^2 a^T + x' b^T + cst, x' = x - shift; see proalign.ops.panther_moments.host),
then the responsibilities q = softmax over components (max-subtracted), and the moments
n_k += sum_r q_rk, s1_k += q^T x', s2_k += q^T x'^2. The moments live in the program's own
partial slot (L2-resident); q is never written. Unlike the ProAlign kernel no rescaling is
needed: q is normalised per row, so partials simply add up (proalign.ops.panther_moments.host sums
them per slide). Accumulation is fp32 whatever the input dtype (fp16/bf16/fp32); dots run in
IEEE fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def panther_moments_kernel(
    x_ptr, shift_ptr, a_ptr, b_ptr, cst_ptr, prog_slide_ptr, prog_start_ptr, seg_end_ptr,
    nq_ptr, s1_ptr, s2_ptr,
    d, k, stride_x, per_slide,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    slide = tl.load(prog_slide_ptr + pid)
    start = tl.load(prog_start_ptr + pid)
    end = tl.load(seg_end_ptr + slide)
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = offs_k < k
    par = (slide * per_slide).to(tl.int64)  # this slide's GMM (per_slide=0: one GMM for all)
    a_base = a_ptr + par * K_PAD * d
    b_base = b_ptr + par * K_PAD * d
    cst = tl.load(cst_ptr + par * K_PAD + offs_k)
    nq = tl.zeros((K_PAD,), tl.float32)
    for tile in range(TILES):
        rows = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = rows < end
        # log-likelihood up to a per-row constant: S = X'^2 A^T + X' B^T, over d in chunks
        s = tl.zeros((BLOCK_N, K_PAD), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            ok = r_ok[:, None] & (dd[None, :] < d)
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dd[None, :], mask=ok, other=0.0)
            xt = tl.where(ok, xt.to(tl.float32) - tl.load(shift_ptr + dd, mask=dd < d, other=0.0)[None, :], 0.0)
            p_off = offs_k[:, None] * d + dd[None, :]
            p_ok = k_ok[:, None] & (dd[None, :] < d)
            at = tl.load(a_base + p_off, mask=p_ok, other=0.0)
            bt = tl.load(b_base + p_off, mask=p_ok, other=0.0)
            s += tl.dot(xt * xt, tl.trans(at), input_precision="ieee")
            s += tl.dot(xt, tl.trans(bt), input_precision="ieee")
        # responsibilities: softmax over the real components, max-subtracted; 0 outside the slide
        z = tl.where(k_ok[None, :], s + cst[None, :], float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        q = tl.where(r_ok[:, None], e / tl.sum(e, axis=1)[:, None], 0.0)
        nq += tl.sum(q, axis=0)
        # moments of the tile folded into the program's slot
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            ok = r_ok[:, None] & (dd[None, :] < d)
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dd[None, :], mask=ok, other=0.0)
            xt = tl.where(ok, xt.to(tl.float32) - tl.load(shift_ptr + dd, mask=dd < d, other=0.0)[None, :], 0.0)
            o_ptrs = (pid * K_PAD + offs_k[:, None]).to(tl.int64) * d + dd[None, :]
            o_mask = dd[None, :] < d
            u1 = tl.dot(tl.trans(q), xt, input_precision="ieee")
            u2 = tl.dot(tl.trans(q), xt * xt, input_precision="ieee")
            if tile > 0:
                u1 += tl.load(s1_ptr + o_ptrs, mask=o_mask, other=0.0)
                u2 += tl.load(s2_ptr + o_ptrs, mask=o_mask, other=0.0)
            tl.store(s1_ptr + o_ptrs, u1, mask=o_mask)
            tl.store(s2_ptr + o_ptrs, u2, mask=o_mask)
    tl.store(nq_ptr + pid * K_PAD + offs_k, nq)


_alloc = torch.empty  # tests swap in a NaN-filling allocator to prove every output is written
BLOCK_N, BLOCK_D, TILES = 64, 64, 4
ROWS_PER_PROGRAM = BLOCK_N * TILES


def panther_moments(x: torch.Tensor, shift: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cst: torch.Tensor,
                    prog_slide: torch.Tensor, prog_start: torch.Tensor, seg_end: torch.Tensor, k: int, k_pad: int):
    """Launch over a ragged batch planned with ROWS_PER_PROGRAM rows per program. a, b (P, k_pad, d)
    and cst (P, k_pad) float32, zero-padded beyond k, with P = 1 or one per slide. Returns the
    partials nq (n_prog, k_pad) and s1, s2 (n_prog, k_pad, d), float32."""
    from proalign.ops.checks import FEATURE_DTYPES, check_launch

    x = x if x.dtype in FEATURE_DTYPES else x.float()  # float64: read as fp32, as the CUDA launch does
    n_prog, d, n_par = len(prog_slide), x.shape[1], a.shape[0]
    check_launch(x, (prog_slide, prog_start, seg_end), shift=(shift, (d,)), a=(a, (n_par, k_pad, d)),
                 b=(b, (n_par, k_pad, d)), cst=(cst, (n_par, k_pad)))
    nq = _alloc((n_prog, k_pad), dtype=torch.float32, device=x.device)
    s1, s2 = (_alloc((n_prog, k_pad, d), dtype=torch.float32, device=x.device) for _ in range(2))
    panther_moments_kernel[(n_prog,)](
        x, shift, a, b, cst, prog_slide, prog_start, seg_end, nq, s1, s2, d, k, x.stride(0), int(a.shape[0] > 1),
        K_PAD=k_pad, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, TILES=TILES)
    return nq, s1, s2
