"""Evaluation metrics, in numpy, with the conventions of scikit-learn / scikit-survival.

Classification: balanced accuracy, macro one-vs-rest AUC, weighted F1, quadratic Cohen's kappa.
Survival: Harrell's C-index, Kaplan-Meier, log-rank test. Retrieval: majority vote of the k
nearest slides by cosine, leaving out the query's own patient. Classes are integer codes 0..C-1.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    m = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(m, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return m


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Mean recall over the classes present in y_true (sklearn's balanced_accuracy_score)."""
    c = n_classes or int(max(np.max(y_true), np.max(y_pred))) + 1
    m = confusion(y_true, y_pred, c)
    support = m.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(m)[present] / support[present]))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Per-class F1 averaged with the true-class supports as weights (an undefined F1 counts 0)."""
    c = n_classes or int(max(np.max(y_true), np.max(y_pred))) + 1
    m = confusion(y_true, y_pred, c)
    tp = np.diag(m).astype(float)
    denom = m.sum(axis=0) + m.sum(axis=1)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    support = m.sum(axis=1)
    return float((f1 * support).sum() / support.sum())


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 over the class codes 0..C-1 (ordinal order)."""
    c = n_classes or int(max(np.max(y_true), np.max(y_pred))) + 1
    m = confusion(y_true, y_pred, c).astype(float)
    expected = np.outer(m.sum(axis=1), m.sum(axis=0)) / m.sum()
    i, j = np.indices((c, c))
    w = (i - j) ** 2
    denom = (w * expected).sum()
    return float(1.0 - (w * m).sum() / denom) if denom > 0 else float("nan")


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(len(a), float)
    start = 0
    for end in np.append(np.flatnonzero(np.diff(s) != 0) + 1, len(a)):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1..end
        start = end
    return ranks


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counted 1/2 (Mann-Whitney)."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(np.asarray(score, float))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """One-vs-rest AUC per class, averaged over the classes with positives and negatives in y_true.
    Two classes: the AUC of class 1's score (the same number)."""
    proba = np.asarray(proba, float)
    aucs = [binary_auc(y_true == c, proba[:, c]) for c in range(proba.shape[1])]
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y, bool)
    order = np.argsort(-np.asarray(score, float), kind="mergesort")
    s, yy = np.asarray(score, float)[order], y[order]
    last = np.append(np.flatnonzero(np.diff(s) != 0), len(s) - 1)  # last index of each tie block
    tp, fp = np.cumsum(yy)[last], np.cumsum(~yy)[last]
    tpr = np.concatenate([[0.0], tp / max(1, y.sum())])
    fpr = np.concatenate([[0.0], fp / max(1, (~y).sum())])
    return fpr, tpr


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance (scikit-survival's `concordance_index_censored`): a pair (i, j) is
    comparable when i had the event and t_i < t_j, or t_i == t_j and j is censored; it is
    concordant when risk_i > risk_j, and a risk tie counts 1/2."""
    t, e, r = (np.asarray(a, float) for a in (time, event, risk))
    e = e.astype(bool)
    num = den = 0.0
    for i in np.flatnonzero(e):
        comp = (t > t[i]) | ((t == t[i]) & ~e)
        comp[i] = False
        if not comp.any():
            continue
        den += comp.sum()
        num += (r[i] > r[comp]).sum() + 0.5 * (r[i] == r[comp]).sum()
    return float(num / den) if den > 0 else float("nan")


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: (event/censoring times t (sorted, distinct), S(t) just after t,
    number at risk just before t). S(t) = prod_{t_j <= t} (1 - d_j / n_j); starts at (0, 1)."""
    t, e = np.asarray(time, float), np.asarray(event, bool)
    times = np.unique(t)
    at_risk = np.array([(t >= u).sum() for u in times])
    deaths = np.array([(e & (t == u)).sum() for u in times])
    surv = np.cumprod(1.0 - deaths / at_risk)
    return np.concatenate([[0.0], times]), np.concatenate([[1.0], surv]), np.concatenate([[len(t)], at_risk])


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test: (chi-square statistic with 1 df, p-value)."""
    from scipy.stats import chi2

    t, e, g = np.asarray(time, float), np.asarray(event, bool), np.asarray(group, bool)
    o_minus_e = var = 0.0
    for u in np.unique(t[e]):
        at = t >= u
        n, n1 = at.sum(), (at & g).sum()
        d, d1 = (e & (t == u)).sum(), (e & (t == u) & g).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if var <= 0:
        return 0.0, 1.0
    stat = o_minus_e ** 2 / var
    return float(stat), float(chi2.sf(stat, 1))


def cosine_neighbours(x: np.ndarray, groups: Sequence, k: int) -> np.ndarray:
    """(n, k) indices of each row's k most cosine-similar rows, never from the row's own group
    (leave-one-patient-out); -1 where fewer than k rows are eligible."""
    xn = np.asarray(x, np.float64)
    xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    sim = xn @ xn.T
    g = np.asarray(groups)
    sim[g[:, None] == g[None, :]] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    valid = np.take_along_axis(sim, order, axis=1) > -np.inf
    return np.where(valid, order, -1)


def majority_vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per row, the most frequent label among the neighbours (ignoring -1); a tie goes to the tied
    label that appears first, i.e. the one of the nearest neighbour among the tied."""
    out = np.empty(len(neighbour_labels), np.int64)
    for i, row in enumerate(neighbour_labels):
        row = row[row >= 0]
        counts = np.bincount(row, minlength=n_classes)
        best = np.flatnonzero(counts == counts.max())
        out[i] = next(v for v in row if v in best)
    return out


def retrieval_accuracy(x: np.ndarray, y: np.ndarray, groups: Sequence, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per k, a boolean per slide: does the majority vote of its k nearest slides (cosine, other
    patients only) give its label?"""
    y = np.asarray(y, np.int64)
    n_classes = int(y.max()) + 1
    nn = cosine_neighbours(x, groups, max(ks))
    out = {}
    for k in ks:
        lab = np.where(nn[:, :k] >= 0, y[np.maximum(nn[:, :k], 0)], -1)
        ok = (lab >= 0).any(axis=1)
        pred = np.full(len(y), -1)
        pred[ok] = majority_vote(lab[ok], n_classes)
        out[k] = pred == y
    return out
