"""The float64 torch reference of the ProAlign attention op (METHOD.md Step 5): what every
backend of the op computes, and the checks of its options. Runs in float64 on the CPU (the
`torch` backend) and float32 on a GPU; the fused backends are compared with it."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F


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


def similarity(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """cos(key_i, query_k): (N, K)."""
    return F.normalize(keys, dim=1) @ F.normalize(queries, dim=1).T


def attention_weights(cos: torch.Tensor, tau: float, over: str = "patches") -> torch.Tensor:
    """The weight of patch i in prototype k's pooled vector, (N, K): softmax over patches of
    cos/tau (over=patches, each column sums to 1), or each patch's softmax over prototypes
    (over=prototypes, each row sums to 1)."""
    return torch.softmax(cos / tau, dim=0 if over == "patches" else 1)


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
    cos = similarity(keys, queries)  # (N, K)
    rows = []
    for tau, rho in zip(taus, row_priors(prior, len(taus))):
        per_patch = attention_weights(cos, tau, "prototypes")  # softmax over prototypes
        pi = per_patch.mean(dim=0)
        if over == "patches":
            weights, mass, pseudo = attention_weights(cos, tau, "patches"), 1.0, 0.0
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
