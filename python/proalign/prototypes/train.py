"""METHOD.md Step 4: patch-text contrastive refinement of the visual prototypes.

Teacher (fixed): q_ik = softmax_k(z_i · t_k / τ_a), the text allocation of Step 3, z_i = normalize(x_i W).
Student: p_ik = softmax_k(cos(x_i, c_k) / τ_s).
Loss per batch: mean_i H(q_i, p_i) + λ · KL(mean_i p_i || mean_i q_i). The second term keeps the
student's average use of the prototypes close to the teacher's (the anti-collapse term).

Our choices (recorded in the result's metadata):
- Only the direction of c_k enters the loss (and the ProAlign attention), so the optimiser works on
  unit-norm copies of the initial prototypes and each trained prototype gets its initial norm back
  (norm-sensitive uses, e.g. PANTHER's prior means, keep their scale). On unit vectors Adam's
  per-coordinate step makes `lr` mean the same for every feature scale: a step turns a prototype
  by at most about lr·sqrt(d) radians. Default lr = 1e-3 (≈ 0.02 rad per step at d = 512; 10 epochs
  of a 100,000-patch pool at batch 1024 are ~1,000 steps).
- AdamW with weight_decay = 0: the loss is scale-invariant, so decay would only shrink the vectors
  and so enlarge the effective step.
- Each epoch is a seeded permutation (torch.Generator) cut into ceil(P / batch_size) nearly equal
  batches (no tiny last batch with a noisy KL estimate). CPU runs are bitwise reproducible.
- The loss curve reports, per epoch, the means over its batches of the optimised quantities;
  `loss_before`/`loss_after` are the loss over the whole pool.
- Usage: the share of pool patches whose argmax_k p_ik (= nearest prototype by cosine) is k.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PrototypeError
from .build import collapsed, usage
from .io import prototype_hash, save_prototypes

_EPS = 1e-30  # floor inside the KL's logs (float32 keeps it: its smallest normal is ~1e-38)


@dataclass
class TrainResult:
    prototypes: np.ndarray  # (K, d) float32
    loss_curve: list[dict]  # per epoch: {"epoch", "total", "ce", "kl"} (means over the epoch's batches)
    usage: np.ndarray  # (K,) float64: share of pool patches whose argmax_k p_ik is k
    meta: dict = field(default_factory=dict)

    @property
    def collapsed(self) -> list[int]:
        """Prototypes with < 0.1% of the assignments (build.COLLAPSE_USAGE)."""
        return collapsed(self.usage)


class CollapsedSetError(PrototypeError):
    """A trained set with prototypes under 0.1% usage, refused unless forced."""

    def __init__(self, collapsed_ids: list[int]):
        self.collapsed = collapsed_ids
        super().__init__(f"collapsed prototype set: prototypes {collapsed_ids} have < 0.1% usage; not saved "
                         "(use --force to save anyway)")


def contrastive_loss(x: torch.Tensor, q: torch.Tensor, c: torch.Tensor, tau_s: float,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kl) of one batch: x (b, d) features, q (b, K) teacher rows, c (K, d) prototypes."""
    logp = torch.log_softmax(F.normalize(x, dim=1) @ F.normalize(c, dim=1).T / tau_s, dim=1)
    ce = -(q * logp).sum(dim=1).mean()
    p_mean, q_mean = logp.exp().mean(dim=0), q.mean(dim=0)
    kl = (p_mean * (torch.log(p_mean.clamp_min(_EPS)) - torch.log(q_mean.clamp_min(_EPS)))).sum()
    return ce + lam * kl, ce, kl


def teacher(z: np.ndarray, text_prototypes: np.ndarray, tau_a: float) -> np.ndarray:
    """q (P, K) float32 = softmax_k(normalize(z_i) · normalize(t_k) / τ_a), computed in float64."""
    z64 = np.asarray(z, dtype=np.float64)
    t64 = np.asarray(text_prototypes, dtype=np.float64)
    z64 = z64 / np.maximum(np.linalg.norm(z64, axis=1, keepdims=True), 1e-12)
    t64 = t64 / np.maximum(np.linalg.norm(t64, axis=1, keepdims=True), 1e-12)
    s = z64 @ t64.T / tau_a
    s -= s.max(axis=1, keepdims=True)
    q = np.exp(s)
    return (q / q.sum(axis=1, keepdims=True)).astype(np.float32)


