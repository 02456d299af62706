"""Heads trained on frozen slide embeddings, all seeded and CPU-friendly.

- `logistic` (classification default): L2-regularised logistic regression with scikit-learn's
  objective (sum of log-losses + ||W||^2 / (2C), no penalty on the bias; one logit for two
  classes, softmax for more). C is chosen by an inner patient-grouped, class-stratified k-fold
  search on the training slides of each outer fold (`choose_C`) unless it is given.
- `cox` (survival default): ridge Cox regression: Breslow partial likelihood (risk set
  t_j >= t_i) summed over events + alpha ||w||^2 / 2; alpha chosen the same way (`choose_alpha`).
- `panther-linear` (alias `linear`, deprecated): PANTHER's probe (METHOD.md; its `LinearEmb`):
  one linear layer without bias, AdamW (lr 1e-4, weight decay 1e-5), 50 epochs of mini-batches of
  64 in a seeded order, one epoch of linear warm-up then a cosine decay to 0; cross-entropy for
  classification, the Cox partial likelihood over each batch for survival. Made for cohorts of
  thousands of slides: on a hundred slides it takes ~50 optimiser steps and stays near chance.
Logistic and Cox are fitted in float64 numpy by Newton's method with exact Hessians, in the row
space of the training embeddings (an L2 penalty keeps the optimum there), so 8,208-long embeddings
cost no more than the number of training slides; the search decomposes each inner training set
once and walks the whole grid on it, warm-starting each value from the previous one.
Inputs are standardised with the training fold's mean and std unless `standardize=False`
(PANTHER feeds raw embeddings; `standardize=False` reproduces that).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import EvalError

Predictor = Callable[[np.ndarray], np.ndarray]

HEADS = ("logistic", "cox", "panther-linear")
DEFAULT_HEAD = {"classify": "logistic", "survival": "cox"}
HEAD_ALIASES = {"linear": "panther-linear"}  # deprecated names -> heads
PANTHER_MIN_STEPS = 300  # fewer optimiser steps than this on a fold: eval warns the head is undertrained

# The grids of the inner search, one value per decade. Inputs are z-scored, so a slide's squared
# norm is about p, the embedding length (16 for pi alone, 512 for a mean, 8,208 for proalign with
# K=16 and d=512, more with several taus), and the logits' scale goes with C * p. Strong end: at
# C * p below ~1e-3 the fit is the class prior (80 slides of 8,208: inner log-loss 0.6937 at
# C = 1e-7, 0.6906 at 1e-6, the prior's 0.6940), where a cohort without signal should land; 1e-7
# reaches it for embeddings up to ~10,000 long and comes close beyond. Weak end: C = 1e2 is as
# good as unregularised for z-scored inputs: on separable training slides (the planted cohorts)
# the log-loss keeps falling as C grows but only the weights' scale changes, not their direction;
# on weak signals the measured optima sat at C = 1 to 10. One value per decade keeps the search at
# ten fits per inner fold; an inner estimate on a hundred slides cannot rank finer steps reliably. Cox's
# objective is a sum over events as logistic's is over slides: alpha runs over the same grid read
# as 1/C (measured optima: 1 to 10 on pi alone, 1e3 on 8,208-long proalign embeddings).
C_GRID = tuple(float(c) for c in np.logspace(-7, 2, 10))
ALPHA_GRID = tuple(float(a) for a in np.logspace(7, -2, 10))


@dataclass(frozen=True)
class HeadOptions:
    head: str | None = None  # None: the task's default (logistic | cox); or panther-linear (alias linear)
    C: float | None = None  # logistic: inverse L2 strength; None = auto (inner search over C_grid)
    alpha: float | None = None  # cox: L2 strength; None = auto (inner search over alpha_grid)
    inner_folds: int = 3  # patient-grouped inner folds of the search (fewer when a class has too few patients)
    C_grid: tuple[float, ...] = C_GRID
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    # panther-linear (PANTHER's protocol)
    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 64
    warmup_epochs: int = 1
    standardize: bool = True
    seed: int = 0


def resolve_head(task: str, head: str | None) -> tuple[str, list[str]]:
    """The head a task runs with `head` (None: the task's default), and notes to pass on (a
    deprecated alias). Raises EvalError for a head that does not fit the task."""
    notes = []
    if head in HEAD_ALIASES:
        new = HEAD_ALIASES[head]
        notes.append(f"--head {head} is a deprecated alias of --head {new} (PANTHER's probe); the default head is "
                     f"now {DEFAULT_HEAD.get(task, 'logistic')}, its regularisation chosen by inner cross-validation")
        head = new
    if task == "retrieve":
        return "cosine-knn", notes
    if head is None:
        return DEFAULT_HEAD[task], notes
    fits = {"classify": ("logistic", "panther-linear"), "survival": ("cox", "panther-linear")}[task]
    if head not in fits:
        raise EvalError(f"{task} takes --head {' or '.join(fits)}, not {head}")
    return head, notes


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
            f_only: Callable[[np.ndarray], float] | None = None, theta0: np.ndarray | None = None) -> np.ndarray:
    """Minimise a smooth convex function from `theta0` (default 0) by Newton's method with
    backtracking; `fgh(theta)` returns (value, gradient, Hessian). Stops when the Newton decrement
    is negligible."""
    theta = np.zeros(n) if theta0 is None else np.array(theta0, float)
    f_only = f_only or (lambda th: fgh(th)[0])
    for _ in range(max_iter):
        f, g, h = fgh(theta)
        step = np.linalg.solve(h + 1e-10 * np.eye(n), g)
        dec = float(g @ step)  # squared Newton decrement
        if dec < 1e-18 * max(1.0, abs(f)):
            break
        if dec < 1e-12 * max(1.0, abs(f)):
            # the decrease left (dec / 2) is below what f's rounding can show, so a line search
            # cannot confirm it (and would halve t ~30 times in vain); this close, Newton's full step
            # is safe and squares the error: take it and stop
            theta = theta - step
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


def _lbfgs(fg: Callable[[np.ndarray], tuple[float, np.ndarray]], n: int,
           theta0: np.ndarray | None = None) -> np.ndarray:
    from scipy.optimize import minimize

    res = minimize(fg, np.zeros(n) if theta0 is None else theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 20000, "gtol": 1e-9, "ftol": 1e-15, "maxcor": 30})
    return res.x


NEWTON_MAX = 1200  # unknowns up to which the exact Hessian is used


class _Logistic:
    """L2 logistic regression (sklearn's objective) on one training set, set up once for any C: the
    standardiser and the row-space decomposition are computed here, `solve(C)` fits one C."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, standardize: bool = True):
        self.z = _standardizer(x, standardize)
        f, self.v = _row_space(self.z(x))
        n, self.r = f.shape
        self.fb = np.hstack([f, np.ones((n, 1))])  # last column: the unpenalised bias
        y = np.asarray(y, np.int64)
        self.k = k = 1 if n_classes == 2 else n_classes
        self.onehot = (y == 1).astype(float)[:, None] if k == 1 else np.eye(k)[y]

    def _logits(self, fb: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return fb @ theta.reshape(self.r + 1, self.k, order="F")

    def solve(self, C: float, theta0: np.ndarray | None = None) -> np.ndarray:
        """The penalised optimum (row-space coefficients and bias, flattened) for this C."""
        fb, onehot, r, k = self.fb, self.onehot, self.r, self.k
        pen = np.append(np.full(r, 1.0 / C), 0.0)

        def probs(theta):
            eta = self._logits(fb, theta)
            if k == 1:
                return eta, 1.0 / (1.0 + np.exp(-eta))
            eta_s = eta - eta.max(axis=1, keepdims=True)
            e = np.exp(eta_s)
            return eta, e / e.sum(axis=1, keepdims=True)

        def value(theta):
            eta = self._logits(fb, theta)
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
        return _newton(fgh, m, f_only=value, theta0=theta0) if m <= NEWTON_MAX else _lbfgs(fg, m, theta0)

    def project(self, a: np.ndarray) -> np.ndarray:
        """Rows `a` in the row-space coordinates of the fit, with the bias column."""
        f = self.z(a) @ self.v
        return np.hstack([f, np.ones((len(f), 1))])

    def log_loss(self, fb: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
        """Sum over the rows `fb` (from `project`) of -log p(y), from the logits (no overflow)."""
        eta = self._logits(fb, theta)
        if self.k == 1:
            return float(np.sum(np.logaddexp(0, eta[:, 0]) - (y == 1) * eta[:, 0]))
        m = eta.max(axis=1)
        return float(np.sum(m + np.log(np.exp(eta - m[:, None]).sum(1)) - eta[np.arange(len(y)), y]))

    def predictor(self, theta: np.ndarray) -> Predictor:
        k, z = self.k, self.z
        w = theta.reshape(self.r + 1, k, order="F")
        w_full, bias = self.v @ w[:self.r], w[self.r]

        def predict(a: np.ndarray) -> np.ndarray:
            eta = z(a) @ w_full + bias
            if k == 1:
                p1 = 1.0 / (1.0 + np.exp(-eta[:, 0]))
                return np.stack([1 - p1, p1], axis=1)
            e = np.exp(eta - eta.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

        return predict


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0, standardize: bool = True) -> Predictor:
    """L2 logistic regression (sklearn's objective); returns x -> class probabilities (n, C)."""
    prob = _Logistic(x, y, n_classes, standardize)
    return prob.predictor(prob.solve(C))


def _tie_block_end(t_desc: np.ndarray) -> np.ndarray:
    """For times sorted in descending order, the index of the last row with the same time."""
    n = len(t_desc)
    last = np.append(np.flatnonzero(t_desc[1:] != t_desc[:-1]), n - 1)
    return last[np.searchsorted(last, np.arange(n))]


def cox_log_partial_likelihood(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """sum over events of eta_i - log sum_{t_j >= t_i} exp eta_j (Breslow ties), in float64."""
    order = np.argsort(-np.asarray(time, float), kind="stable")
    t, h = np.asarray(time, float)[order], np.asarray(eta, float)[order]
    e = np.asarray(event, float)[order].astype(bool)
    ls0 = np.logaddexp.accumulate(h)[_tie_block_end(t)]
    return float(np.sum((h - ls0)[e]))


class _Cox:
    """Ridge Cox regression (Breslow ties) on one training set, set up once for any alpha."""

    def __init__(self, x: np.ndarray, time: np.ndarray, event: np.ndarray, standardize: bool = True):
        self.z = _standardizer(x, standardize)
        f, self.v = _row_space(self.z(x))
        order = np.argsort(-np.asarray(time, float), kind="stable")
        self.f, t = f[order], np.asarray(time, float)[order]
        self.e = np.asarray(event, float)[order].astype(bool)
        self.n, self.r = self.f.shape
        self.end = _tie_block_end(t)[self.e]  # each event's risk set: rows 0..end (descending time)
        self.ends, self.counts = np.unique(self.end, return_counts=True)

    def solve(self, alpha: float, beta0: np.ndarray | None = None) -> np.ndarray:
        """The penalised optimum (row-space coefficients) for this alpha. Objective:
        -sum_events [eta_i - log sum_{t_j >= t_i} exp eta_j] + alpha/2 ||w||^2."""
        f, e, end, ends, counts, n, r = self.f, self.e, self.end, self.ends, self.counts, self.n, self.r

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

        return _newton(fgh, r, f_only=value, theta0=beta0) if r <= NEWTON_MAX else _lbfgs(fg, r, beta0)

    def risk(self, a: np.ndarray, beta: np.ndarray) -> np.ndarray:
        return (self.z(a) @ self.v) @ beta

    def predictor(self, beta: np.ndarray) -> Predictor:
        w_full, z = self.v @ beta, self.z
        return lambda a: z(a) @ w_full


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float = 1.0,
            standardize: bool = True) -> Predictor:
    """Ridge Cox regression (Breslow ties); returns x -> risk score (the linear predictor; higher
    = earlier event). Objective: -sum_events [eta_i - log sum_{t_j >= t_i} exp eta_j] + alpha/2 ||w||^2."""
    prob = _Cox(x, time, event, standardize)
    return prob.predictor(prob.solve(alpha))


# --- the inner search -------------------------------------------------------------------------------

def _inner_splits(patients: np.ndarray, strata: np.ndarray, n_inner: int, seed: int, param: str,
                  events: bool = False) -> list:
    """Patient-grouped folds of one training set, stratified by `strata` (class, or event); as
    many as asked, but no more than the patients of the smallest class (`events`: of patients with
    an event), so that every inner fold holds each class (some events) and every inner training
    set too. Fewer than two: an EvalError that says to fix the value."""
    from .splits import group_kfold

    rows: dict[str, list[int]] = {}
    for p, s in zip(patients.tolist(), strata.tolist()):
        rows.setdefault(p, []).append(int(s))
    # each patient's stratum as group_kfold takes it: the most common among its slides
    count = Counter(Counter(v).most_common(1)[0][0] for v in rows.values())
    smallest = count.get(1, 0) if events else min(count.values())
    k = min(n_inner, smallest)
    if k < 2:
        what = "with an event" if events else "of one class"
        raise EvalError(f"cannot choose {param} by inner cross-validation: the training slides hold only "
                        f"{smallest} patient(s) {what}; give a fixed --{param} or use fewer outer folds")
    return group_kfold(patients, strata, k, seed)


def _pick(scores: np.ndarray) -> int:
    """Index of the lowest score, for scores ordered from the strongest regularisation to the
    weakest; ties (to rounding) go to the first, the strongest."""
    best = np.nanmin(scores)
    return int(np.flatnonzero(scores <= best + 1e-9 * max(1.0, abs(best)))[0])


def choose_C(x: np.ndarray, y: np.ndarray, n_classes: int, patients: Sequence[str], grid: Sequence[float] = C_GRID,
             n_inner: int = 3, seed: int = 0, standardize: bool = True) -> tuple[float, dict]:
    """C of `fit_logistic` by inner patient-grouped, class-stratified k-fold on (x, y) alone, the
    training slides of one outer fold. Criterion: the mean log-loss of the held-out inner slides
    (each slide is held out once); log-loss rather than balanced accuracy because it is smooth in C
    and scores confidence, so a hundred slides still rank the grid (balanced accuracy moves in steps
    of 1/n and ties across most of it). Ties go to the smaller C (stronger regularisation).
    Returns (C, {"grid", "inner_folds", "log_loss"})."""
    patients = np.asarray(patients)
    y = np.asarray(y, np.int64)
    grid = sorted(float(c) for c in grid)  # strongest first: each fit starts from the previous optimum
    splits = _inner_splits(patients, y, n_inner, seed, "C")
    loss = np.zeros(len(grid))
    for tr, va in splits:
        prob = _Logistic(x[tr], y[tr], n_classes, standardize)
        fb_va = prob.project(x[va])
        theta = None
        for j, c in enumerate(grid):
            theta = prob.solve(c, theta)
            loss[j] += prob.log_loss(fb_va, y[va], theta)
    loss /= len(y)
    best = _pick(loss)
    return grid[best], {"grid": grid, "inner_folds": len(splits), "log_loss": [round(float(v), 6) for v in loss]}


def choose_alpha(x: np.ndarray, time: np.ndarray, event: np.ndarray, patients: Sequence[str],
                 grid: Sequence[float] = ALPHA_GRID, n_inner: int = 3, seed: int = 0,
                 standardize: bool = True) -> tuple[float, dict]:
    """alpha of `fit_cox` by inner patient-grouped k-fold (stratified by event) on the training
    slides of one outer fold. Criterion: the cross-validated partial likelihood of Verweij and van
    Houwelingen (1993; glmnet's default for Cox), sum over inner folds of l(beta_-k) - l_-k(beta_-k):
    the log partial likelihood over all the training slides minus that over the inner training
    slides, both at the inner fit, so each held-out slide is judged against full risk sets (a
    held-out fold alone is too small for risk sets); reported as the deviance -2 cvpl / events.
    Ties go to the larger alpha. Returns (alpha, {"grid", "inner_folds", "cv_deviance"})."""
    patients = np.asarray(patients)
    time, event = np.asarray(time, float), np.asarray(event, float)
    grid = sorted((float(a) for a in grid), reverse=True)  # strongest first
    splits = _inner_splits(patients, event.astype(np.int64), n_inner, seed, "alpha", events=True)
    cvpl = np.zeros(len(grid))
    for tr, va in splits:
        prob = _Cox(x[tr], time[tr], event[tr], standardize)
        f_all = prob.z(x) @ prob.v
        beta = None
        for j, a in enumerate(grid):
            beta = prob.solve(a, beta)
            eta = f_all @ beta
            cvpl[j] += (cox_log_partial_likelihood(eta, time, event)
                        - cox_log_partial_likelihood(eta[tr], time[tr], event[tr]))
    dev = -2 * cvpl / max(1.0, event.sum())
    best = _pick(dev)
    return grid[best], {"grid": grid, "inner_folds": len(splits), "cv_deviance": [round(float(v), 6) for v in dev]}


def fit_linear(x: np.ndarray, task: str, opts: HeadOptions, y: np.ndarray | None = None, n_classes: int = 2,
               time: np.ndarray | None = None, event: np.ndarray | None = None) -> Predictor:
    """PANTHER's linear probe. Classification returns probabilities (n, C); survival a risk (n,).
    The predictor's `steps` attribute is the number of optimiser steps it took."""
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
    steps = 0
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
            steps += 1

    def predict(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = torch.from_numpy(z(a)).float() @ w
            if task == "classify":
                return torch.softmax(logits, dim=1).double().numpy()
            return logits[:, 0].double().numpy()

    predict.steps = steps
    return predict
