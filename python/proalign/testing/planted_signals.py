"""Planted-signal cohorts of patch features with the structure of real ones, and the prototype
regimes the quality suite (`bench/quality.py`) tests every aggregation method under.

Features (d = 512 like CONCH): every tissue type has a centre on a shared offset (real encoder
features all lie in one cone: cos between type centres ~0.4-0.8), an anisotropic spread (a
low-rank basis with decaying scales, plus isotropic noise) and every slide a small stain-like
offset shared by all its patches. Slides have lognormal patch counts (a few hundred to tens of
thousands) and per-slide Dirichlet mixtures of the common types around uneven cohort shares.

Signals (the answer is known):
- `rare`: class-1 slides carry a rare type (0.5-3% of patches, a micro-metastasis) that no
  class-0 slide has;
- `proportion`: one common type takes +`PROPORTION_SHIFT` of the patches in class 1;
- `morphology`: the patches of one common type shift along a direction in class 1 (same mixtures);
- `survival`: the time to event falls with the share of one common type (C-index is the metric);
- `null`: the label is a coin flip, independent of the features (everything must stay at chance).

Prototype regimes:
- `kmeans`: spherical k-means (K = 8) on a seeded pool: may miss the rare type;
- `text`: the true type centres, rare type included, each moved by misalignment noise (what good
  text prototypes give);
- `joint`: METHOD.md Step 3: text prototypes in a joint space (a random projection of the type
  centres plus noise) allocate the pool's patches; prototypes are the means of the top 1%.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..prototypes.build import spherical_kmeans, text_allocation

SIGNALS = ("rare", "proportion", "morphology", "survival", "null")
REGIMES = ("kmeans", "text", "joint")

N_COMMON = 10  # common tissue types; type N_COMMON is the rare one
RANK = 8  # rank of each type's anisotropic spread
PROPORTION_SHIFT = 0.10  # absolute share gained by the shifted type in class 1
MORPHOLOGY_SHIFT = 0.35  # shift of one type's patches (in units of its spread's largest scale)
SIGNAL_TYPE = 3  # the common type the proportion, morphology and survival signals act on
# Feature scale: centre norms ~11, within-type per-dimension std ~0.1-0.3, like pooled encoder
# features. ProAlign, H2T and the counts are cosine-based and do not see it; PANTHER's unit prior
# variance does (at scale 1 every patch is equally likely under every component).
SCALE = 8.0


@dataclass
class Cohort:
    """Slides (a list of (N_s, d) float32 arrays), one label per slide (class or risk), patients."""
    signal: str
    slides: list[np.ndarray]
    patients: list[str]
    y: np.ndarray  # class (int) for classification signals
    time: np.ndarray | None  # survival only
    event: np.ndarray | None
    centres: np.ndarray  # (N_COMMON + 1, d) true type centres, the rare type last
    seed: int

    @property
    def task(self) -> str:
        return "survival" if self.signal == "survival" else "classify"


@dataclass
class _Types:
    centres: np.ndarray  # (G, d)
    bases: np.ndarray  # (G, RANK, d) orthonormal rows
    scales: np.ndarray  # (RANK,)
    noise: float
    shares: np.ndarray  # (N_COMMON,) cohort mean mixture of the common types


def _types(d: int, rng: np.random.Generator) -> _Types:
    g = N_COMMON + 1
    offset = rng.standard_normal(d)
    offset *= 1.0 / np.linalg.norm(offset)
    dirs = rng.standard_normal((g, d))
    dirs *= 0.9 / np.linalg.norm(dirs, axis=1, keepdims=True)
    centres = offset + dirs  # cos between centres ~0.5-0.7
    bases = np.stack([np.linalg.qr(rng.standard_normal((d, RANK)))[0].T for _ in range(g)])
    scales = 0.35 * 0.75 ** np.arange(RANK)  # a decaying spectrum: the largest axis ~0.35
    shares = rng.dirichlet(np.full(N_COMMON, 3.0))
    return _Types(SCALE * centres, bases, SCALE * scales, noise=SCALE * 0.25 / np.sqrt(d), shares=shares)


def _patches(tp: _Types, types: np.ndarray, stain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, d = len(types), tp.centres.shape[1]
    z = rng.standard_normal((n, RANK)) * tp.scales
    x = tp.centres[types] + np.einsum("nr,nrd->nd", z, tp.bases[types]) + tp.noise * rng.standard_normal((n, d))
    return x + stain


def make_cohort(signal: str, seed: int, n_slides: int = 200, d: int = 512, median_patches: int = 1500,
                max_patches: int = 20000) -> Cohort:
    """A seeded cohort of `n_slides` slides (every fourth patient has two) with `signal` planted."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    rng = np.random.default_rng([seed, SIGNALS.index(signal)])
    tp = _types(d, rng)
    morph_dir = tp.bases[SIGNAL_TYPE][-1]  # along the type's weakest axis: hidden in its spread
    slides, patients, ys, risks = [], [], [], []
    p = 0
    while len(slides) < n_slides:
        cls = int(rng.integers(2))
        risk = float(rng.uniform())
        for _ in range(2 if p % 4 == 3 and len(slides) + 1 < n_slides else 1):
            n = int(np.clip(rng.lognormal(np.log(median_patches), 0.8), 200, max_patches))
            mix = rng.dirichlet(8.0 * tp.shares)
            if signal == "proportion" and cls == 1:
                mix = (1 - PROPORTION_SHIFT) * mix
                mix[SIGNAL_TYPE] += PROPORTION_SHIFT
            if signal == "survival":  # the type's share rises with the patient's risk
                mix = (1 - 0.3 * risk) * mix
                mix[SIGNAL_TYPE] += 0.3 * risk
            rare = float(rng.uniform(0.005, 0.03)) if signal == "rare" and cls == 1 else 0.0
            mix = np.append((1 - rare) * mix, rare)
            types = rng.choice(N_COMMON + 1, size=n, p=mix / mix.sum())
            stain = SCALE * 0.15 * rng.standard_normal(d) / np.sqrt(d)
            x = _patches(tp, types, stain, rng)
            if signal == "morphology" and cls == 1:
                x[types == SIGNAL_TYPE] += MORPHOLOGY_SHIFT * tp.scales[0] * morph_dir
            slides.append(x.astype(np.float32))
            patients.append(f"PAT-{seed:02d}-{p:05d}")
            ys.append(cls)
            risks.append(risk)
        p += 1
    y = np.array(ys)
    if signal == "null":
        y = np.random.default_rng([seed, 99]).integers(2, size=len(y))  # independent of everything
    time = event = None
    if signal == "survival":
        pr = np.array(risks)
        pat_noise = {q: float(rng.standard_normal()) for q in dict.fromkeys(patients)}
        time = np.exp(-2.5 * pr + 0.5 * np.array([pat_noise[q] for q in patients]))
        censor = {q: float(rng.uniform()) < 0.3 for q in dict.fromkeys(patients)}
        event = np.array([0 if censor[q] else 1 for q in patients])
        time = np.where(event == 1, time, time * np.array([0.5 + 0.5 * rng.uniform() for _ in patients]))
    return Cohort(signal, slides, patients, y, time, event, tp.centres.astype(np.float32), seed)


