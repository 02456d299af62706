"""Heads trained on frozen slide embeddings, all seeded and CPU-friendly.

- `linear`: PANTHER's probe (METHOD.md; its `LinearEmb`): one linear layer without bias, AdamW
  (lr 1e-4, weight decay 1e-5), 50 epochs of mini-batches of 64 in a seeded order, one epoch of
  linear warm-up then a cosine decay to 0; cross-entropy for classification, the Cox partial
  likelihood over each batch for survival.
- `logistic`: L2-regularised logistic regression with scikit-learn's objective (sum of log-losses
  + ||W||^2 / (2C), no penalty on the bias; one logit for two classes, softmax for more).
- `cox`: ridge Cox regression: Breslow partial likelihood (risk set t_j >= t_i) summed over
  events + alpha ||w||^2 / 2.
Both are fitted in float64 numpy by Newton's method with exact Hessians, in the row space of the
training embeddings (an L2 penalty keeps the optimum there), so 8,208-long embeddings cost no
more than the number of training slides.
Inputs are standardised with the training fold's mean and std unless `standardize=False`
(PANTHER feeds raw embeddings; `standardize=False` reproduces that).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class HeadOptions:
    head: str = "linear"  # linear | logistic | cox
    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 64
    warmup_epochs: int = 1
    C: float = 1.0  # logistic: inverse L2 strength
    alpha: float = 1.0  # cox: L2 strength
    standardize: bool = True
    seed: int = 0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch (and numpy's BLAS, when threadpoolctl is installed) on one thread: these models
    are small, and on a busy machine several spinning BLAS/OpenMP threads run 10-70x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(1)
        with limits:
            yield
    finally:
        torch.set_num_threads(before)


def _standardizer(x: np.ndarray, on: bool) -> Callable[[np.ndarray], np.ndarray]:
    if not on:
        return lambda a: np.asarray(a, np.float64)
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)  # constant features stay 0
    return lambda a: (np.asarray(a, np.float64) - mu) / sd


def cox_partial_nll(eta: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Sum over events of -(eta_i - log sum_{t_j >= t_i} exp eta_j) (Breslow ties)."""
    order = torch.argsort(time, descending=True, stable=True)
    t, e, h = time[order], event[order], eta[order]
    lcse = torch.logcumsumexp(h, dim=0)
    # With tied times the risk set reaches the last row of the tie block (in descending order).
    n = len(t)
    idx = torch.arange(n)
    block_end = torch.full((n,), n - 1, dtype=torch.long)
    change = torch.nonzero(t[1:] != t[:-1]).flatten()  # row r ends a block when t[r] != t[r+1]
    if len(change):
        ends = change
        # For each row, the first block end at or after it.
        pos = torch.searchsorted(ends, idx)
        block_end = torch.where(pos < len(ends), ends[pos.clamp_max(len(ends) - 1)], torch.tensor(n - 1))
    return -((h - lcse[block_end]) * e).sum()