def pool_loss(x: torch.Tensor, q: torch.Tensor, c: torch.Tensor, tau_s: float, lam: float,
              chunk: int = 65536) -> tuple[float, float, float]:
    """(total, ce, kl) over the whole pool, in chunks (the KL needs the pool-wide mean of p)."""
    with torch.no_grad():
        cn = F.normalize(c, dim=1)
        ce_sum, p_sum = 0.0, torch.zeros(c.shape[0], dtype=torch.float64)
        for s in range(0, len(x), chunk):
            logp = torch.log_softmax(F.normalize(x[s:s + chunk], dim=1) @ cn.T / tau_s, dim=1)
            ce_sum += float(-(q[s:s + chunk] * logp).sum(dtype=torch.float64))
            p_sum += logp.exp().sum(dim=0, dtype=torch.float64)
        p_mean, q_mean = p_sum / len(x), q.to(torch.float64).mean(dim=0)
        kl = float((p_mean * (p_mean.clamp_min(_EPS).log() - q_mean.clamp_min(_EPS).log())).sum())
        ce = ce_sum / len(x)
    return ce + lam * kl, ce, kl


def _check(x: np.ndarray, z: np.ndarray | None, text_prototypes: np.ndarray, projection: np.ndarray | None,
           init: np.ndarray, tau_s: float, tau_a: float, lam: float, batch_size: int, epochs: int) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise PrototypeError(f"the pool must be (P, d) with P > 0, got shape {x.shape}")
    if init.ndim != 2 or init.shape[1] != x.shape[1]:
        raise PrototypeError(f"initial prototypes have shape {init.shape}, features have dim {x.shape[1]}")
    if text_prototypes.ndim != 2 or text_prototypes.shape[0] != init.shape[0]:
        raise PrototypeError(f"{init.shape[0]} initial prototypes but text prototypes of shape "
                             f"{text_prototypes.shape}: one text prototype per visual prototype")
    if z is None:
        if projection is None:
            raise PrototypeError("the teacher needs the joint-space patches z or the projection W (d, D)")
        if projection.ndim != 2 or projection.shape[0] != x.shape[1]:
            raise PrototypeError(f"projection has shape {projection.shape}, features have dim {x.shape[1]}")
        joint = projection.shape[1]
    else:
        if z.shape[0] != x.shape[0] or z.ndim != 2:
            raise PrototypeError(f"z has shape {z.shape}, the pool has {len(x)} patches")
        joint = z.shape[1]
    if joint != text_prototypes.shape[1]:
        raise PrototypeError(f"joint-space dim {joint} does not match the text prototypes' {text_prototypes.shape[1]}")
    if not (tau_s > 0 and tau_a > 0 and lam >= 0 and batch_size >= 1 and epochs >= 0):
        raise PrototypeError(f"need tau_s > 0, tau_a > 0, lambda >= 0, batch_size >= 1, epochs >= 0 "
                             f"(got {tau_s}, {tau_a}, {lam}, {batch_size}, {epochs})")
    for name, a in (("pool features", x), ("initial prototypes", init), ("text prototypes", text_prototypes)):
        if not np.isfinite(a).all():
            raise PrototypeError(f"{name} contain NaN or inf")
    if (np.linalg.norm(init, axis=1) == 0).any():
        raise PrototypeError("an initial prototype is the zero vector (it has no direction to train)")