def sample_pool(slides: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """The same quota of rows from every slide, drawn uniformly at random (as `prototypes build`)."""
    rng = np.random.default_rng([seed, 5])
    quota = max(1, size // len(slides))
    return np.concatenate([s[rng.choice(len(s), size=min(quota, len(s)), replace=False)] for s in slides])


def prototypes_for(cohort: Cohort, regime: str, k_kmeans: int = 8, pool_size: int = 50000) -> np.ndarray:
    """The (K, d) prototypes of `regime` for `cohort` (seeded by the cohort's seed)."""
    rng = np.random.default_rng([cohort.seed, 17, REGIMES.index(regime)])
    c = cohort.centres.astype(np.float64)
    if regime == "kmeans":
        return spherical_kmeans(sample_pool(cohort.slides, pool_size, cohort.seed), k_kmeans, cohort.seed)
    if regime == "text":  # misaligned by ~0.25 in norm: cos to the true centre ~0.98
        return (c + 0.25 * rng.standard_normal(c.shape) / np.sqrt(c.shape[1])).astype(np.float32)
    if regime == "joint":
        d, dj = c.shape[1], 256
        w = rng.standard_normal((d, dj)) / np.sqrt(d)  # the vision tower's projection
        t = c @ w
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        t = t + 0.15 * rng.standard_normal(t.shape) / np.sqrt(dj)  # text/vision misalignment
        protos, _ = text_allocation(sample_pool(cohort.slides, pool_size, cohort.seed), t, w)
        return protos
    raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
