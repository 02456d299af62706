"""numba CPU backend of the ProAlign attention op (METHOD.md Step 5): one pass over X for a
ragged batch of slides in one call.

The slides' rows lie one after another in one array; `plans.cpu_items` cuts them into work items
(a slide's row range each, never spanning two slides) and a prange over the items streams their
rows in blocks of ROWS_PER_BLOCK, each read from memory once (converted from float16/bfloat16 in
registers) into a float32 buffer that stays in cache while:
  1. the cosine similarities of the block's rows to the K prototypes are one small GEMM
     (`numba_simd.block_scores`, 16-lane vectors, 4 x 4 register tiles);
  2. for every distinct tau, the weights: the per-patch softmax over prototypes (pi, and the
     weight itself for over=prototypes) and, for over=patches, the online softmax over patches
     per prototype (the block's column max updates the running max m; the item's sums so far
     are rescaled by exp(m_old - m_new) when the block is added), with a vectorised float32 exp;
  3. the pooling acc_k += sum_r w_rk x_r (moments=2: also acc2_k += sum_r w_rk (x_r - shift)^2)
     is one small GEMM per tau on the same buffer (`numba_simd.block_pool`).
Work per row: K d multiply-adds for the similarities, T K d for the pooling (T distinct taus;
moments=2 doubles the pooling). The N x K matrix is never stored; the items' partials (the
`host` contract: m, l, pi, acc, acc2 per item, which the torch op's CPU kernel returns) are
merged per slide in float64 (`_merge`, host.combine's formulas without its tensor temporaries)
and finished by `host`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..plans import check_lengths, cpu_items
from ..runtime import numba_unavailable

ROWS_PER_BLOCK = 64  # rows read into the block buffer at a time (64 x d floats stay in L2)


if numba_unavailable() is None:
    from numba import njit, prange

    from ..numba_simd import (COLS, W, aligned_zeros, block_pool, block_scores, items_one_at_a_time, parallel_kernel,
                              kernel_input, load_row, vadd, vbcast, vdiv, vexp, vhmax, vhsum, vload, vmax, vmul,
                              vstore, vsub, vzero)

    @njit(fastmath=True, nogil=True, cache=True)
    def _weights(s, inv, ok, rows, it, k, over_prototypes, m, scale, w, wo, lsum, pisum, e, lblk, pblk, t):
        """The weights of one block for one tau, 16 rows per vector: w[wo + kk * RB + r] for r < rows
        (0 past them), and the item's running sums m (over=patches), l and pi updated; scale[kk] is
        what the item's earlier sums are multiplied by when this block's pooled sums are added (1
        for over=prototypes). s: the block's scores, prototype-major (kk * RB + r); ok: 1 for the
        block's rows, 0 past them."""
        rb = ROWS_PER_BLOCK
        kp = (k + 3) // 4 * 4
        to = t * kp
        nrv = (rows + W - 1) // W * W
        itv = vbcast(it)
        if not over_prototypes:  # online softmax over patches: the block's column max first
            for kk in range(k):
                cmax = vbcast(-np.inf)
                for r in range(0, nrv, W):
                    v = vmul(vmul(vload(s, kk * rb + r), vload(inv, r)), itv)
                    cmax = vmax(cmax, vadd(v, vload(ok, rb + r)))  # ok[rb:] is 0 / -inf
                m_new = max(m[to + kk], vhmax(cmax))
                scale[to + kk] = math.exp(m[to + kk] - m_new)  # 0 on the first block (m = -inf)
                m[to + kk] = m_new
        for i in range(0, k * W, W):
            vstore(lblk, i, vzero())
            vstore(pblk, i, vzero())
        for r in range(0, nrv, W):
            f = vmul(vload(inv, r), itv)
            mx = vbcast(-np.inf)  # each row's softmax over the K prototypes (pi)
            for kk in range(k):
                mx = vmax(mx, vmul(vload(s, kk * rb + r), f))
            tot = vzero()
            for kk in range(k):
                ev = vexp(vsub(vmul(vload(s, kk * rb + r), f), mx))
                vstore(e, kk * W, ev)
                tot = vadd(tot, ev)
            rt = vdiv(vload(ok, r), tot)  # 0 for the rows past the block's
            for kk in range(k):
                p = vmul(vload(e, kk * W), rt)
                vstore(pblk, kk * W, vadd(vload(pblk, kk * W), p))
                if over_prototypes:
                    vstore(w, wo + kk * rb + r, p)
                else:  # exp(s/tau - m_k): the weight of these patches for prototype k
                    wv = vmul(vexp(vsub(vmul(vload(s, kk * rb + r), f), vbcast(m[to + kk]))), vload(ok, r))
                    vstore(w, wo + kk * rb + r, wv)
                    vstore(lblk, kk * W, vadd(vload(lblk, kk * W), wv))
        for kk in range(k):
            pb = vhsum(vload(pblk, kk * W))
            pisum[to + kk] += pb
            if over_prototypes:
                lsum[to + kk] += pb
            else:
                lsum[to + kk] = lsum[to + kk] * scale[to + kk] + vhsum(vload(lblk, kk * W))

    @njit(fastmath=True, nogil=True, cache=True)
    def _item(x, fmt, cnp, k, inv_taus, start, end, over_prototypes, shiftp, second, b, m_out, l_out, pi_out,
              acc_out, acc2_out):
        """One work item (rows start..end of one slide): its partials into m/l/pi/acc/acc2_out[b]."""
        d = x.shape[1]
        dp = shiftp.shape[0]
        nt = inv_taus.shape[0]
        kp = (k + 3) // 4 * 4  # prototypes the GEMMs compute (zero rows past k)
        rb = ROWS_PER_BLOCK
        bs = dp + W  # buffer row stride: not a power of two, so a column stripe of the block's rows
        # spreads over the L1 cache's sets instead of a few (the pooling re-reads it per prototype)
        buf = aligned_zeros(rb * bs, np.float32)
        sq = aligned_zeros(rb * bs if second else 0, np.float32)
        s = aligned_zeros(kp * rb, np.float32)  # scores, prototype-major
        w = aligned_zeros(nt * kp * rb, np.float32)  # weights per tau, prototype-major (0 past k)
        inv = aligned_zeros(rb, np.float32)  # 1 / |x_r|
        ok = aligned_zeros(2 * rb, np.float32)  # 1 / 0 for the block's rows and past them; then 0 / -inf
        acc = aligned_zeros(nt * kp * dp, acc_out.dtype)
        acc2 = aligned_zeros(nt * kp * dp if second else 0, acc_out.dtype)
        m = np.full(nt * kp, 0.0 if over_prototypes else -np.inf, dtype=np.float32)
        scale = np.ones(nt * kp, dtype=np.float32)
        lsum = np.zeros(nt * kp)
        pisum = np.zeros(nt * kp)
        e = aligned_zeros(k * W, np.float32)
        lblk = aligned_zeros(k * W, np.float32)
        pblk = aligned_zeros(k * W, np.float32)
        for r0 in range(start, end, rb):
            rows = min(rb, end - r0)
            for r in range(rb):
                ok[r] = 1.0 if r < rows else 0.0
                ok[rb + r] = 0.0 if r < rows else -np.inf
            for r in range(rows):
                nrm = load_row(x, fmt, r0 + r, d, buf, r * bs)
                inv[r] = np.float32(1.0 / max(math.sqrt(nrm), 1e-12))
                if second:
                    for j in range(0, dp, W):
                        v = vsub(vload(buf, r * bs + j), vload(shiftp, j))
                        vstore(sq, r * bs + j, vmul(v, v))
            # the next block is prefetched while this one is computed: half during the scores,
            # half during the pooling
            nxt, nxt_end = (r0 + rb) * d, min(r0 + 2 * rb, end) * d
            half = nxt + max(nxt_end - nxt, 0) // 2
            block_scores(buf, 0, bs, rows, cnp, bs, kp, dp, s, rb, x, nxt, half)
            for t in range(nt):
                _weights(s, inv, ok, rows, inv_taus[t], k, over_prototypes, m, scale, w, t * kp * rb, lsum, pisum,
                         e, lblk, pblk, t)
            block_pool(buf, 0, bs, rows, w, kp * rb, rb, nt, kp, dp, acc, kp * dp, dp, scale, kp, x, half, nxt_end)
            if second:
                block_pool(sq, 0, bs, rows, w, kp * rb, rb, nt, kp, dp, acc2, kp * dp, dp, scale, kp, x, 0, 0)
        for t in range(nt):
            for kk in range(k):
                m_out[b, t, kk] = m[t * kp + kk]
                l_out[b, t, kk] = lsum[t * kp + kk]
                pi_out[b, t, kk] = pisum[t * kp + kk]
                o = (t * kp + kk) * dp
                for j in range(d):
                    acc_out[b, t, kk, j] = acc[o + j]
                if second:
                    for j in range(d):
                        acc2_out[b, t, kk, j] = acc2[o + j]

    @parallel_kernel
    def _partials_kernel(x, fmt, cn, inv_taus, item_start, item_end, over_prototypes, shift, second, acc_out,
                         acc2_out):
        """Partials of every work item: m, l, pi (items, T, K) float64 and acc_out, acc2_out (items,
        T, K, d; acc2_out only with `second`) filled. x (N, d): float32, or the bits of float16 /
        bfloat16 values (uint16, fmt numba_simd.FMT_*); cn (K, d) unit-norm prototypes."""
        d = x.shape[1]
        k = cn.shape[0]
        nt = inv_taus.shape[0]
        dp = (d + COLS - 1) // COLS * COLS
        kp = (k + 3) // 4 * 4
        cnp = aligned_zeros(kp * (dp + W), np.float32)  # prototypes padded with zeros to kp x dp, row
        shiftp = aligned_zeros(dp, np.float32)  # stride dp + W (not a power of two, as the block buffer)
        for kk in range(k):
            for j in range(d):
                cnp[kk * (dp + W) + j] = cn[kk, j]
        for j in range(d):
            shiftp[j] = shift[j]
        nblocks = item_start.shape[0]
        # over=prototypes: weights are each row's softmax over prototypes; no running max (m = 0)
        m_out = np.zeros((nblocks, nt, k)) if over_prototypes else np.full((nblocks, nt, k), -np.inf)
        l_out = np.zeros((nblocks, nt, k))
        pi_out = np.zeros((nblocks, nt, k))
        for b in prange(nblocks):
            _item(x, fmt, cnp, k, inv_taus, item_start[b], item_end[b], over_prototypes, shiftp, second, b, m_out,
                  l_out, pi_out, acc_out, acc2_out)
        return m_out, l_out, pi_out, acc_out, acc2_out

    @njit(cache=True, nogil=True)
    def _merge(item_slide, n_slides, m, l, pi, acc, acc2, second):
        """The items' partials merged per slide in float64, as host.combine does for the GPU programs
        (pi sum, weight sum, acc, acc2 per slide; each item's sums rescaled from its running max to
        the slide's), without its tensor temporaries. Items are added in order: a slide's sums do
        not depend on the thread count nor on the other slides of the batch."""
        n_items, nt, k = m.shape
        d = acc.shape[3]
        big = np.full((n_slides, nt, k), -np.inf)
        for i in range(n_items):
            sl = item_slide[i]
            for t in range(nt):
                for kk in range(k):
                    big[sl, t, kk] = max(big[sl, t, kk], m[i, t, kk])
        pi_sum = np.zeros((n_slides, nt, k))
        denom = np.zeros((n_slides, nt, k))
        s1 = np.zeros((n_slides, nt, k, d))
        s2 = np.zeros((n_slides if second else 0, nt, k, d))
        for i in range(n_items):
            sl = item_slide[i]
            for t in range(nt):
                for kk in range(k):
                    sc = math.exp(m[i, t, kk] - big[sl, t, kk]) if np.isfinite(m[i, t, kk]) else 0.0
                    pi_sum[sl, t, kk] += pi[i, t, kk]
                    denom[sl, t, kk] += l[i, t, kk] * sc
                    for j in range(d):
                        s1[sl, t, kk, j] += acc[i, t, kk, j] * sc
                    if second:
                        for j in range(d):
                            s2[sl, t, kk, j] += acc2[i, t, kk, j] * sc
        return pi_sum, denom, s1, s2

    def _partials(x, fmt, cn, inv_taus, item_start, item_end, over_prototypes, shift, second, acc_out, acc2_out):
        """Partials of every work item (see `_partials_kernel`), the items handed to threads one at a time."""
        with items_one_at_a_time():
            return _partials_kernel(x, fmt, cn, inv_taus, item_start, item_end, over_prototypes, shift, second,
                                    acc_out, acc2_out)


