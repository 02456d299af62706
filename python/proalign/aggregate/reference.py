"""The torch reference of every aggregation method (METHOD.md Step 5 and the baselines).

This is the one place that defines what each method computes. It runs in float64 on the CPU
(the `torch` backend) and in float32 on a GPU; faster backends (fused kernels) are checked
against it. Inputs are already-validated tensors: x (N, d), prototypes (K, d).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

# PANTHER's published embedding settings (METHOD.md "Baselines").
PANTHER_EPS = 1.0  # prior diagonal covariance V = eps * softplus(log(e - 1)) = eps
PANTHER_TAU = 1.0  # prior strength of the MAP M-step
PANTHER_EM_STEPS = 1


def check_options(over: str = "patches", moments: int = 1, prior: float | Sequence[float] = 0.0) -> None:
    """Raise ValueError for a ProAlign option set that is not defined."""
    if over not in ("patches", "prototypes"):
        raise ValueError(f"over must be 'patches' or 'prototypes', got {over!r}")
    if moments not in (1, 2):
        raise ValueError(f"moments must be 1 or 2, got {moments!r}")
    priors = [prior] if isinstance(prior, numbers.Real) else list(prior)
    if not priors or not all(p >= 0 for p in priors) or (any(priors) and over != "prototypes"):
        raise ValueError(f"prior must be >= 0 and is an option of over=prototypes (got {prior} with over={over})")


def row_priors(prior: float | Sequence[float], n_rows: int) -> tuple[float, ...]:
    """One prior per embedding row (per tau): a number applies to every row, a sequence must have
    one value per tau (a tau may repeat with another prior)."""
    if isinstance(prior, numbers.Real):  # numpy scalars too
        return (float(prior),) * n_rows
    priors = tuple(float(p) for p in prior)
    if len(priors) != n_rows:
        raise ValueError(f"give one prior per tau or a single prior: {len(priors)} priors {list(priors)} "
                         f"for {n_rows} tau(s)")
    return priors


def compact_prior(prior: float | Sequence[float], n_rows: int) -> float | list[float]:
    """The prior as records store it: one number when every row has the same (as earlier versions
    wrote), else the list of per-row priors."""
    priors = row_priors(prior, n_rows)
    return priors[0] if len(set(priors)) == 1 else list(priors)


def proalign(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    taus: Sequence[float],
    over: str = "patches",
    keys: torch.Tensor | None = None,
    queries: torch.Tensor | None = None,
    moments: int = 1,
    prior: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Parameter-free prototype attention: returns (T, K + moments*K*d), one row per tau.

    s_ik = cos(key_i, query_k) / tau. Keys/queries default to the patches and visual prototypes
    (space=visual); for space=joint the caller passes projected patches and text prototypes.
    over=patches: h_k = sum_i softmax_i(s_ik) x_i.  over=prototypes: with q_ik = softmax_k(s_ik)
    (each patch's soft assignment) and n_k = sum_i q_ik, h_k = (sum_i q_ik x_i + prior c_k) /
    (n_k + prior): the prototype counts as `prior` pseudo-patches, so a prototype no patch of the
    slide resembles falls back to itself instead of a mean of a few stray patches.
    `prior` is one number for every row or one per tau (row_priors). pi_k = (1/N) sum_i
    softmax_k(s_ik) in both cases.
    moments=2 appends v_k, the variance of x under the same weights (with the prior's pseudo-patches
    at c_k): E = [pi, h_1..h_K, v_1..v_K].
    """
    check_options(over, moments, prior)
    keys = x if keys is None else keys
    queries = prototypes if queries is None else queries
    cos = F.normalize(keys, dim=1) @ F.normalize(queries, dim=1).T  # (N, K)
    rows = []
    for tau, rho in zip(taus, row_priors(prior, len(taus))):
        s = cos / tau
        per_patch = torch.softmax(s, dim=1)  # softmax over prototypes
        pi = per_patch.mean(dim=0)
        if over == "patches":
            weights, mass, pseudo = torch.softmax(s, dim=0), 1.0, 0.0  # softmax over patches
        else:
            mass = (per_patch.sum(dim=0)[:, None] + rho).clamp_min(torch.finfo(x.dtype).tiny)
            weights, pseudo = per_patch, rho
        h = (weights.T @ x + pseudo * prototypes) / mass  # (K, d)
        parts = [pi, h.reshape(-1)]
        if moments == 2:
            m2 = (weights.T @ (x * x) + pseudo * prototypes * prototypes) / mass
            parts.append((m2 - h * h).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def panther(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    eps: float = PANTHER_EPS,
    prior_strength: float = PANTHER_TAU,
    em_steps: int = PANTHER_EM_STEPS,
) -> torch.Tensor:
    """PANTHER's MAP-EM of a diagonal GMM with the prototypes as prior means; 'allcat' output
    [pi (K), mu (K*d), Sigma (K*d)]."""
    d = x.shape[1]
    k = prototypes.shape[0]
    m0 = prototypes
    v0 = torch.full_like(prototypes, eps)
    pi = torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)
    mu, var = m0, v0
    for _ in range(em_steps):
        # E-step: diagonal Gaussian log-likelihood + log pi, softmax over prototypes.
        # sum_j (x_j - mu_j)^2 / var_j, expanded into matmuls so no (N, K, d) tensor is built.
        maha = (x * x) @ (1 / var).T - 2 * x @ (mu / var).T + (mu * mu / var).sum(dim=1)[None, :]
        loglik = -0.5 * (d * math.log(2 * math.pi) + torch.log(var).sum(dim=1)[None, :] + maha)
        q = torch.softmax(loglik + torch.log(pi)[None, :], dim=1)  # (N, K)
        # MAP M-step with prior strength tau.
        n_k = q.sum(dim=0) + prior_strength
        pi = n_k / n_k.sum()
        mu = (q.T @ x + prior_strength * m0) / n_k[:, None]
        var = (q.T @ (x * x) + prior_strength * (v0 + m0 * m0)) / n_k[:, None] - mu * mu
    return torch.cat([pi, mu.reshape(-1), var.reshape(-1)])[None]


def h2t(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Hard nearest-prototype assignment on L2-normalised features; per-prototype mean of the
    normalised features (zeros for an empty prototype): (1, K*d)."""
    xn = F.normalize(x, dim=1)
    assign = (xn @ F.normalize(prototypes, dim=1).T).argmax(dim=1)
    k = prototypes.shape[0]
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, xn)
    counts = torch.bincount(assign, minlength=k).to(x.dtype)
    return (sums / counts.clamp_min(1)[:, None]).reshape(1, -1)


def protocount(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Histogram of hard nearest-prototype (cosine) assignments, as fractions of N: (1, K)."""
    assign = (F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T).argmax(dim=1)
    counts = torch.bincount(assign, minlength=prototypes.shape[0]).to(x.dtype)
    return (counts / x.shape[0])[None]


def mean(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Mean pooling of the patch features: (1, d). Prototypes are not used."""
    return x.mean(dim=0, keepdim=True)
