"""numba CPU backend of the PANTHER E-step moments op: responsibilities (softmax over components
of the Gaussian log-likelihood) and their moments in one pass over X for a ragged batch of slides
(work items as for ProAlign, `plans.cpu_items`); q is never stored, the items' partials are
summed per slide in float64.

Each item streams its rows in blocks of ROWS_PER_BLOCK, read from memory once (float16/bfloat16
converted in registers) into a float32 buffer holding [x' | x'^2] per row (x' = x - shift). The
log-likelihood of every row and component is two small GEMMs on that buffer, x' against b and
x'^2 against a (`numba_simd.block_scores`; apart, each keeps its operand in L1: 43.4 -> 35.7 ms),
the responsibilities a softmax over components with a vectorised float32 exp, and the moments
[s1 | s2] += q^T [x' | x'^2] one more small GEMM (`numba_simd.block_pool`): 2 K d + 2 K d
multiply-adds per row.
"""
from __future__ import annotations

import numpy as np

from ..plans import check_lengths, cpu_items
from ..runtime import numba_unavailable

ROWS_PER_BLOCK = 64  # rows in the block buffer at a time (64 x 2d floats stay in L2)


if numba_unavailable() is None:
    from numba import njit, prange

    from ..numba_simd import (COLS, W, aligned_zeros, block_pool, block_scores, items_one_at_a_time, parallel_kernel,
                              kernel_input, load_row_centred, vadd, vbcast, vdiv, vexp, vhsum, vload, vmax, vmul,
                              vstore, vsub, vzero)

    @njit(fastmath=True, nogil=True, cache=True)
    def _item(x, fmt, shiftp, a, b, cst, p, k, start, end, it, nq_out, s1_out, s2_out):
        d = x.shape[1]
        dp = shiftp.shape[0]
        w2 = 2 * dp  # a buffer row: [x' | x'^2], each padded to dp columns
        bs = w2 + W  # buffer row stride: not a power of two (see proalign_attention.numba_cpu)
        kp = (k + 3) // 4 * 4
        rb = ROWS_PER_BLOCK
        # z = x' . b + x'^2 . a + cst: b and a apart (each kp x dp, row stride cs), so that each of
        # the two score GEMMs keeps its operand in L1 (both together would not fit)
        cs = dp + W
        cmb = aligned_zeros(kp * cs, np.float32)
        cma = aligned_zeros(kp * cs, np.float32)
        for kk in range(k):
            for j in range(d):
                cmb[kk * cs + j] = b[p, kk, j]
                cma[kk * cs + j] = a[p, kk, j]
        buf = aligned_zeros(rb * bs, np.float32)
        z = aligned_zeros(kp * rb, np.float32)  # log-likelihoods, component-major: x' . b, then the sum
        z2 = aligned_zeros(kp * rb, np.float32)  # x'^2 . a
        q = aligned_zeros(kp * rb, np.float32)  # responsibilities, component-major (0 past k)
        ok = aligned_zeros(rb, np.float32)  # 1 for the block's rows, 0 past them
        acc = aligned_zeros(kp * w2, np.float32)
        ones = np.ones(kp, dtype=np.float32)
        nq = np.zeros(k)
        qblk = aligned_zeros(k * W, np.float32)
        for r0 in range(start, end, rb):
            rows = min(rb, end - r0)
            for r in range(rb):
                ok[r] = 1.0 if r < rows else 0.0
            for r in range(rows):  # the padding columns stay 0
                load_row_centred(x, fmt, r0 + r, d, shiftp, buf, r * bs, r * bs + dp)
            # the next block is prefetched while this one is computed: half during the scores, half
            # during the pooling
            nxt, nxt_end = (r0 + rb) * d, min(r0 + 2 * rb, end) * d
            half = nxt + max(nxt_end - nxt, 0) // 2
            quarter = nxt + max(nxt_end - nxt, 0) // 4
            block_scores(buf, 0, bs, rows, cmb, cs, kp, dp, z, rb, x, nxt, quarter)
            block_scores(buf, dp, bs, rows, cma, cs, kp, dp, z2, rb, x, quarter, half)
            for i in range(0, k * W, W):
                vstore(qblk, i, vzero())
            for r in range(0, (rows + W - 1) // W * W, W):  # softmax over components, 16 rows at a time
                mx = vbcast(-np.inf)
                for kk in range(k):
                    zv = vadd(vadd(vload(z, kk * rb + r), vload(z2, kk * rb + r)), vbcast(cst[p, kk]))
                    vstore(z, kk * rb + r, zv)
                    mx = vmax(mx, zv)
                tot = vzero()
                for kk in range(k):
                    ev = vexp(vsub(vload(z, kk * rb + r), mx))
                    vstore(q, kk * rb + r, ev)
                    tot = vadd(tot, ev)
                rt = vdiv(vload(ok, r), tot)  # 0 for the rows past the block's
                for kk in range(k):
                    qv = vmul(vload(q, kk * rb + r), rt)
                    vstore(q, kk * rb + r, qv)
                    vstore(qblk, kk * W, vadd(vload(qblk, kk * W), qv))
            for kk in range(k):
                nq[kk] += vhsum(vload(qblk, kk * W))
            block_pool(buf, 0, bs, rows, q, 0, rb, 1, kp, w2, acc, 0, w2, ones, 0, x, half, nxt_end)
        for kk in range(k):
            nq_out[it, kk] = nq[kk]
            for j in range(d):
                s1_out[it, kk, j] = acc[kk * w2 + j]
                s2_out[it, kk, j] = acc[kk * w2 + dp + j]

    @parallel_kernel
    def _moments_kernel(x, fmt, shift, a, b, cst, item_start, item_end, item_par):
        """Per work item: sum q (items, K) float64, sum q x' and sum q x'^2 (items, K, d) float32.
        x (N, d): float32, or float16 / bfloat16 bits (uint16, fmt numba_simd.FMT_*); a, b (P, K, d)
        float32 and cst (P, K) of the GMM item_par[item] uses."""
        d = x.shape[1]
        k = a.shape[1]
        dp = (d + COLS - 1) // COLS * COLS
        shiftp = aligned_zeros(dp, np.float32)
        for j in range(d):
            shiftp[j] = shift[j]
        n_items = item_start.shape[0]
        nq_out = np.zeros((n_items, k))
        s1_out = np.zeros((n_items, k, d), dtype=np.float32)
        s2_out = np.zeros((n_items, k, d), dtype=np.float32)
        for it in prange(n_items):
            _item(x, fmt, shiftp, a, b, cst, item_par[it], k, item_start[it], item_end[it], it, nq_out, s1_out, s2_out)
        return nq_out, s1_out, s2_out

    def _moments(x, fmt, shift, a, b, cst, item_start, item_end, item_par):
        """Moments of every work item (see `_moments_kernel`), the items handed to threads one at a time."""
        with items_one_at_a_time():
            return _moments_kernel(x, fmt, shift, a, b, cst, item_start, item_end, item_par)


def moments(x, lengths, shift: np.ndarray, a: np.ndarray, b: np.ndarray, cst: np.ndarray):
    """PANTHER E-step moments of S slides stacked in x (sum N, d); see host. x: a numpy array or CPU
    tensor; float32, float16 and bfloat16 are read as they are (no float32 copy).
    Returns float64 n (S, K), s1 and s2 (S, K, d)."""
    x, fmt = kernel_input(x)
    lengths = check_lengths(x.shape[0], lengths)
    item_start, item_end, item_slide, first = cpu_items(lengths)
    item_par = item_slide if a.shape[0] > 1 else np.zeros_like(item_slide)
    f32 = [np.ascontiguousarray(v, dtype=np.float32) for v in (shift, a, b)]
    nq, s1, s2 = _moments(x, fmt, *f32, np.ascontiguousarray(cst, dtype=np.float64), item_start, item_end, item_par)
    return tuple(np.add.reduceat(v, first, axis=0, dtype=np.float64) for v in (nq, s1, s2))
