"""Building a prototype set from a cohort's patch features (METHOD.md Step 3).

1. A seeded random pool of patches: an equal quota from every slide, rows drawn uniformly
   without replacement (never "the first rows").
2. `init=kmeans`: seeded spherical k-means (k-means++ start) on the pool; each prototype is the
   mean of the raw features of its cluster, so it lives in feature space (PANTHER needs that).
   `init=text`: q_ik = softmax_k(z_i . t_k / tau_a) with z_i = normalize(x_i W); c_k = mean of
   x_i over the top M_k = 1% of the pool ranked by q_ik.
3. Usage: the fraction of pool patches whose nearest (cosine) prototype is k. A set where some
   prototype has less than 0.1% usage is collapsed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import h5py
import numpy as np

from ..errors import FeatureFileError, PrototypeError
from ..features.io import FeatureFileEntry, read_features, read_rows

log = logging.getLogger(__name__)
COLLAPSE_USAGE = 1e-3


@dataclass
class Pool:
    x: np.ndarray  # (P, d) float32
    slide_ids: list[str]  # slides that contributed rows
    skipped: dict[str, str] = field(default_factory=dict)  # slide id -> reason


def _n_rows(entry: FeatureFileEntry) -> int:
    if entry.path.suffix == ".h5":
        with h5py.File(entry.path, "r") as f:
            if "features" not in f:
                raise FeatureFileError(entry.path, f"no 'features' dataset (found: {sorted(f.keys())})", entry.slide_id)
            shape = f["features"].shape
            return shape[1] if len(shape) == 3 else shape[0]
    return len(read_features(entry.path, entry.slide_id).features)


def sample_pool(entries: Sequence[FeatureFileEntry], pool_size: int, seed: int) -> Pool:
    """An equal per-slide quota of uniformly drawn rows, `pool_size` rows in all at most."""
    if not entries:
        raise PrototypeError("no slides to sample a prototype pool from")
    quota = math.ceil(pool_size / len(entries))
    parts, ids, skipped = [], [], {}
    for i, e in enumerate(entries):
        try:
            n = _n_rows(e)
            # One generator per slide (seed, slide index): the pool does not depend on I/O order.
            rng = np.random.default_rng([seed, i])
            rows = np.sort(rng.choice(n, size=min(quota, n), replace=False))
            x = np.asarray(read_rows(e.path, rows), dtype=np.float32)
            if not np.isfinite(x).all():
                raise FeatureFileError(e.path, "sampled feature rows contain NaN or inf", e.slide_id)
        except (FeatureFileError, OSError, ValueError, RuntimeError) as err:
            skipped[e.slide_id] = str(err)
            log.warning("skipping %s for the prototype pool: %s", e.slide_id, err)
            continue
        parts.append(x)
        ids.append(e.slide_id)
    if not parts:
        raise PrototypeError("no readable slide for the prototype pool: " + "; ".join(skipped.values()))
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise PrototypeError(f"slides have different feature dims {sorted(dims)}; one encoder per prototype set")
    return Pool(np.concatenate(parts)[:pool_size], ids, skipped)


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Seeded spherical k-means; returns the (k, d) means of the raw features per cluster."""
    if len(x) < k:
        raise PrototypeError(f"pool has {len(x)} patches, fewer than k={k}")
    rng = np.random.default_rng(seed)
    xn = _normalize(x.astype(np.float64))
    # k-means++ start on cosine distance.
    centers = [xn[rng.integers(len(xn))]]
    dist = 1 - xn @ centers[0]
    for _ in range(1, k):
        p = np.maximum(dist, 0)
        idx = rng.choice(len(xn), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(xn))
        centers.append(xn[idx])
        dist = np.minimum(dist, 1 - xn @ xn[idx])
    c = np.stack(centers)
    assign = None
    for _ in range(iters):
        sim = xn @ c.T
        new = sim.argmax(axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = xn[assign == j]
            if len(members):
                c[j] = _normalize(members.sum(axis=0, keepdims=True))[0]
            else:  # re-seed an empty cluster at the patch worst served by its centre
                c[j] = xn[np.argmin(sim.max(axis=1))]
    assign = (xn @ c.T).argmax(axis=1)
    means = np.stack([x[assign == j].mean(axis=0) if (assign == j).any() else c[j] for j in range(k)])
    return means.astype(np.float32)


def text_allocation(x: np.ndarray, text_prototypes: np.ndarray, projection: np.ndarray,
                    tau_a: float = 0.01, top_fraction: float = 0.01) -> tuple[np.ndarray, list[int]]:
    """METHOD.md Step 3: (prototypes (K, d), indices of types no patch prefers)."""
    if projection.shape[0] != x.shape[1]:
        raise PrototypeError(f"projection maps dim {projection.shape[0]}, features have dim {x.shape[1]}")
    if projection.shape[1] != text_prototypes.shape[1]:
        raise PrototypeError(f"projection gives dim {projection.shape[1]}, text prototypes have dim "
                             f"{text_prototypes.shape[1]}")
    z = _normalize(x.astype(np.float64) @ projection.astype(np.float64))
    s = z @ _normalize(text_prototypes.astype(np.float64)).T / tau_a
    s -= s.max(axis=1, keepdims=True)
    q = np.exp(s)
    q /= q.sum(axis=1, keepdims=True)  # (P, K)
    k = q.shape[1]
    m = max(1, int(round(top_fraction * len(x))))
    top = np.argsort(-q, axis=0, kind="stable")[:m]  # (m, K)
    protos = np.stack([x[top[:, j]].astype(np.float64).mean(axis=0) for j in range(k)])
    unpreferred = [j for j in range(k) if q[:, j].max() < 1.0 / k]
    return protos.astype(np.float32), unpreferred


def usage(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Fraction of patches whose nearest (cosine) prototype is each prototype: (K,)."""
    assign = (_normalize(x) @ _normalize(prototypes).T).argmax(axis=1)
    return np.bincount(assign, minlength=len(prototypes)) / len(x)


def collapsed(use: np.ndarray) -> list[int]:
    return [int(j) for j in np.flatnonzero(use < COLLAPSE_USAGE)]


@dataclass
class PrototypeSet:
    prototypes: np.ndarray  # (K, d) float32
    meta: dict
    usage: np.ndarray  # (K,)

    @property
    def collapsed(self) -> list[int]:
        return collapsed(self.usage)


def build_prototype_set(
    entries: Sequence[FeatureFileEntry],
    init: str = "kmeans",
    k: int = 16,
    seed: int = 0,
    pool_size: int = 100_000,
    text_prototypes: np.ndarray | None = None,
    projection: np.ndarray | None = None,
    tau_a: float = 0.01,
    top_fraction: float = 0.01,
    initial: np.ndarray | None = None,
) -> PrototypeSet:
    """Sample the pool from feature files and build prototypes by `init` = kmeans | text | file."""
    pool = sample_pool(entries, pool_size, seed)
    return prototypes_from_pool(pool, init, k, seed, text_prototypes, projection, tau_a, top_fraction, initial)


def prototypes_from_pool(
    pool: Pool,
    init: str = "kmeans",
    k: int = 16,
    seed: int = 0,
    text_prototypes: np.ndarray | None = None,
    projection: np.ndarray | None = None,
    tau_a: float = 0.01,
    top_fraction: float = 0.01,
    initial: np.ndarray | None = None,
) -> PrototypeSet:
    """Build prototypes from a sampled pool (of feature files or of slides) by `init`."""
    meta: dict = {"init": init, "seed": seed, "pool_size": len(pool.x), "n_slides": len(pool.slide_ids),
                  "skipped_slides": pool.skipped}
    if init == "kmeans":
        c = spherical_kmeans(pool.x, k, seed)
    elif init == "text":
        if text_prototypes is None or projection is None:
            raise PrototypeError("init=text needs text prototypes (K, D) and a projection matrix (d, D)")
        c, unpreferred = text_allocation(pool.x, text_prototypes, projection, tau_a, top_fraction)
        meta.update(tau_a=tau_a, top_fraction=top_fraction, unpreferred_types=unpreferred)
        for j in unpreferred:
            log.warning("type %d: no patch prefers it (max q < 1/K); kept the mean of its top patches", j)
    elif init == "file":
        if initial is None:
            raise PrototypeError("init=file needs a prototype file")
        c = initial.astype(np.float32)
    else:
        raise PrototypeError(f"unknown init {init!r}; choose kmeans, text or file")
    if c.shape[1] != pool.x.shape[1]:
        raise PrototypeError(f"prototypes have dim {c.shape[1]}, features have dim {pool.x.shape[1]}")
    use = usage(pool.x, c)
    meta["usage"] = [round(float(u), 6) for u in use]
    return PrototypeSet(c, meta, use)
