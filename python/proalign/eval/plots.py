"""Pictures as PNG files, drawn with matplotlib's Agg renderer (no display, no pyplot state).

Every figure has a fixed size in inches and is saved without tight cropping, so a PNG's pixel
size is `figsize * dpi` (the `*_size` helpers say it in advance; the tests rely on it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics as M

log = logging.getLogger("proalign.eval")

DPI = 100
PANEL_IN = 3.0  # heatmap panel width (inches)


def _figure(w_in: float, h_in: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out


# --- prototype names ---------------------------------------------------------------------------

def prototype_names(k: int, meta: dict | None = None, descriptions: str | None = None) -> list[str]:
    """Type names for K prototypes: from a description set (shipped name or JSON path), else the
    prototype file's metadata (`type_names`, `names`, `types`, or a nested description set), else
    "0".."K-1". A list of the wrong length is ignored."""
    cands: list = []
    if descriptions:
        cands.append(_names_from_descriptions(descriptions))
    meta = meta or {}
    for key in ("type_names", "names", "types", "descriptions", "description_set"):
        v = meta.get(key)
        if isinstance(v, dict):
            v = v.get("type_names") or v.get("types") or v.get("names")
        if isinstance(v, list):
            cands.append([t.get("name") if isinstance(t, dict) else t for t in v])
    for i, names in enumerate(cands):
        if names and len(names) == k and all(isinstance(n, str) and n for n in names):
            return list(names)
        if i == 0 and descriptions:
            log.warning("description set %s has %d types, the prototypes %d: not using its names",
                        descriptions, len(names or []), k)
    return [str(i) for i in range(k)]


def _names_from_descriptions(name_or_path: str) -> list[str]:
    try:  # the description-set module, when this install has it
        from ..prototypes.descriptions import load_descriptions

        return load_descriptions(name_or_path).type_names
    except ImportError:
        pass
    data = json.loads(Path(name_or_path).read_text(encoding="utf-8"))
    types = data.get("types", []) if isinstance(data, dict) else data
    return [t["name"] if isinstance(t, dict) else str(t) for t in types]


# --- attention over a slide --------------------------------------------------------------------

def attention(features: np.ndarray, prototypes: np.ndarray, tau: float = 0.1) -> np.ndarray:
    """a_ik = softmax_i(cos(x_i, c_k) / tau): (N, K) float64, each column sums to 1 (METHOD.md
    Step 5; the ProAlign op's reference weights)."""
    import torch

    from ..ops.proalign_attention.reference import attention_weights, similarity

    x, c = (torch.from_numpy(np.asarray(a, np.float64)) for a in (features, prototypes))
    return attention_weights(similarity(x, c), tau, "patches").numpy()


def patch_size_level0(attrs: dict, coords: np.ndarray) -> int:
    """The patches' side at level 0, from TRIDENT (`patch_size_level0`) or CLAM (`patch_size` x
    `downsample`) coords attributes, else the smallest step between coords."""
    for key in ("coords.patch_size_level0", "patch_size_level0"):
        if attrs.get(key):
            return int(attrs[key])
    ps = attrs.get("coords.patch_size")
    if ps:
        ds = attrs.get("coords.downsample")
        f = float(ds[0]) if isinstance(ds, (list, tuple)) and ds else 1.0
        return int(round(float(ps) * f))
    steps = [np.diff(np.unique(coords[:, j])) for j in (0, 1)]
    steps = [s[s > 0].min() for s in steps if (s > 0).any()]
    return int(min(steps)) if steps else 256


TITLE_IN = 0.4  # the figure title's band


def _layout(n_panels: int, aspect: float, max_cols: int = 4) -> tuple[int, int, float, float]:
    cols = min(max_cols, n_panels)
    rows = math.ceil(n_panels / cols)
    panel_h = PANEL_IN * aspect + 0.35  # room for the panel's title
    return rows, cols, cols * PANEL_IN, rows * panel_h + TITLE_IN


def heatmap_size(k: int, canvas_hw: tuple[int, int], with_thumbnail: bool = True, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of `attention_heatmap`'s PNG."""
    _, _, w, h = _layout(k + int(with_thumbnail), canvas_hw[0] / canvas_hw[1])
    return round(w * dpi), round(h * dpi)


def attention_heatmap(att: np.ndarray, coords: np.ndarray, patch_size: int, out: str | os.PathLike,
                      names: Sequence[str] | None = None, thumbnail: np.ndarray | None = None,
                      slide_size: tuple[int, int] | None = None, scale: str = "linear", dpi: int = DPI,
                      max_canvas: int = 512, title: str | None = None) -> Path:
    """One panel per prototype: its attention over the patches, painted at their level-0 `coords`
    over the slide thumbnail (or a blank canvas). `scale`: linear (a / max a) or rank
    (percentile of a among the slide's patches). The first panel is the thumbnail itself."""
    return _save(attention_heatmap_figure(att, coords, patch_size, names, thumbnail, slide_size, scale, dpi,
                                          max_canvas, title), out)


def panel_titles(fig) -> list[str]:
    """The prototype panels' titles of an `attention_heatmap_figure`, as drawn (the thumbnail's
    panel left out)."""
    return [ax.get_title() for ax in fig.axes[1:]]


def attention_heatmap_figure(att: np.ndarray, coords: np.ndarray, patch_size: int,
                             names: Sequence[str] | None = None, thumbnail: np.ndarray | None = None,
                             slide_size: tuple[int, int] | None = None, scale: str = "linear", dpi: int = DPI,
                             max_canvas: int = 512, title: str | None = None):
    """`attention_heatmap`'s figure, not yet saved (its axes: the thumbnail, then one per prototype)."""
    coords = np.asarray(coords, np.int64)
    n, k = att.shape
    w0, h0 = slide_size or (int(coords[:, 0].max() + patch_size), int(coords[:, 1].max() + patch_size))
    if thumbnail is not None:
        th, tw = thumbnail.shape[:2]
    else:
        f = max_canvas / max(w0, h0)
        tw, th = max(1, round(w0 * f)), max(1, round(h0 * f))
    sx, sy = tw / w0, th / h0
    owner = np.full((th, tw), -1, np.int64)  # which patch covers each canvas pixel
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(int), 0, tw - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(int), 0, th - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size) * sx).astype(int), x0 + 1, tw)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size) * sy).astype(int), y0 + 1, th)
    for i in range(n):
        owner[y0[i]:y1[i], x0[i]:x1[i]] = i
    covered = owner >= 0
    names = list(names) if names is not None else [str(i) for i in range(k)]
    show_thumb = thumbnail is not None
    rows, cols, w_in, h_in = _layout(k + 1, th / tw)
    fig = _figure(w_in, h_in, dpi)
    bg = thumbnail if show_thumb else np.full((th, tw, 3), 255, np.uint8)
    grey = np.repeat(bg.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    panels = [("slide" if show_thumb else "patches", None)] + [(names[j], j) for j in range(k)]
    for p, (label, j) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, p + 1)
        ax.set_axis_off()
        ax.set_title(label if j is None else f"{label}", fontsize=9)
        if j is None:
            img = bg.copy()
            if not show_thumb:
                img[covered] = (180, 180, 180)
            ax.imshow(img, interpolation="nearest")
            continue
        a = att[:, j]
        ax.set_title(f"{label} (peak {a.max() * n:.1f}× uniform)", fontsize=8)
        v = (np.argsort(np.argsort(a)) / max(1, n - 1)) if scale == "rank" else a / max(a.max(), 1e-300)
        val = np.where(covered, v[np.maximum(owner, 0)], np.nan)
        ax.imshow(grey, interpolation="nearest")
        ax.imshow(np.ma.masked_invalid(val), cmap="inferno", vmin=0, vmax=1, alpha=0.75, interpolation="nearest")
    if title:
        fig.text(0.5, 1 - 0.5 * TITLE_IN / h_in, title, fontsize=10, ha="center", va="center")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (TITLE_IN + 0.3) / h_in, wspace=0.04,
                        hspace=0.35 / (h_in / rows))
    return fig


