"""numba CPU backend of the ProAlign attention op (METHOD.md Step 5): one pass over X for a
ragged batch of slides in one call.

The slides' rows lie one after another in one array; `plans.cpu_items` cuts them into work items
(a slide's row range each, never spanning two slides) and a prange over the items streams their
rows in tiles of 8: cosine similarities to the K prototypes, an online softmax over patches per
prototype (running max m, sum l, rescaled accumulator, flash-attention style) and the per-patch
softmax over prototypes for pi, for every tau (over=prototypes: that per-patch softmax is the
weight, nothing to rescale; moments=2: a second accumulator of weight * (x - shift)^2). The
N x K matrix is never stored; the items' partials are merged per slide by `host`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..plans import check_lengths, cpu_items
from ..runtime import numba_unavailable

TILE = 8  # rows per register tile: C and the accumulator are loaded once per 8 rows
EXP_REUSE_MAX = 300.0  # 1/tau up to which exp(s/tau - m) is rebuilt from per-row/per-k factors


if numba_unavailable() is None:
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _partials(x, cn, inv_taus, item_start, item_end, over_prototypes, shift, second, acc_out, acc2_out):
        d = x.shape[1]
        k = cn.shape[0]
        nt = inv_taus.shape[0]
        nblocks = item_start.shape[0]
        # over=prototypes: weights are each row's softmax over prototypes; no running max (m = 0)
        m_out = np.zeros((nblocks, nt, k)) if over_prototypes else np.full((nblocks, nt, k), -np.inf)
        l_out = np.zeros((nblocks, nt, k))
        pi_out = np.zeros((nblocks, nt, k))
        for b in prange(nblocks):
            start = item_start[b]
            end = item_end[b]
            s = np.empty((TILE, k), dtype=np.float32)
            w = np.empty((TILE, k), dtype=np.float32)
            e = np.empty((TILE, k))
            row_scale = np.empty(TILE)
            xsq = np.empty((TILE, d if second else 0), dtype=np.float32)
            m = m_out[b]
            l = l_out[b]
            acc = acc_out[b]
            acc2 = acc2_out[b if second else 0:b + 1 if second else 0]
            for r0 in range(start, end, TILE):
                rows = min(TILE, end - r0)
                if second:
                    for r in range(rows):
                        for j in range(d):
                            v = x[r0 + r, j] - shift[j]
                            xsq[r, j] = v * v
                # cosine similarity of each row of the tile to each prototype (cn is unit-norm)
                for r in range(rows):
                    nrm = np.float32(0.0)
                    for j in range(d):
                        nrm += x[r0 + r, j] * x[r0 + r, j]
                    w[r, 0] = np.float32(1.0 / max(math.sqrt(nrm), 1e-12))
                if rows == TILE:  # 8 rows x 2 prototypes per pass over d: 10 loads per 16 FMAs
                    for k0 in range(0, k, 2):
                        k1 = min(k0 + 1, k - 1)  # odd K: the last pair computes one prototype twice
                        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = np.float32(0.0)
                        for j in range(d):
                            c0, c1 = cn[k0, j], cn[k1, j]
                            x0, x1, x2, x3 = x[r0, j], x[r0 + 1, j], x[r0 + 2, j], x[r0 + 3, j]
                            x4, x5, x6, x7 = x[r0 + 4, j], x[r0 + 5, j], x[r0 + 6, j], x[r0 + 7, j]
                            a0 += x0 * c0; a1 += x1 * c0; a2 += x2 * c0; a3 += x3 * c0  # noqa: E702
                            a4 += x4 * c0; a5 += x5 * c0; a6 += x6 * c0; a7 += x7 * c0  # noqa: E702
                            b0 += x0 * c1; b1 += x1 * c1; b2 += x2 * c1; b3 += x3 * c1  # noqa: E702
                            b4 += x4 * c1; b5 += x5 * c1; b6 += x6 * c1; b7 += x7 * c1  # noqa: E702
                        s[0, k0], s[1, k0], s[2, k0], s[3, k0] = a0, a1, a2, a3
                        s[4, k0], s[5, k0], s[6, k0], s[7, k0] = a4, a5, a6, a7
                        s[0, k1], s[1, k1], s[2, k1], s[3, k1] = b0, b1, b2, b3
                        s[4, k1], s[5, k1], s[6, k1], s[7, k1] = b4, b5, b6, b7
                    for r in range(TILE):
                        for kk in range(k):
                            s[r, kk] *= w[r, 0]
                else:
                    for r in range(rows):
                        for kk in range(k):
                            dot = np.float32(0.0)
                            for j in range(d):
                                dot += x[r0 + r, j] * cn[kk, j]
                            s[r, kk] = dot * w[r, 0]
                for t in range(nt):
                    it = inv_taus[t]
                    # pi: softmax over prototypes of each row; e[r, k] = exp(s_rk/tau - max_k)
                    for r in range(rows):
                        mx = -np.inf
                        for kk in range(k):
                            mx = max(mx, s[r, kk] * it)
                        tot = 0.0
                        for kk in range(k):
                            e[r, kk] = math.exp(s[r, kk] * it - mx)
                            tot += e[r, kk]
                        for kk in range(k):
                            pi_out[b, t, kk] += e[r, kk] / tot
                            if over_prototypes:
                                wt = e[r, kk] / tot
                                w[r, kk] = wt
                                l[t, kk] += wt
                        row_scale[r] = math.exp(mx)
                    # online softmax over patches, per prototype. exp(s/tau - m_k) is e[r, k] *
                    # exp(max_r) * exp(-m_k): rows + K exps per tile instead of rows * K; safe in
                    # float64 while 1/tau <= EXP_REUSE_MAX, else computed directly.
                    if not over_prototypes:
                        for kk in range(k):
                            mt = -np.inf
                            for r in range(rows):
                                mt = max(mt, s[r, kk] * it)
                            if mt > m[t, kk]:
                                scale = math.exp(m[t, kk] - mt)  # 0 on the first tile (m = -inf)
                                l[t, kk] *= scale
                                for j in range(d):
                                    acc[t, kk, j] *= scale
                                if second:
                                    for j in range(d):
                                        acc2[0, t, kk, j] *= scale
                                m[t, kk] = mt
                            col_scale = math.exp(-m[t, kk])
                            for r in range(rows):
                                if it <= EXP_REUSE_MAX:
                                    wt = e[r, kk] * row_scale[r] * col_scale
                                else:
                                    wt = math.exp(s[r, kk] * it - m[t, kk])
                                w[r, kk] = wt
                                l[t, kk] += wt
                    # acc_k += sum_r w_rk x_r, eight rows at a time
                    if rows == TILE:
                        for kk in range(k):
                            w0, w1, w2, w3 = w[0, kk], w[1, kk], w[2, kk], w[3, kk]
                            w4, w5, w6, w7 = w[4, kk], w[5, kk], w[6, kk], w[7, kk]
                            for j in range(d):
                                acc[t, kk, j] += (w0 * x[r0, j] + w1 * x[r0 + 1, j] + w2 * x[r0 + 2, j]
                                                  + w3 * x[r0 + 3, j] + w4 * x[r0 + 4, j] + w5 * x[r0 + 5, j]
                                                  + w6 * x[r0 + 6, j] + w7 * x[r0 + 7, j])
                    else:
                        for kk in range(k):
                            for r in range(rows):
                                wr = w[r, kk]
                                for j in range(d):
                                    acc[t, kk, j] += wr * x[r0 + r, j]
                    if second and rows == TILE:
                        for kk in range(k):
                            w0, w1, w2, w3 = w[0, kk], w[1, kk], w[2, kk], w[3, kk]
                            w4, w5, w6, w7 = w[4, kk], w[5, kk], w[6, kk], w[7, kk]
                            for j in range(d):
                                acc2[0, t, kk, j] += (w0 * xsq[0, j] + w1 * xsq[1, j] + w2 * xsq[2, j]
                                                      + w3 * xsq[3, j] + w4 * xsq[4, j] + w5 * xsq[5, j]
                                                      + w6 * xsq[6, j] + w7 * xsq[7, j])
                    elif second:
                        for kk in range(k):
                            for r in range(rows):
                                wr = w[r, kk]
                                for j in range(d):
                                    acc2[0, t, kk, j] += wr * xsq[r, j]
        return m_out, l_out, pi_out, acc_out, acc2_out


def proalign_ragged(x: np.ndarray, lengths, prototypes: np.ndarray, taus, over: str = "patches",
                    moments: int = 1, prior: float | Sequence[float] = 0.0) -> np.ndarray:
    """(S, T, K + moments*K*d) float64 ProAlign embeddings of S slides stacked in x (sum N, d), per
    tau (reference.proalign's options); the items' partials are merged by host."""
    from .host import combine, distinct_taus, finish, rows_of, second_moment_shift

    x = np.ascontiguousarray(x, dtype=np.float32)
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
    # sums of 8 rows), moments=1 keeps float32 (half the accumulator traffic, the default's speed).
    second = moments == 2
    acc_dtype = np.float64 if second else np.float32
    nt, k, d = len(distinct), cn.shape[0], x.shape[1]
    acc_out = np.zeros((len(item_start), nt, k, d), dtype=acc_dtype)
    acc2_out = np.zeros((len(item_start) if second else 0, nt, k, d), dtype=acc_dtype)
    m, l, pi, acc, acc2 = _partials(x, cn, inv_taus, item_start, item_end, over == "prototypes", shift.numpy(),
                                    second, acc_out, acc2_out)
    parts = [torch.from_numpy(v) for v in (m, l, pi, acc)] + [torch.from_numpy(acc2) if second else None]
    sums = combine(torch.from_numpy(item_slide), *parts, len(lengths))
    return finish(*rows_of(sums, rows), torch.from_numpy(lengths), c, shift, over, prior).numpy()


def proalign(x: np.ndarray, prototypes: np.ndarray, taus, over: str = "patches", moments: int = 1,
             prior: float | Sequence[float] = 0.0) -> np.ndarray:
    """(T, K + moments*K*d) float64 ProAlign embeddings of one slide x (N, d) for each tau."""
    return proalign_ragged(x, [x.shape[0]], prototypes, taus, over, moments, prior)[0]