def proalign_ragged(x, lengths, prototypes: np.ndarray, taus, over: str = "patches", moments: int = 1,
                    prior: float | Sequence[float] = 0.0) -> np.ndarray:
    """(S, T, K + moments*K*d) float64 ProAlign embeddings of S slides stacked in x (sum N, d), per
    tau (reference.proalign's options); the items' partials are merged per slide (`_merge`) and
    finished by host. x: a numpy array or CPU tensor; float32, float16 and bfloat16 are read as
    they are (no float32 copy)."""
    from .host import distinct_taus, finish, rows_of, second_moment_shift

    x, fmt = kernel_input(x)
    lengths = check_lengths(x.shape[0], lengths)
    c = torch.from_numpy(np.asarray(prototypes, dtype=np.float64))
    cn = np.ascontiguousarray(torch.nn.functional.normalize(c, dim=1).numpy(), dtype=np.float32)
    distinct, rows = distinct_taus(taus)
    inv_taus = 1.0 / np.asarray(distinct, dtype=np.float64)
    item_start, item_end, item_slide, _ = cpu_items(lengths)
    shift = second_moment_shift(c)
    # acc: sum_r w_rk x_r; acc2 (moments=2): sum_r w_rk (x_r - shift)^2. The variance is acc2/l
    # minus (acc/l - shift)^2, a difference that float32 running sums over thousands of rows left
    # up to ~3e-4 off (relative) at sharp tau; moments=2 accumulates both in float64 (fed by float32
    # sums of a block's rows), moments=1 keeps float32 (half the accumulator traffic).
    second = moments == 2
    acc_dtype = np.float64 if second else np.float32
    nt, k, d = len(distinct), cn.shape[0], x.shape[1]
    acc_out = np.zeros((len(item_start), nt, k, d), dtype=acc_dtype)
    acc2_out = np.zeros((len(item_start) if second else 0, nt, k, d), dtype=acc_dtype)
    m, l, pi, acc, acc2 = _partials(x, fmt, cn, inv_taus, item_start, item_end, over == "prototypes", shift.numpy(),
                                    second, acc_out, acc2_out)
    pi_sum, denom, s1, s2 = _merge(item_slide, len(lengths), m, l, pi, acc, acc2, second)
    sums = [torch.from_numpy(v) for v in (pi_sum, denom, s1)] + [torch.from_numpy(s2) if second else None]
    return finish(*rows_of(sums, rows), torch.from_numpy(lengths), c, shift, over, prior).numpy()


def proalign(x, prototypes: np.ndarray, taus, over: str = "patches", moments: int = 1,
             prior: float | Sequence[float] = 0.0) -> np.ndarray:
    """(T, K + moments*K*d) float64 ProAlign embeddings of one slide x (N, d) for each tau."""
    return proalign_ragged(x, [x.shape[0]], prototypes, taus, over, moments, prior)[0]
