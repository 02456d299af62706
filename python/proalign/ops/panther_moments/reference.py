"""The torch reference of PANTHER (METHOD.md "Baselines"): MAP-EM of a diagonal GMM with the
prototypes as prior means. The fused panther_moments op computes its E-step moments in one
pass; `host.panther_ragged` runs the same formulas around it."""
from __future__ import annotations

import math

import torch

# PANTHER's published embedding settings (METHOD.md "Baselines").
PANTHER_EPS = 1.0  # prior diagonal covariance V = eps * softplus(log(e - 1)) = eps
PANTHER_PRIOR_STRENGTH = 1.0  # prior strength of the MAP M-step
PANTHER_EM_STEPS = 1


def panther(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    eps: float = PANTHER_EPS,
    prior_strength: float = PANTHER_PRIOR_STRENGTH,
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
