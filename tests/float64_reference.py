"""Independent float64 numpy implementations of every aggregation method, written from
METHOD.md without looking at the package code paths (loops and explicit formulas)."""
from __future__ import annotations

import numpy as np


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _softmax(a, axis):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


def rows_prior(prior, n_rows):
    """A prior given as one number (every row) or one per tau, as a list of n_rows numbers."""
    return [float(prior)] * n_rows if np.ndim(prior) == 0 else [float(p) for p in prior]


def proalign_rows(x, c, taus, prior=0.0, **opts):
    """One `proalign` row per tau, each with its own prior (a number applies to every row)."""
    return np.stack([proalign(x, c, t, prior=p, **opts) for t, p in zip(taus, rows_prior(prior, len(taus)))])


def proalign(x, c, tau, over="patches", keys=None, queries=None, moments=1, prior=0.0):
    x = np.asarray(x, np.float64)
    c = np.asarray(c, np.float64)
    kx = x if keys is None else np.asarray(keys, np.float64)
    qc = np.asarray(c if queries is None else queries, np.float64)
    s = _unit(kx) @ _unit(qc).T / tau  # (N, K)
    per_patch = _softmax(s, axis=1)
    pi = per_patch.mean(axis=0)
    out = [pi]
    hs, vs = [], []
    for k in range(c.shape[0]):
        if over == "patches":
            w, pseudo = _softmax(s[:, k], axis=0), 0.0  # attention of prototype k over the patches
        else:
            w, pseudo = per_patch[:, k], prior  # soft assignments to k, plus `prior` patches at c_k
        total = w.sum() + pseudo
        h = (np.einsum("n,nd->d", w, x) + pseudo * c[k]) / total
        v = (np.einsum("n,nd->d", w, (x - h) ** 2) + pseudo * (c[k] - h) ** 2) / total
        hs.append(h)
        vs.append(v)
    out += hs
    if moments == 2:
        out += vs
    return np.concatenate(out)


def panther(x, c, eps=1.0, tau=1.0):
    x = np.asarray(x, np.float64)
    m0 = np.asarray(c, np.float64)
    n, d = x.shape
    k = m0.shape[0]
    var0 = np.full((k, d), eps)
    logp = np.empty((n, k))
    for j in range(k):
        diff = x - m0[j]
        logp[:, j] = (-0.5 * np.log(2 * np.pi * var0[j]) - 0.5 * diff ** 2 / var0[j]).sum(axis=1) + np.log(1.0 / k)
    q = _softmax(logp, axis=1)
    nk = q.sum(axis=0)
    pi = (nk + tau) / (nk + tau).sum()
    mu = np.empty((k, d))
    var = np.empty((k, d))
    for j in range(k):
        mu[j] = ((q[:, j:j + 1] * x).sum(axis=0) + tau * m0[j]) / (nk[j] + tau)
        ex2 = ((q[:, j:j + 1] * x ** 2).sum(axis=0) + tau * (var0[j] + m0[j] ** 2)) / (nk[j] + tau)
        var[j] = ex2 - mu[j] ** 2
    return np.concatenate([pi, mu.ravel(), var.ravel()])


def nearest(x, c):
    return np.argmax(_unit(np.asarray(x, np.float64)) @ _unit(np.asarray(c, np.float64)).T, axis=1)


def h2t(x, c):
    xn = _unit(np.asarray(x, np.float64))
    a = nearest(x, c)
    out = np.zeros((len(c), xn.shape[1]))
    for j in range(len(c)):
        if (a == j).any():
            out[j] = xn[a == j].mean(axis=0)
    return out.ravel()


def protocount(x, c):
    a = nearest(x, c)
    return np.array([(a == j).sum() for j in range(len(c))], np.float64) / len(x)


def mean(x, c):
    return np.asarray(x, np.float64).mean(axis=0)


def default_reading(x, c):
    """The package's default ProAlign reading (its options from proalign.defaults), one row per tau,
    computed by `proalign` above."""
    from proalign.defaults import DEFAULT_PROALIGN, default_taus

    opts = {k: DEFAULT_PROALIGN[k] for k in ("over", "moments")}
    rows = proalign_rows(x, c, default_taus(), DEFAULT_PROALIGN["prior"], **opts)
    return rows if len(rows) > 1 else rows[0]
