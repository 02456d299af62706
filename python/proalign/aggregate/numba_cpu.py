"""numba CPU backend: the fused ProAlign attention in one pass over X (METHOD.md Step 5).

Each parallel block streams its rows in tiles of 8: cosine similarities to the K prototypes,
an online softmax over patches per prototype (running max m, sum l, rescaled accumulator,
flash-attention style) and the per-patch softmax over prototypes for pi, for every tau. The
N x K matrix is never stored; partial (m, l, acc, pi) per block are combined at the end.
"""
from __future__ import annotations

import math

import numpy as np

try:
    import numba
    from numba import njit, prange

    _IMPORT_ERROR = None
except ImportError as e:  # the package runs without numba; doctor says why this backend is off
    numba, _IMPORT_ERROR = None, e

TILE = 8  # rows per register tile: C and the accumulator are loaded once per 8 rows
EXP_REUSE_MAX = 300.0  # 1/tau up to which exp(s/tau - m) is rebuilt from per-row/per-k factors


def unavailable() -> str | None:
    return None if numba is not None else f"numba is not installed ({_IMPORT_ERROR})"


if numba is not None:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _partials(x, cn, inv_taus, nblocks):
        n, d = x.shape
        k = cn.shape[0]
        nt = inv_taus.shape[0]
        per = (n + nblocks - 1) // nblocks
        m_out = np.full((nblocks, nt, k), -np.inf)
        l_out = np.zeros((nblocks, nt, k))
        pi_out = np.zeros((nblocks, nt, k))
        acc_out = np.zeros((nblocks, nt, k, d), dtype=np.float32)
        for b in prange(nblocks):
            start = b * per
            end = min(n, start + per)
            s = np.empty((TILE, k), dtype=np.float32)
            w = np.empty((TILE, k), dtype=np.float32)
            e = np.empty((TILE, k))
            row_scale = np.empty(TILE)
            m = m_out[b]
            l = l_out[b]
            acc = acc_out[b]
            for r0 in range(start, end, TILE):
                rows = min(TILE, end - r0)
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
                        row_scale[r] = math.exp(mx)
                    # online softmax over patches, per prototype. exp(s/tau - m_k) is e[r, k] *
                    # exp(max_r) * exp(-m_k): rows + K exps per tile instead of rows * K; safe in
                    # float64 while 1/tau <= EXP_REUSE_MAX, else computed directly.
                    for kk in range(k):
                        mt = -np.inf
                        for r in range(rows):
                            mt = max(mt, s[r, kk] * it)
                        if mt > m[t, kk]:
                            scale = math.exp(m[t, kk] - mt)  # 0 on the first tile (m = -inf)
                            l[t, kk] *= scale
                            for j in range(d):
                                acc[t, kk, j] *= np.float32(scale)
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
        return m_out, l_out, pi_out, acc_out


def combine(m, l, pi, acc, n: int) -> np.ndarray:
    """Merge per-block partials (blocks, T, K[, d]) into (T, K + K*d) embeddings."""
    big_m = m.max(axis=0)  # (T, K)
    scale = np.where(np.isfinite(m), np.exp(m - big_m[None]), 0.0)  # empty blocks weigh 0
    denom = (l * scale).sum(axis=0)
    h = (acc.astype(np.float64) * scale[..., None]).sum(axis=0) / denom[..., None]
    p = pi.sum(axis=0) / n
    t, k = p.shape
    return np.concatenate([p, h.reshape(t, -1)], axis=1)


def proalign(x: np.ndarray, prototypes: np.ndarray, taus) -> np.ndarray:
    """(T, K + K*d) float64 ProAlign embeddings of x (N, d) for each tau."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.asarray(prototypes, dtype=np.float64)
    cn = np.ascontiguousarray(c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    inv_taus = 1.0 / np.asarray(taus, dtype=np.float64)
    n = x.shape[0]
    nblocks = max(1, min(4 * numba.get_num_threads(), -(-n // 1024)))
    return combine(*_partials(x, cn, inv_taus, nblocks), n)
