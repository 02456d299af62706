"""Aggregation of a slide whose patch features arrive in batches (the slides pipeline): each batch
is folded into a small per-prototype state and dropped, so memory stays bounded for a 100,000-patch
slide. The state is exactly what the fused kernels keep per block (running max, softmax sum and
weighted sum per prototype for `proalign`; Σq, Σqx, Σqx² for `panther`; sums and counts for the
rest), merged in float64; `result()` equals `aggregate()` on the concatenated features.

Per-batch work materialises only batch x K similarities (a batch is a few hundred patches).
`panther` with more than one EM step needs every patch for each step: those features are kept
(on the CPU) and aggregated at the end.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..ops.panther_moments.reference import PANTHER_EM_STEPS, PANTHER_EPS, PANTHER_PRIOR_STRENGTH
from ..ops.proalign_attention import host
from . import METHODS, aggregate, with_defaults


class StreamingAggregator:
    def __init__(self, prototypes, method: str = "proalign", tau: float | Sequence[float] | None = None, *,
                 over: str | None = None, moments: int | None = None, prior: float | Sequence[float] | None = None,
                 queries=None, eps: float = PANTHER_EPS, prior_strength: float = PANTHER_PRIOR_STRENGTH,
                 em_steps: int = PANTHER_EM_STEPS):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
        given = {k: v for k, v in (("over", over), ("moments", moments), ("prior", prior)) if v is not None}
        tau, opts = with_defaults(method, tau, given)  # the default reading for what is not given
        self.method = method
        self.over, self.moments, self.prior = opts.get("over"), opts.get("moments"), opts.get("prior")
        self.several = not isinstance(tau, (int, float))
        self.taus = [float(t) for t in (tau if self.several else [tau])]
        if method == "proalign" and (not self.taus or min(self.taus) <= 0):
            raise ValueError(f"tau must be > 0, got {self.taus}")
        # a tau that repeats with another prior (the default reading's sharpest) is summed once
        self.distinct_taus, self.rows = host.distinct_taus(self.taus)
        self.c = torch.as_tensor(prototypes).double()
        self.shift = host.second_moment_shift(self.c).double()  # moments=2: sums of (x - shift)^2
        self.queries = None if queries is None else torch.as_tensor(queries).double()
        self.eps, self.prior_strength, self.em_steps = eps, prior_strength, em_steps
        self.n = 0
        self._state: dict[str, torch.Tensor] = {}
        self._kept: list[torch.Tensor] = []  # panther with em_steps > 1 only

    def update(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Fold a batch of patch features (b, d) (and, for space=joint, their keys) into the state."""
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.c.shape[1]:
            raise ValueError(f"batch must be (b, {self.c.shape[1]}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        dev = x.device
        x = x.double()
        c = self.c.to(dev)
        self.n += x.shape[0]
        if self.method == "panther" and self.em_steps != 1:
            self._kept.append(x.float().cpu())
            return
        part = getattr(self, f"_{self.method}")(x, c, None if keys is None else torch.as_tensor(keys).double())
        for name, v in part.items():
            if name.startswith(("m_", "lse_")):  # log-sum-exp terms: merged with rescaling below
                continue
            v = v.cpu()
            self._state[name] = self._state[name] + v if name in self._state else v
        self._merge_lse(part)

    # ---- per-method partial states of one batch ----
    def _proalign(self, x, c, keys):
        k_in = x if keys is None else keys
        q = c if self.queries is None else self.queries.to(x.device)
        cos = F.normalize(k_in, dim=1) @ F.normalize(q, dim=1).T
        out = {}
        x2 = (x - self.shift.to(x.device)) ** 2 if self.moments == 2 else None
        for t, tau in enumerate(self.distinct_taus):
            s = cos / tau
            per_patch = torch.softmax(s, dim=1)
            out[f"pi_{t}"] = per_patch.sum(0)
            if self.over == "patches":
                m = s.max(0).values
                e = torch.exp(s - m)
                out[f"m_{t}"], out[f"lse_l_{t}"], out[f"lse_acc_{t}"] = m, e.sum(0), e.T @ x
                if x2 is not None:
                    out[f"lse_acc2_{t}"] = e.T @ x2
            else:
                out[f"w_{t}"], out[f"acc_{t}"] = per_patch.sum(0), per_patch.T @ x
                if x2 is not None:
                    out[f"acc2_{t}"] = per_patch.T @ x2
        return out

    def _panther(self, x, c, keys):
        d, k = x.shape[1], c.shape[0]
        var = torch.full_like(c, self.eps)
        maha = (x * x) @ (1 / var).T - 2 * x @ (c / var).T + (c * c / var).sum(1)[None, :]
        loglik = -0.5 * (d * math.log(2 * math.pi) + torch.log(var).sum(1)[None, :] + maha)
        q = torch.softmax(loglik + math.log(1.0 / k), dim=1)
        return {"nq": q.sum(0), "s1": q.T @ x, "s2": q.T @ (x * x)}

    def _assign(self, x, c):
        xn = F.normalize(x, dim=1)
        return xn, (xn @ F.normalize(c, dim=1).T).argmax(1)

    def _h2t(self, x, c, keys):
        xn, a = self._assign(x, c)
        k = c.shape[0]
        return {"sums": torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, a, xn),
                "counts": torch.bincount(a, minlength=k).double()}

    def _protocount(self, x, c, keys):
        return {"counts": torch.bincount(self._assign(x, c)[1], minlength=c.shape[0]).double()}

    def _mean(self, x, c, keys):
        return {"sum": x.sum(0)}

    def _merge_lse(self, part: dict) -> None:
        """Online softmax merge (flash-attention style) of the per-prototype exp-sums."""
        for name in [n for n in part if n.startswith("m_")]:
            t = name[2:]
            m_new = part[name].cpu()
            new = {f"l_{t}": part[f"lse_l_{t}"].cpu(), f"acc_{t}": part[f"lse_acc_{t}"].cpu()}
            if f"lse_acc2_{t}" in part:
                new[f"acc2_{t}"] = part[f"lse_acc2_{t}"].cpu()
            if name not in self._state:
                self._state[name] = m_new
                self._state.update(new)
                continue
            m_old = self._state[name]
            m = torch.maximum(m_old, m_new)
            a, b = torch.exp(m_old - m), torch.exp(m_new - m)
            self._state[name] = m
            for key, v in new.items():
                scale_old, scale_new = (a, b) if v.ndim == 1 else (a[:, None], b[:, None])
                self._state[key] = self._state[key] * scale_old + v * scale_new

    def result(self) -> torch.Tensor:
        """The slide embedding, float32 on the CPU, shaped as `aggregate` returns it."""
        if self.n == 0:
            raise ValueError("no patches were added")
        st, n = self._state, self.n
        if self.method == "proalign":  # the fused kernels' finishing step, on one slide's merged sums
            ts = range(len(self.distinct_taus))
            weight = "l" if self.over == "patches" else "w"

            def stacked(name: str) -> torch.Tensor:
                return torch.stack([st[f"{name}_{t}"] for t in ts])[None]
            sums = (stacked("pi"), stacked(weight), stacked("acc"), stacked("acc2") if self.moments == 2 else None)
            out = host.finish(*host.rows_of(sums, self.rows), torch.tensor([n]), self.c, self.shift,
                                  self.over, self.prior)[0]
            return (out if self.several else out[0]).float()
        if self.method == "panther":
            if self.em_steps != 1:
                return torch.as_tensor(aggregate(torch.cat(self._kept), self.c.float(), "panther", eps=self.eps,
                                                 prior_strength=self.prior_strength, em_steps=self.em_steps))
            c, tau = self.c, self.prior_strength
            n_k = st["nq"] + tau
            mu = (st["s1"] + tau * c) / n_k[:, None]
            var = (st["s2"] + tau * (self.eps + c * c)) / n_k[:, None] - mu * mu
            return torch.cat([n_k / n_k.sum(), mu.reshape(-1), var.reshape(-1)]).float()
        if self.method == "h2t":
            return (st["sums"] / st["counts"].clamp_min(1)[:, None]).reshape(-1).float()
        if self.method == "protocount":
            return (st["counts"] / n).float()
        return (st["sum"] / n).float()
