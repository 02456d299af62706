"""numba CPU backend of the PANTHER E-step moments op: responsibilities (softmax over components
of the Gaussian log-likelihood) and their moments in one pass over X for a ragged batch of slides
(work items as for ProAlign, `plans.cpu_items`); q is never stored, the items' partials are
summed per slide in float64.
"""
from __future__ import annotations

import math

import numpy as np

from ..plans import check_lengths, cpu_items
from ..runtime import numba_unavailable

TILE = 8  # rows per register tile: C and the accumulator are loaded once per 8 rows


if numba_unavailable() is None:
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _moments(x, shift, a, b, cst, item_start, item_end, item_par):
        d = x.shape[1]
        k = a.shape[1]
        n_items = item_start.shape[0]
        nq_out = np.zeros((n_items, k))
        s1_out = np.zeros((n_items, k, d), dtype=np.float32)
        s2_out = np.zeros((n_items, k, d), dtype=np.float32)
        for it in prange(n_items):
            p = item_par[it]
            end = item_end[it]
            xs = np.empty((TILE, d), dtype=np.float32)  # x - shift of the tile's rows
            x2 = np.empty((TILE, d), dtype=np.float32)  # its square
            z = np.empty((TILE, k))
            q = np.empty((TILE, k), dtype=np.float32)
            nq = nq_out[it]
            s1 = s1_out[it]
            s2 = s2_out[it]
            for r0 in range(item_start[it], end, TILE):
                rows = min(TILE, end - r0)
                for r in range(TILE):  # a short last tile is padded with zero rows (q = 0 there)
                    for j in range(d):
                        v = x[r0 + r, j] - shift[j] if r < rows else np.float32(0.0)
                        xs[r, j] = v
                        x2[r, j] = v * v
                # log-likelihood (up to a constant) of 8 rows per pass over a component's a and b
                for kk in range(k):
                    ak = a[p, kk]
                    bk = b[p, kk]
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                    for j in range(d):
                        av, bv = ak[j], bk[j]
                        a0 += x2[0, j] * av + xs[0, j] * bv
                        a1 += x2[1, j] * av + xs[1, j] * bv
                        a2 += x2[2, j] * av + xs[2, j] * bv
                        a3 += x2[3, j] * av + xs[3, j] * bv
                        a4 += x2[4, j] * av + xs[4, j] * bv
                        a5 += x2[5, j] * av + xs[5, j] * bv
                        a6 += x2[6, j] * av + xs[6, j] * bv
                        a7 += x2[7, j] * av + xs[7, j] * bv
                    c = cst[p, kk]
                    z[0, kk], z[1, kk], z[2, kk], z[3, kk] = a0 + c, a1 + c, a2 + c, a3 + c
                    z[4, kk], z[5, kk], z[6, kk], z[7, kk] = a4 + c, a5 + c, a6 + c, a7 + c
                # responsibilities: softmax over components, max-subtracted (no overflow)
                for r in range(TILE):
                    if r >= rows:
                        for kk in range(k):
                            q[r, kk] = 0.0
                        continue
                    mx = -np.inf
                    for kk in range(k):
                        mx = max(mx, z[r, kk])
                    tot = 0.0
                    for kk in range(k):
                        z[r, kk] = math.exp(z[r, kk] - mx)
                        tot += z[r, kk]
                    for kk in range(k):
                        qv = z[r, kk] / tot
                        q[r, kk] = qv
                        nq[kk] += qv
                # moments: s1_k += sum_r q_rk x'_r, s2_k += sum_r q_rk x'_r^2, eight rows at a time
                for kk in range(k):
                    q0, q1, q2, q3 = q[0, kk], q[1, kk], q[2, kk], q[3, kk]
                    q4, q5, q6, q7 = q[4, kk], q[5, kk], q[6, kk], q[7, kk]
                    s1k = s1[kk]
                    s2k = s2[kk]
                    for j in range(d):
                        s1k[j] += (q0 * xs[0, j] + q1 * xs[1, j] + q2 * xs[2, j] + q3 * xs[3, j]
                                   + q4 * xs[4, j] + q5 * xs[5, j] + q6 * xs[6, j] + q7 * xs[7, j])
                        s2k[j] += (q0 * x2[0, j] + q1 * x2[1, j] + q2 * x2[2, j] + q3 * x2[3, j]
                                   + q4 * x2[4, j] + q5 * x2[5, j] + q6 * x2[6, j] + q7 * x2[7, j])
        return nq_out, s1_out, s2_out


def moments(x: np.ndarray, lengths, shift: np.ndarray, a: np.ndarray, b: np.ndarray, cst: np.ndarray):
    """PANTHER E-step moments of S slides stacked in x (sum N, d); see host.
    Returns float64 n (S, K), s1 and s2 (S, K, d)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lengths = check_lengths(x.shape[0], lengths)
    item_start, item_end, item_slide, first = cpu_items(lengths)
    item_par = item_slide if a.shape[0] > 1 else np.zeros_like(item_slide)
    f32 = [np.ascontiguousarray(v, dtype=np.float32) for v in (shift, a, b)]
    nq, s1, s2 = _moments(x, *f32, np.ascontiguousarray(cst, dtype=np.float64), item_start, item_end, item_par)
    return tuple(np.add.reduceat(v, first, axis=0, dtype=np.float64) for v in (nq, s1, s2))
