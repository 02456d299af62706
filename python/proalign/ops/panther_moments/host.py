"""Host side of the PANTHER moments op (METHOD.md "Baselines"), shared by its fused backends.

One EM step of the diagonal GMM needs, per component k, only the moments n_k = sum_n q_nk,
sum_n q_nk x_n and sum_n q_nk x_n^2 of the responsibilities q (softmax over k of the Gaussian
log-likelihood + log pi). A backend's `moments` function computes them in one pass over X
without storing q; the MAP M-step then runs here in float64 on those K x (1 + 2d) numbers.

The kernels see x relative to a fixed shift (the mean of the prior means): the log-likelihood is
unchanged by shifting x and mu together, and the fp32 sums of x and x^2 around the data's centre
lose far less to cancellation (var = E[x^2] - mu^2) than sums of raw features with a large
common offset. The E-step is expanded into two dots per row and component:
    loglik_nk - const = sum_j a_kj x'_j^2 + b_kj x'_j + cst_k,  x' = x - shift,
    a = -1/(2 var), b = mu'/var, cst = log pi - sum_j log(var)/2 - sum_j mu'^2/(2 var)
(the -d/2 log 2 pi term, like any part common to every k, drops out of the softmax).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..plans import gpu_programs, padded_k

# moments(x, lengths, shift, a, b, cst) -> (n (S, K), s1 (S, K, d), s2 (S, K, d)) float64 on x's device.
# x (sum N, d) holds S slides one after another (lengths (S,)); shift (d,), a and b (P, K, d),
# cst (P, K) are float32 with P = 1 (one GMM for every slide) or P = S (one per slide).
Moments = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def estep_params(mu: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, shift: torch.Tensor):
    """float64 GMM (P, K, d), (P, K, d), (P, K) and shift (d,) -> float32 a, b (P, K, d), cst (P, K)."""
    mu_s = mu - shift
    a = -0.5 / var
    b = mu_s / var
    cst = log_pi - 0.5 * torch.log(var).sum(-1) - 0.5 * (mu_s * mu_s / var).sum(-1)
    # Parts common to every component shift a row's log-likelihoods alike and drop out of the
    # softmax: remove them, so the fp32 dots only carry what differs between components (with
    # PANTHER's shared prior variance, a is then 0 and the large sum_j x'^2 / var term is gone).
    a, b, cst = (v - v.mean(dim=1, keepdim=True) for v in (a, b, cst))
    return a.float().contiguous(), b.float().contiguous(), cst.float().contiguous()


def panther_ragged(moments: Moments, x: torch.Tensor, lengths: torch.Tensor, prototypes: torch.Tensor,
                   eps: float = 1.0, prior_strength: float = 1.0, em_steps: int = 1) -> torch.Tensor:
    """PANTHER (reference.panther's formulas) for S slides in one pass per EM step.

    x (sum N, d), lengths (S,). Returns float64 (S, 1, K + 2*K*d): [pi, mu, var] per slide.
    """
    if em_steps < 0 or int(em_steps) != em_steps:
        raise ValueError(f"em_steps must be an integer >= 0, got {em_steps}")
    lengths = lengths.to(torch.int64)
    if len(lengths) == 0 or bool((lengths <= 0).any()):
        raise ValueError("every slide needs at least one patch")
    dev, n_slides = x.device, len(lengths)
    k, d = prototypes.shape
    m0 = prototypes.to(dev, torch.float64)
    v0 = torch.full_like(m0, float(eps))
    shift = m0.mean(dim=0).float()  # the kernels' moments are around exactly this fp32 vector
    sh = shift.double()
    strength = float(prior_strength)
    # Step 1 starts from the prior, the same for every slide (P = 1); later steps are per slide.
    mu, var = m0[None], v0[None]
    log_pi = torch.full((1, k), -math.log(k), dtype=torch.float64, device=dev)
    for _ in range(int(em_steps)):
        nq, s1, s2 = moments(x, lengths, shift, *estep_params(mu, var, log_pi, sh))
        # MAP M-step in the shifted frame: the prior's pseudo-points have mean m0 - shift and
        # second moment v0 + (m0 - shift)^2 there.
        n_k = nq + strength
        mu_s = (s1 + strength * (m0 - sh)) / n_k[..., None]
        var = (s2 + strength * (v0 + (m0 - sh) ** 2)) / n_k[..., None] - mu_s * mu_s
        mu, log_pi = mu_s + sh, torch.log(n_k / n_k.sum(dim=1, keepdim=True))
    pi, mu, var = log_pi.exp().expand(n_slides, k), mu.expand(n_slides, k, d), var.expand(n_slides, k, d)
    return torch.cat([pi, mu.reshape(n_slides, -1), var.reshape(n_slides, -1)], dim=1)[:, None]


def gpu_moments(launch: Callable[..., tuple], rows_per_prog: int, k_multiple: int) -> Moments:
    """`moments` for the GPU kernels: plan the programs of the ragged batch, one launch, and a
    segment sum of the per-program partials in float64 (responsibilities are normalised per row,
    so partials add up without any rescaling)."""
    def moments(x, lengths, shift, a, b, cst):
        n_slides, (n_par, k, d) = len(lengths), a.shape
        k_pad = padded_k(k, k_multiple)
        ap = torch.zeros((n_par, k_pad, d), dtype=torch.float32, device=x.device)
        bp, cp = torch.zeros_like(ap), torch.zeros((n_par, k_pad), dtype=torch.float32, device=x.device)
        ap[:, :k], bp[:, :k], cp[:, :k] = a, b, cst
        prog_slide, prog_start, ends = gpu_programs(lengths.to(x.device), rows_per_prog)
        nq, s1, s2 = launch(x.contiguous(), shift.to(x.device).contiguous(), ap, bp, cp, prog_slide, prog_start,
                            ends, k, k_pad)
        idx = prog_slide.long()

        def seg(p):
            return torch.zeros((n_slides,) + p.shape[1:], dtype=torch.float64, device=x.device).index_add_(
                0, idx, p.double())[:, :k]
        return seg(nq), seg(s1), seg(s2)
    return moments