def montage_size(k: int, n: int, dpi: int = DPI, cell_in: float = 0.9, label_in: float = 1.6) -> tuple[int, int]:
    return round((label_in + n * cell_in) * dpi), round((k * cell_in + 0.4) * dpi)


def top_patches_montage(patches: np.ndarray, out: str | os.PathLike, names: Sequence[str] | None = None,
                        scores: np.ndarray | None = None, dpi: int = DPI, cell_in: float = 0.9, label_in: float = 1.6,
                        title: str | None = None) -> Path:
    """A grid: one row per prototype, its top patches left to right. `patches` is (K, n, h, w, 3)
    uint8 (a black tile where a slide had fewer than n patches); `scores` (K, n) are printed."""
    k, n = patches.shape[:2]
    w_in, h_in = label_in + n * cell_in, k * cell_in + 0.4
    fig = _figure(w_in, h_in, dpi)
    names = list(names) if names is not None else [str(i) for i in range(k)]
    top = 0.4 / h_in
    for r in range(k):
        y = 1 - top - (r + 1) * cell_in / h_in
        fig.text(0.01, y + 0.5 * cell_in / h_in, names[r], fontsize=8, va="center", ha="left")
        for c in range(n):
            ax = fig.add_axes((label_in / w_in + c * cell_in / w_in, y + 0.03 * cell_in / h_in,
                               0.94 * cell_in / w_in, 0.94 * cell_in / h_in))
            ax.imshow(patches[r, c], interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None and np.isfinite(scores[r, c]):
                ax.text(2, 10, f"{scores[r, c]:.2f}", fontsize=5, color="yellow")
    fig.text(0.01, 1 - 0.2 / h_in, title or "top patches per prototype (by attention)", fontsize=9, va="center")
    return _save(fig, out)


# --- cohort pictures ---------------------------------------------------------------------------

def usage_from_store(store_path: str | os.PathLike, row: int = 0) -> tuple[np.ndarray, dict]:
    """(slides, K) proportions pi of every stored slide (proalign, panther, protocount records),
    and one record's metadata. `row` picks the tau row of multi-tau proalign records."""
    from ..store import open_store

    pis, meta = [], {}
    with open_store(store_path) as s:
        for sid, rec in s.items():
            m = rec.meta
            if m.get("method") not in ("proalign", "panther", "protocount"):
                raise ValueError(f"slide {sid!r}: method {m.get('method')!r} stores no prototype proportions")
            k = int(m["prototypes"]["k"])
            e = np.asarray(rec.embedding, np.float64)
            e = e[row] if e.ndim == 2 else e
            pis.append(e[:k])
            meta = meta or m
    if not pis:
        raise ValueError(f"store {store_path} is empty")
    return np.stack(pis), meta


def usage_size(k: int, dpi: int = DPI) -> tuple[int, int]:
    return round(max(6.0, 0.45 * k + 1.5) * dpi), round(4.0 * dpi)


def prototype_usage(pi: np.ndarray, out: str | os.PathLike, names: Sequence[str] | None = None,
                    title: str | None = None, dpi: int = DPI) -> Path:
    """Bars: mean proportion pi_k over the cohort, with the std as error bars; dots: the share of
    slides whose largest pi is k."""
    n, k = pi.shape
    names = list(names) if names is not None else [str(i) for i in range(k)]
    w, h = usage_size(k, dpi)
    fig = _figure(w / dpi, h / dpi, dpi)
    ax = fig.add_axes((0.08, 0.3, 0.9, 0.6))
    xs = np.arange(k)
    ax.bar(xs, pi.mean(axis=0), yerr=pi.std(axis=0), color="#4C72B0", capsize=2, label="mean π (± std)")
    ax.plot(xs, np.bincount(pi.argmax(axis=1), minlength=k) / n, "o", color="#DD8452", ms=4,
            label="share of slides where it is the largest")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("proportion")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"prototype usage over {n} slides", fontsize=10)
    return _save(fig, out)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components of the standardised rows of x."""
    x = np.asarray(x, np.float64)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 1e-8, sd, 1.0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    out = u[:, :2] * s[:2]
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def embedding_map(x: np.ndarray, labels: Sequence, out: str | os.PathLike, method: str = "pca", seed: int = 0,
                  title: str | None = None, dpi: int = DPI) -> Path:
    """Scatter of the slides in 2-D (PCA, or t-SNE through scikit-learn when installed), coloured
    by label: categories get a legend; numbers (e.g. survival times) a colour bar."""
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as e:
            raise ValueError("--map tsne needs scikit-learn (pip install scikit-learn); use pca") from e
        xy = TSNE(2, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), random_state=seed,
                  init="pca").fit_transform(np.asarray(x, np.float64))
    else:
        xy = pca_2d(x)
    fig = _figure(6.0, 5.0, dpi)
    ax = fig.add_axes((0.1, 0.1, 0.62, 0.8))
    labels = list(labels)
    try:
        vals = np.array(labels, float)
        numeric = len(set(labels)) > 10
    except (TypeError, ValueError):
        numeric = False
    if numeric:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=vals, cmap="viridis", s=14)
        fig.colorbar(sc, ax=ax, fraction=0.05)
    else:
        cats = sorted(set(map(str, labels)))
        cmap = _cmap("tab10" if len(cats) <= 10 else "tab20")
        for i, c in enumerate(cats):
            m = np.array([str(v) == c for v in labels])
            ax.scatter(xy[m, 0], xy[m, 1], s=14, color=cmap(i % cmap.N), label=f"{c} ({m.sum()})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    lab = "PC" if method == "pca" else "t-SNE "
    ax.set_xlabel(f"{lab}1")
    ax.set_ylabel(f"{lab}2")
    ax.set_title(title or f"slide embeddings ({method.upper()}, {len(labels)} slides)", fontsize=10)
    return _save(fig, out)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


# --- pictures of an evaluation ---------------------------------------------------------------

def load_run(path: str | os.PathLike) -> dict:
    """An evaluation's `.run.json` (or its metrics JSON, whose `.run.json` sits beside it)."""
    from .evaluate import run_json_path

    p = Path(path)
    if not p.name.endswith(".run.json"):
        p = run_json_path(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no evaluation run file (written beside `eval --json`)")
    return json.loads(p.read_text())


def roc_figure(run: dict, out: str | os.PathLike, title: str | None = None, dpi: int = DPI) -> Path:
    """One-vs-rest ROC curves of the out-of-fold class probabilities (one curve for two classes)."""
    if run.get("task") != "classify":
        raise ValueError("ROC curves need a classification run")
    p = run["predictions"]
    y, proba = np.array(p["y"]), np.array(p["proba"], float)
    classes = run["info"]["classes"]
    fig = _figure(5.0, 5.0, dpi)
    ax = fig.add_axes((0.12, 0.1, 0.83, 0.8))
    which = [1] if len(classes) == 2 else range(len(classes))
    cmap = _cmap("tab10")
    for c in which:
        fpr, tpr = M.roc_curve(y == c, proba[:, c])
        ax.plot(fpr, tpr, color=cmap(c % 10), lw=1.5,
                label=f"{classes[c]} vs rest (AUC {M.binary_auc(y == c, proba[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "ROC (out-of-fold predictions)", fontsize=10)
    return _save(fig, out)


def roc_compare_figure(runs: dict[str, dict], out: str | os.PathLike, title: str | None = None,
                       dpi: int = DPI) -> Path:
    """One ROC curve per method (two-class runs: the second class against the first)."""
    fig = _figure(5.0, 5.0, dpi)
    ax = fig.add_axes((0.12, 0.1, 0.83, 0.8))
    cmap = _cmap("tab10")
    for i, (method, run) in enumerate(runs.items()):
        p = run["predictions"]
        y, proba = np.array(p["y"]), np.array(p["proba"], float)
        if proba.shape[1] != 2:
            raise ValueError("the method overlay is for two-class runs")
        fpr, tpr = M.roc_curve(y == 1, proba[:, 1])
        ax.plot(fpr, tpr, color=cmap(i % 10), lw=1.5, label=f"{method} (AUC {M.binary_auc(y == 1, proba[:, 1]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    first = next(iter(runs.values()))
    ax.set_title(title or f"ROC by method ({first['info']['classes'][1]} vs {first['info']['classes'][0]})",
                 fontsize=10)
    return _save(fig, out)


def risk_groups(run: dict) -> np.ndarray:
    """High-risk flag per slide: risk above its own fold's median (fold models differ in scale)."""
    p = run["predictions"]
    risk, fold = np.array(p["risk"], float), np.array(p["fold"])
    high = np.zeros(len(risk), bool)
    for f in np.unique(fold):
        m = fold == f
        high[m] = risk[m] > np.median(risk[m])
    return high


def km_figure(run: dict, out: str | os.PathLike, title: str | None = None, dpi: int = DPI) -> Path:
    """Kaplan-Meier curves of the predicted high- and low-risk halves, with the log-rank p."""
    if run.get("task") != "survival":
        raise ValueError("Kaplan-Meier curves need a survival run")
    p = run["predictions"]
    t, e = np.array(p["time"], float), np.array(p["event"], float)
    high = risk_groups(run)
    stat, pval = M.logrank_test(t, e, high)
    fig = _figure(6.0, 4.5, dpi)
    ax = fig.add_axes((0.11, 0.12, 0.85, 0.78))
    for name, m, col in (("low risk", ~high, "#4C72B0"), ("high risk", high, "#C44E52")):
        if not m.any():
            continue
        ts, s, _ = M.kaplan_meier(t[m], e[m])
        ax.step(ts, s, where="post", color=col, lw=1.6, label=f"{name} (n={m.sum()}, events={int(e[m].sum())})")
        cens = t[m][e[m] == 0]
        # censoring ticks on the step function: S just after the last time <= the censoring time
        ax.plot(cens, s[np.searchsorted(ts, cens, side="right") - 1], "|", color=col, ms=7)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or f"Kaplan-Meier by predicted risk (log-rank p = {pval:.2g})", fontsize=10)
    return _save(fig, out)


# --- from files (the CLI's entry points) -----------------------------------------------------

def _check_dims(what: str, d: int, c: np.ndarray) -> None:
    if d != c.shape[1]:
        raise ValueError(f"{what}: feature dim {d} does not match the prototypes' dim {c.shape[1]}")


def _slide_inputs(ff, c, pmeta, descriptions, tau):
    """(attention (N, K), type names) of a features file's patches against prototypes c."""
    if ff.coords is None:
        raise ValueError(f"{ff.path}: no 'coords' dataset; heatmaps need the patches' coordinates")
    _check_dims(str(ff.path), ff.features.shape[1], c)
    return attention(ff.features, c, tau), prototype_names(c.shape[0], pmeta, descriptions)


def features_from_slide(slide_path: str | os.PathLike, encoder, prototypes: np.ndarray, options=None,
                        mpp: float | None = None, device: str = "cpu", save_dir: str | os.PathLike | None = None,
                        slide_id: str | None = None):
    """A slide's patch features and coords through the slides pipeline (tissue -> grid -> engine
    -> `encoder`), kept in memory, as a FeatureFile; with `save_dir` also written there as the
    TRIDENT-style <slide_id>.h5 that `embed --archive --save-features` writes."""
    from ..features.io import FeatureFile
    from ..pipeline.embed_slides import SlideOptions, embed_slide

    d = getattr(encoder, "feature_dim", None)
    if d is not None:
        _check_dims(f"encoder {getattr(encoder, 'name', '')}".strip(), int(d), prototypes)
    slide_id = slide_id or Path(slide_path).stem
    opts = dataclasses.replace(options or SlideOptions(), features_dir=str(save_dir) if save_dir else None)
    res = embed_slide(slide_path, encoder, prototypes, method=None, options=opts, slide_id=slide_id, mpp=mpp,
                      device=device, keep_features=True)
    path = Path(save_dir) / f"{slide_id}.h5" if save_dir else Path(slide_path)
    return FeatureFile(slide_id, path, res.features, res.grid.coords,
                       {"coords.patch_size_level0": res.grid.patch_size_level0})


@dataclasses.dataclass
class SlidePictures:
    """What `slide_pictures` drew and the arrays behind it."""

    slide_id: str
    heatmap: Path
    titles: list[str]  # the prototype panels' titles, as drawn
    names: list[str]  # the prototypes' type names
    attention: np.ndarray  # (N, K) a_ik: each column sums to 1 over the slide's patches
    features: np.ndarray  # (N, d)
    coords: np.ndarray  # (N, 2) level-0 x, y
    patch_size: int  # level 0
    montage: Path | None = None
    features_path: Path | None = None  # the features file read, or the one written by save_features


def slide_pictures(slide_path: str | os.PathLike | None, prototypes_path: str | os.PathLike,
                   out: str | os.PathLike, *, features_path: str | os.PathLike | None = None, encoder=None,
                   slide_options=None, mpp: float | None = None, device: str = "cpu",
                   save_features: str | os.PathLike | None = None, descriptions: str | None = None,
                   tau: float = 0.1, scale: str = "linear", thumbnail_size: int = 1024,
                   montage_out: str | os.PathLike | None = None, montage_n: int = 8, patch_px: int = 96,
                   dpi: int = DPI) -> SlidePictures:
    """A slide's prototype-attention heatmaps (and, with `montage_out`, its top-patches montage).
    The patch features come from `features_path` (features + coords .h5), or are computed from the
    slide file itself with `encoder` (`slide_options`: SlideOptions for magnification, patch size,
    tissue; `save_features`: a folder to keep them in as <slide_id>.h5)."""
    from ..prototypes.io import read_prototype_file

    if (features_path is None) == (encoder is None):
        raise ValueError("give exactly one of a features file or an encoder (to compute features from the slide)")
    if encoder is not None and not slide_path:
        raise ValueError("computing features needs the slide file")
    if montage_out is not None and not slide_path:
        raise ValueError("the top-patches montage needs the slide file")
    c, pmeta = read_prototype_file(prototypes_path)
    if features_path is not None:
        from ..features.io import read_features

        ff = read_features(features_path)
        kept = Path(features_path)
    else:
        ff = features_from_slide(slide_path, encoder, c, slide_options, mpp, device, save_features)
        kept = Path(save_features) / f"{ff.slide_id}.h5" if save_features else None
    att, names = _slide_inputs(ff, c, pmeta, descriptions, tau)
    ps = patch_size_level0(ff.attrs, ff.coords)
    thumb = size = None
    if slide_path:
        from ..slides.slide import open_slide

        with open_slide(slide_path, mpp=mpp) as sl:
            thumb, size = sl.get_thumbnail(thumbnail_size), sl.dimensions
    fig = attention_heatmap_figure(att, ff.coords, ps, names, thumb, size, scale=scale, dpi=dpi,
                                   title=f"{ff.slide_id}: prototype attention (τ={tau:g}, {len(att)} patches)")
    res = SlidePictures(ff.slide_id, _save(fig, out), panel_titles(fig), names, att, ff.features, ff.coords, ps,
                        features_path=kept)
    if montage_out is not None:
        res.montage = _montage(slide_path, ff, att, names, ps, montage_out, montage_n, patch_px, dpi, mpp)
    return res


def slide_heatmap(slide_path: str | None, features_path: str, prototypes_path: str, out: str,
                  descriptions: str | None = None, tau: float = 0.1, scale: str = "linear",
                  thumbnail_size: int = 1024, dpi: int = DPI) -> Path:
    """Attention heatmaps of one slide from its features file (+ coords) and a prototype file."""
    return slide_pictures(slide_path, prototypes_path, out, features_path=features_path, descriptions=descriptions,
                          tau=tau, scale=scale, thumbnail_size=thumbnail_size, dpi=dpi).heatmap


def _montage(slide_path, ff, att, names, ps, out, n, patch_px, dpi, mpp=None) -> Path:
    from ..slides.patches import read_patches
    from ..slides.slide import open_slide

    k = att.shape[1]
    n_eff = min(n, len(att))
    top = np.argsort(-att, axis=0, kind="stable")[:n_eff].T  # (K, n_eff)
    uniq, inv = np.unique(top.ravel(), return_inverse=True)
    with open_slide(slide_path, mpp=mpp) as sl:
        tiles = read_patches(sl, ff.coords[uniq], ps, patch_px)
    patches = np.zeros((k, n, patch_px, patch_px, 3), np.uint8)
    patches[:, :n_eff] = tiles[inv].reshape(k, n_eff, patch_px, patch_px, 3)
    scores = np.full((k, n), np.nan)
    scores[:, :n_eff] = np.take_along_axis(att, top.T, axis=0).T * len(att)  # attention relative to uniform
    return top_patches_montage(patches, out, names, scores, dpi=dpi,
                               title=f"{ff.slide_id}: top {n_eff} patches per prototype (score = a·N)")


def slide_montage(slide_path: str, features_path: str, prototypes_path: str, out: str, n: int = 8,
                  descriptions: str | None = None, tau: float = 0.1, patch_px: int = 96, dpi: int = DPI) -> Path:
    """Each prototype's n highest-attention patches of one slide, read from the slide."""
    from ..features.io import read_features
    from ..prototypes.io import read_prototype_file

    ff = read_features(features_path)
    c, pmeta = read_prototype_file(prototypes_path)
    att, names = _slide_inputs(ff, c, pmeta, descriptions, tau)
    return _montage(slide_path, ff, att, names, patch_size_level0(ff.attrs, ff.coords), out, n, patch_px, dpi)