def train_prototypes(x: np.ndarray, z: np.ndarray | None, text_prototypes: np.ndarray,
                     projection: np.ndarray | None, init: np.ndarray, *, tau_s: float = 0.05, tau_a: float = 0.01,
                     lam: float = 1.0, epochs: int = 10, lr: float = 1e-3, batch_size: int = 1024,
                     seed: int = 0, weight_decay: float = 0.0) -> TrainResult:
    """Refine `init` (K, d) on the pool `x` (P, d) against the text teacher.

    z (P, D): the pool in the joint space; None computes z = normalize(x @ projection). `tau_a`
    should be the encoder's 1/logit_scale (0.01 for CONCH)."""
    x = np.asarray(x)
    init = np.asarray(init, dtype=np.float32)
    text_prototypes = np.asarray(text_prototypes)
    _check(x, z, text_prototypes, projection, init, tau_s, tau_a, lam, batch_size, epochs)
    if z is None:
        z = np.asarray(x, dtype=np.float64) @ np.asarray(projection, dtype=np.float64)
    q_np = teacher(z, text_prototypes, tau_a)
    xt = F.normalize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dim=1)
    qt = torch.from_numpy(q_np)
    init_t = torch.from_numpy(np.ascontiguousarray(init))
    u = torch.nn.Parameter(F.normalize(init_t, dim=1).clone())  # unit-norm directions being trained
    opt = torch.optim.AdamW([u], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(xt)
    n_batches = math.ceil(n / batch_size)
    before = pool_loss(xt, qt, u.detach(), tau_s, lam)
    curve: list[dict] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        sums = torch.zeros(3, dtype=torch.float64)
        for idx in torch.tensor_split(perm, n_batches):
            total, ce, kl = contrastive_loss(xt[idx], qt[idx], u, tau_s, lam)
            if not torch.isfinite(total):
                raise PrototypeError(f"the loss became {float(total)} in epoch {epoch + 1}; "
                                     "try a smaller --lr or a larger --tau-s")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += torch.tensor([float(v.detach()) for v in (total, ce, kl)], dtype=torch.float64) * len(idx)
        mean = (sums / n).tolist()
        curve.append({"epoch": epoch + 1, "total": mean[0], "ce": mean[1], "kl": mean[2]})
    with torch.no_grad():
        trained = F.normalize(u.detach(), dim=1) * init_t.norm(dim=1, keepdim=True)
        after = pool_loss(xt, qt, trained, tau_s, lam)
    c = trained.numpy().astype(np.float32)
    use = usage(np.asarray(x, dtype=np.float32), c)
    teacher_use = np.bincount(q_np.argmax(axis=1), minlength=len(c)) / n
    meta = {"train": {
        "tau_s": tau_s, "tau_a": tau_a, "lambda": lam, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "seed": seed, "optimizer": "AdamW", "weight_decay": weight_decay, "steps": epochs * n_batches,
        "pool_size": n, "init_hash": prototype_hash(init), "parametrisation": "unit directions, initial norms kept",
        "loss_before": dict(zip(("total", "ce", "kl"), before)), "loss_after": dict(zip(("total", "ce", "kl"), after)),
        "teacher_usage": [round(float(v), 6) for v in teacher_use], "collapsed": collapsed(use)}}
    return TrainResult(c, curve, use, meta)


def save_trained(path: str | os.PathLike, result: TrainResult, meta: dict | None = None, *,
                 force: bool = False) -> str:
    """Write the trained set with `meta` + the loss curve, usage and settings (io.save_prototypes),
    and the report `<path>.train.json`; returns the set's hash. A collapsed set raises
    CollapsedSetError and writes nothing, unless `force`."""
    if result.collapsed and not force:
        raise CollapsedSetError(result.collapsed)
    meta = {**(meta or {}), "usage": [round(float(u), 6) for u in result.usage], "loss_curve": result.loss_curve,
            "train": result.meta["train"]}
    h = save_prototypes(path, result.prototypes, meta)
    report = {"prototypes": str(path), "hash": h, "loss_curve": result.loss_curve, "usage": meta["usage"],
              "train": result.meta["train"]}
    Path(str(path) + ".train.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return h


__all__ = ["CollapsedSetError", "TrainResult", "contrastive_loss", "pool_loss", "save_trained", "teacher",
           "train_prototypes"]
