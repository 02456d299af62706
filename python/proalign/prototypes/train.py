"""METHOD.md Step 4: patch-text contrastive refinement of the visual prototypes.

Teacher (fixed): q_ik = softmax_k(z_i · t_k / τ_a), the text allocation of Step 3.
Student: p_ik = softmax_k(cos(x_i, c_k) / τ_s).
Loss: mean_i H(q_i, p_i) + λ · KL(mean_i p_i || mean_i q_i); the second term keeps the student's
average use of the prototypes close to the teacher's, which is what prevents collapse.
AdamW over the prototypes only, seeded batches. Only the direction of c_k enters the loss (and the
ProAlign attention); each trained prototype is put back to its initial norm, so norm-sensitive
uses (PANTHER's prior means) keep their scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PrototypeError


@dataclass
class TrainResult:
    prototypes: np.ndarray  # (K, d) float32
    loss_curve: list[dict]  # per epoch: loss, ce, kl (means over batches)
    usage: np.ndarray  # (K,) share of pool patches whose argmax_k p_ik is k
    meta: dict = field(default_factory=dict)


def contrastive_loss(x: torch.Tensor, q: torch.Tensor, c: torch.Tensor, tau_s: float,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) of one batch: x (b, d) features, q (b, K) teacher, c (K, d) prototypes."""
    logp = torch.log_softmax(F.normalize(x, dim=1) @ F.normalize(c, dim=1).T / tau_s, dim=1)
    ce = -(q * logp).sum(dim=1).mean()
    p_mean = logp.exp().mean(dim=0)
    q_mean = q.mean(dim=0)
    kl = (p_mean * (torch.log(p_mean.clamp_min(1e-30)) - torch.log(q_mean.clamp_min(1e-30)))).sum()
    return ce + lam * kl, ce, kl


def train_prototypes(x: np.ndarray, text_prototypes: np.ndarray, projection: np.ndarray | None, init: np.ndarray, *,
                     z: np.ndarray | None = None, tau_s: float = 0.05, tau_a: float = 0.01, lam: float = 1.0,
                     epochs: int = 10, lr: float = 1e-3, batch_size: int = 1024, seed: int = 0) -> TrainResult:
    """Refine `init` (K, d) on the pool `x` (P, d). z (P, D) defaults to normalize(x @ projection)."""
    if init.shape[1] != x.shape[1]:
        raise PrototypeError(f"initial prototypes have dim {init.shape[1]}, features have dim {x.shape[1]}")
    if init.shape[0] != text_prototypes.shape[0]:
        raise PrototypeError(f"{init.shape[0]} initial prototypes but {text_prototypes.shape[0]} text prototypes")
    if z is None:
        if projection is None:
            raise PrototypeError("training needs the joint-space patches z or the projection W (d, D)")
        z = x.astype(np.float64) @ projection.astype(np.float64)
    if z.shape[1] != text_prototypes.shape[1]:
        raise PrototypeError(f"joint-space dim {z.shape[1]} does not match the text prototypes' "
                             f"{text_prototypes.shape[1]}")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    zt = F.normalize(torch.from_numpy(np.asarray(z, dtype=np.float32)), dim=1)
    q_all = torch.softmax(zt @ F.normalize(torch.from_numpy(text_prototypes.astype(np.float32)), dim=1).T / tau_a,
                          dim=1)
    init_t = torch.from_numpy(np.ascontiguousarray(init, dtype=np.float32))
    c = torch.nn.Parameter(init_t.clone())
    opt = torch.optim.AdamW([c], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = len(xt)
    curve = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        sums, batches = np.zeros(3), 0
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            loss, ce, kl = contrastive_loss(xt[idx], q_all[idx], c, tau_s, lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums += [loss.item(), ce.item(), kl.item()]
            batches += 1
        curve.append({"epoch": epoch + 1, **dict(zip(("loss", "ce", "kl"), (sums / batches).tolist()))})
    with torch.no_grad():
        trained = F.normalize(c.detach(), dim=1) * init_t.norm(dim=1, keepdim=True)
        assign = (F.normalize(xt, dim=1) @ F.normalize(trained, dim=1).T).argmax(dim=1)
        use = torch.bincount(assign, minlength=len(trained)).double() / n
        start = contrastive_loss(xt, q_all, init_t, tau_s, lam)
        end = contrastive_loss(xt, q_all, trained, tau_s, lam)
    meta = {"train": {"tau_s": tau_s, "tau_a": tau_a, "lambda": lam, "epochs": epochs, "lr": lr,
                      "batch_size": batch_size, "seed": seed, "pool_size": n,
                      "loss_before": float(start[0]), "loss_after": float(end[0])}}
    return TrainResult(trained.numpy().astype(np.float32), curve, use.numpy(), meta)