def _row_space(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z (n, p) = F V^T with F = U S (n, r) and V (p, r) orthonormal, r = rank <= n. An L2 penalty
    keeps the optimum of w in the row space, w = V beta, and ||w|| = ||beta||: fitting beta on F is
    the same problem in r <= n dimensions (fast when p >> n)."""
    if z.shape[1] <= z.shape[0]:
        return z, np.eye(z.shape[1])
    ev, u = np.linalg.eigh(z @ z.T)  # the n x n Gram matrix: cheaper than an SVD of z when p >> n
    keep = ev > max(ev.max(), 0.0) * 1e-10
    s = np.sqrt(ev[keep])
    u = u[:, keep]
    return u * s, (z.T @ u) / s


def _newton(fgh: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]], n: int, max_iter: int = 100,
            f_only: Callable[[np.ndarray], float] | None = None) -> np.ndarray:
    """Minimise a smooth convex function from 0 by Newton's method with backtracking; `fgh(theta)`
    returns (value, gradient, Hessian). Stops when the Newton decrement is negligible."""
    theta = np.zeros(n)
    f_only = f_only or (lambda th: fgh(th)[0])
    for _ in range(max_iter):
        f, g, h = fgh(theta)
        step = np.linalg.solve(h + 1e-10 * np.eye(n), g)
        dec = float(g @ step)  # squared Newton decrement
        if dec < 1e-18 * max(1.0, abs(f)):
            break
        t = 1.0
        while t > 1e-10:
            ft = f_only(theta - t * step)
            if np.isfinite(ft) and ft <= f - 0.25 * t * dec:
                break
            t *= 0.5
        else:
            break  # no decrease left to find: converged to rounding
        theta = theta - t * step
    return theta


def _lbfgs(fg: Callable[[np.ndarray], tuple[float, np.ndarray]], n: int) -> np.ndarray:
    from scipy.optimize import minimize

    res = minimize(fg, np.zeros(n), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20000, "gtol": 1e-9, "ftol": 1e-15, "maxcor": 30})
    return res.x


NEWTON_MAX = 1200  # unknowns up to which the exact Hessian is used


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0, standardize: bool = True) -> Predictor:
    """L2 logistic regression (sklearn's objective); returns x -> class probabilities (n, C)."""
    z = _standardizer(x, standardize)
    f, v = _row_space(z(x))
    n, r = f.shape
    fb = np.hstack([f, np.ones((n, 1))])  # last column: the unpenalised bias
    pen = np.append(np.full(r, 1.0 / C), 0.0)
    y = np.asarray(y, np.int64)
    k = 1 if n_classes == 2 else n_classes
    onehot = (y == 1).astype(float)[:, None] if k == 1 else np.eye(k)[y]

    def probs(theta):
        eta = fb @ theta.reshape(r + 1, k, order="F")
        if k == 1:
            return eta, 1.0 / (1.0 + np.exp(-eta))
        eta_s = eta - eta.max(axis=1, keepdims=True)
        e = np.exp(eta_s)
        return eta, e / e.sum(axis=1, keepdims=True)

    def value(theta):
        eta, p = probs(theta)
        w = theta.reshape(r + 1, k, order="F")
        if k == 1:
            data = np.sum(np.logaddexp(0, eta[:, 0]) - onehot[:, 0] * eta[:, 0])
        else:
            m = eta.max(axis=1)
            data = np.sum(m + np.log(np.exp(eta - m[:, None]).sum(1)) - (eta * onehot).sum(1))
        return float(data + 0.5 * np.sum(pen[:, None] * w * w))

    def fgh(theta):
        _, p = probs(theta)
        w = theta.reshape(r + 1, k, order="F")
        g = (fb.T @ (p - onehot) + pen[:, None] * w).reshape(-1, order="F")
        h = np.empty((k * (r + 1), k * (r + 1)))
        for a in range(k):
            for b in range(a, k):
                d = p[:, a] * ((a == b) - p[:, b]) if k > 1 else p[:, 0] * (1 - p[:, 0])
                blk = (fb * d[:, None]).T @ fb
                if a == b:
                    blk += np.diag(pen)
                h[a * (r + 1):(a + 1) * (r + 1), b * (r + 1):(b + 1) * (r + 1)] = blk
                h[b * (r + 1):(b + 1) * (r + 1), a * (r + 1):(a + 1) * (r + 1)] = blk.T
        return value(theta), g, h

    def fg(theta):  # value and gradient only (large problems)
        _, p = probs(theta)
        wt = theta.reshape(r + 1, k, order="F")
        return value(theta), (fb.T @ (p - onehot) + pen[:, None] * wt).reshape(-1, order="F")

    m = k * (r + 1)
    theta = _newton(fgh, m, f_only=value) if m <= NEWTON_MAX else _lbfgs(fg, m)
    w = theta.reshape(r + 1, k, order="F")
    w_full, bias = v @ w[:r], w[r]

    def predict(a: np.ndarray) -> np.ndarray:
        eta = z(a) @ w_full + bias
        if k == 1:
            p1 = 1.0 / (1.0 + np.exp(-eta[:, 0]))
            return np.stack([1 - p1, p1], axis=1)
        e = np.exp(eta - eta.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return predict


def _tie_block_end(t_desc: np.ndarray) -> np.ndarray:
    """For times sorted in descending order, the index of the last row with the same time."""
    n = len(t_desc)
    last = np.append(np.flatnonzero(t_desc[1:] != t_desc[:-1]), n - 1)
    return last[np.searchsorted(last, np.arange(n))]


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float = 1.0,
            standardize: bool = True) -> Predictor:
    """Ridge Cox regression (Breslow ties); returns x -> risk score (the linear predictor; higher
    = earlier event). Objective: -sum_events [eta_i - log sum_{t_j >= t_i} exp eta_j] + alpha/2 ||w||^2."""
    z = _standardizer(x, standardize)
    f, v = _row_space(z(x))
    order = np.argsort(-np.asarray(time, float), kind="stable")
    f, t, e = f[order], np.asarray(time, float)[order], np.asarray(event, float)[order].astype(bool)
    n, r = f.shape
    end = _tie_block_end(t)[e]  # each event's risk set: rows 0..end (ascending time = descending rows)
    ends, counts = np.unique(end, return_counts=True)

    def log_s0(eta):  # log sum_{j <= end} exp(eta_j) per event, without overflow or underflow
        return np.logaddexp.accumulate(eta)[end]

    def value(beta):
        eta = f @ beta
        return float(-np.sum(eta[e] - log_s0(eta)) + 0.5 * alpha * beta @ beta)

    def weights(eta, ls0):
        # wc_j = sum over events i whose risk set holds j of exp(eta_j - log S0_i) (each term <= 1)
        inv = np.full(n, -np.inf)
        np.logaddexp.at(inv, end, -ls0)
        log_c = np.logaddexp.accumulate(inv[::-1])[::-1]
        return np.exp(eta + log_c)

    def fg(beta):
        eta = f @ beta
        ls0 = log_s0(eta)
        g = -f[e].sum(axis=0) + f.T @ weights(eta, ls0) + alpha * beta
        return float(-np.sum(eta[e] - ls0) + 0.5 * alpha * beta @ beta), g

    def fgh(beta):
        eta = f @ beta
        ls0 = log_s0(eta)
        wc = weights(eta, ls0)
        # risk-set means at each distinct risk-set end: a running sum, rescaled when the max grows
        mus = np.empty((len(ends), r))
        acc, s0, m, k = np.zeros(r), 0.0, -np.inf, 0
        for j in range(n):
            if eta[j] > m:
                acc *= np.exp(m - eta[j])
                s0 *= np.exp(m - eta[j])
                m = eta[j]
            w = np.exp(eta[j] - m)
            acc += w * f[j]
            s0 += w
            if k < len(ends) and ends[k] == j:
                mus[k] = acc / s0
                k += 1
        h = (f * wc[:, None]).T @ f - (mus * counts[:, None]).T @ mus + alpha * np.eye(r)
        g = -f[e].sum(axis=0) + f.T @ wc + alpha * beta
        return float(-np.sum(eta[e] - ls0) + 0.5 * alpha * beta @ beta), g, h

    beta = _newton(fgh, r, f_only=value) if r <= NEWTON_MAX else _lbfgs(fg, r)
    w_full = v @ beta
    return lambda a: z(a) @ w_full


def fit_linear(x: np.ndarray, task: str, opts: HeadOptions, y: np.ndarray | None = None, n_classes: int = 2,
               time: np.ndarray | None = None, event: np.ndarray | None = None) -> Predictor:
    """PANTHER's linear probe. Classification returns probabilities (n, C); survival a risk (n,)."""
    z = _standardizer(x, opts.standardize)
    g = torch.Generator().manual_seed(opts.seed)
    xt = torch.from_numpy(z(x)).float()
    n, d = xt.shape
    out = n_classes if task == "classify" else 1
    bound = 1.0 / np.sqrt(d)  # nn.Linear's default init, drawn from our own generator
    w = ((torch.rand(d, out, generator=g) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.AdamW([w], lr=opts.lr, weight_decay=opts.weight_decay)
    bs = max(1, min(opts.batch_size, n))
    steps_per_epoch = -(-n // bs)
    total = max(1, opts.epochs * steps_per_epoch)
    warm = min(opts.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if task == "classify":
        yt = torch.from_numpy(np.asarray(y, np.int64))
    else:
        tt, et = torch.from_numpy(np.asarray(time, np.float32)), torch.from_numpy(np.asarray(event, np.float32))
    for _ in range(opts.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            logits = xt[idx] @ w
            if task == "classify":
                loss = F.cross_entropy(logits, yt[idx])
            else:
                ne = et[idx].sum()
                loss = cox_partial_nll(logits[:, 0], tt[idx], et[idx]) / ne if ne > 0 else None
            if loss is None:  # a survival batch without events carries no signal
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    def predict(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = torch.from_numpy(z(a)).float() @ w
            if task == "classify":
                return torch.softmax(logits, dim=1).double().numpy()
            return logits[:, 0].double().numpy()

    return predict
