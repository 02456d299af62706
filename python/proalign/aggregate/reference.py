"""The torch reference of the aggregation methods without a fused op: H2T, prototype counts and
mean pooling (METHOD.md "Baselines"). ProAlign and PANTHER are defined with their fused ops, in
`ops/proalign_attention/reference.py` and `ops/panther_moments/reference.py`. Inputs are
already-validated tensors: x (N, d), prototypes (K, d)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
