"""cuCIM's CPU reader as a benchmark peer (``pip install --no-deps cucim-cu13 lazy-loader``; the
full ``cucim-cu13`` install adds CuPy and the CUDA toolkit wheels, which the CPU reader does not
need). Used by ``python -m proalign.bench.patches`` and tests/test_cucim_peer.py.

What cuCIM 26.10 does here (BENCHMARKS.md "Slides → patches"): it decodes Aperio SVS and generic
tiled TIFF with JPEG, JPEG 2000 and LZW tiles to our pixels (JPEG 2000 within 1); on a level whose
downsample is fractional its region starts one level pixel away from ours; outside the image it
gives white on SVS (as ours) and black on a generic TIFF. A Deflate-tiled TIFF crashes the process
on open (SIGSEGV after "AdobeDeflate compression support is not configured"), and a stripped TIFF
raises on regions crossing its edge: run it on unknown files in a child process.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def cucim_missing() -> str | None:
    """None when cuCIM's reader imports, else why not (for skips and the benchmark's report)."""
    try:
        from cucim import CuImage  # noqa: F401
    except Exception as e:  # ImportError, or a broken binary: either way no peer
        return f"cucim not importable ({type(e).__name__}: {e}); pip install --no-deps cucim-cu13 lazy-loader"
    return None


def cucim_version() -> str:
    import cucim
    return str(getattr(cucim, "__version__", "?"))


def _rgb(a) -> np.ndarray:
    a = np.asarray(a)
    return a[..., :3] if a.shape[-1] == 4 else a  # cuCIM's slow path (stripped TIFF) gives RGBA


def read_region(img, xy, level: int, size: tuple[int, int]) -> np.ndarray:
    """One region, uint8 (h, w, 3), level-0 (x, y), like OpenSlide's read_region."""
    return _rgb(img.read_region(location=(int(xy[0]), int(xy[1])), size=tuple(int(s) for s in size), level=level))


def iter_regions(img, coords: np.ndarray, level: int, read_size: int, workers: int,
                 batch_size: int = 64, copy: bool = True) -> Iterator[np.ndarray]:
    """uint8 (b, read_size, read_size, 3) batches in coords order, through cuCIM's own batch loader
    (read_region with a list of locations, num_workers threads, 2 batches prefetched). Each batch is
    copied out unless `copy=False`: a view of it holds another batch's pixels once the iterator moves
    on, so a view must be used up before the next batch is asked for (the benchmark does that)."""
    locs = [(int(x), int(y)) for x, y in np.asarray(coords).reshape(-1, 2)]
    if not locs:
        return
    it = img.read_region(locs, (read_size, read_size), level, num_workers=max(1, workers), batch_size=batch_size)
    for b in it:  # the loader reuses a batch's memory once the iterator moves on
        b = np.array(_rgb(b), copy=True) if copy else _rgb(np.asarray(b))
        yield b if b.ndim == 4 else b[None]


def agreement(path: str, slide, grid, out_size: int, n: int = 64) -> dict:
    """cuCIM against our reader on the benchmark grid (an evenly spaced sample of n of its patches):
    the regions read at the grid's level (raw pixels; also against ours shifted by up to one level
    pixel), and the patches after our resize; then every level (_level_check). Max and mean |diff|
    per check; a read cuCIM refuses is reported, not raised."""
    import torch

    from cucim import CuImage

    from ..slides.patches import read_patches, resize_patches

    img = CuImage(str(path))
    out: dict = {"cucim": cucim_version()}
    coords = np.asarray(grid.coords, np.int64).reshape(-1, 2)
    if len(coords):
        sample = coords[np.unique(np.linspace(0, len(coords) - 1, min(n, len(coords))).astype(int))]
        r = grid.read_size
        try:
            theirs = np.stack([read_region(img, xy, grid.level, (r, r)) for xy in sample])
            ours = np.stack([slide.read_region(tuple(int(v) for v in xy), grid.level, (r, r)) for xy in sample])
            out["grid_region"] = _diff(ours, theirs)
            g = {"n": 0, "max": 0, "mean": 0.0, "aligned_max": 0, "aligned_mean": 0.0, "shifted": 0}
            for xy in sample:
                _accumulate(g, img, slide, (int(xy[0]), int(xy[1])), grid.level, r)
            out["grid_region"].update({k: g[k] for k in ("aligned_max", "shifted")},
                                      aligned_mean=g["aligned_mean"] / max(1, g["n"]))
            ours_p = read_patches(slide, sample, grid.patch_size_level0, out_size, decoder="cpu")
            theirs_p = resize_patches(torch.from_numpy(np.ascontiguousarray(theirs)), out_size).numpy()
            out["grid_patch"] = _diff(ours_p, theirs_p)
        except Exception as e:
            out["grid_error"] = f"{type(e).__name__}: {e}"
    levels = {}
    for level, (w, h) in enumerate(slide.levels):
        levels[level] = _level_check(img, slide, level, w, h, n)
    out["levels"] = levels
    return out


def _level_check(img, slide, level: int, w: int, h: int, n: int) -> dict:
    """n - 1 interior regions of s = min(256, side - 2) level pixels on a regular sample, read by both
    at the same level-0 location: max / mean |diff|; then the same against our pixels shifted by up
    to one level pixel (cuCIM's origin on a level whose downsample is fractional can sit one level
    pixel from ours: `shifted` counts those regions, `aligned_*` is the decode agreement); and one
    region across the bottom-right corner: what cuCIM puts outside the image (`edge`)."""
    ds = slide.downsamples[level]
    s = min(256, w - 2, h - 2)
    if s < 1:
        return {"error": f"level {w}x{h} too small"}
    k = max(1, int(np.sqrt(n - 1)))
    pos = [(int(x), int(y)) for y in np.linspace(1, h - s - 1, k) for x in np.linspace(1, w - s - 1, k)]
    res: dict = {"n": 0, "max": 0, "mean": 0.0, "aligned_max": 0, "aligned_mean": 0.0, "shifted": 0}
    try:
        for x, y in pos:
            loc = (int(round(x * ds)), int(round(y * ds)))
            _accumulate(res, img, slide, loc, level, s)
        res["mean"] /= max(1, res["n"])
        res["aligned_mean"] /= max(1, res["n"])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    try:  # a region whose bottom-right quarter lies outside the level
        loc = (int(round((w - s // 2) * ds)), int(round((h - s // 2) * ds)))
        e = read_region(img, loc, level, (s, s))
        ours = slide.read_region(loc, level, (s, s))
        outside = e[s - s // 2 + 1:, s - s // 2 + 1:]
        uniform = outside.size and outside.min() == outside.max()
        fill = {255: "white", 0: "black"}.get(int(outside.min()), "?") if uniform else "mixed"
        res["edge"] = fill if (outside != ours[s - s // 2 + 1:, s - s // 2 + 1:]).any() else f"{fill} (as ours)"
    except Exception as e:
        res["edge"] = f"error {type(e).__name__}: {e}"
    return res


def _accumulate(res: dict, img, slide, loc, level: int, s: int) -> None:
    """One s x s region at level-0 loc: |diff| at the same location and at the best of the 9 shifts
    of our origin by up to one level pixel."""
    theirs = read_region(img, loc, level, (s, s)).astype(np.int16)
    lx, ly = slide.level_origin(loc[0], loc[1], level)
    win = slide._read_level(level, lx - 1, ly - 1, s + 2, s + 2).astype(np.int16)
    d = {(dx, dy): np.abs(win[1 + dy:1 + dy + s, 1 + dx:1 + dx + s] - theirs) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    best = min(d, key=lambda key: (d[key].mean(), key != (0, 0)))
    res["n"] += 1
    res["max"] = max(res["max"], int(d[0, 0].max()))
    res["mean"] += float(d[0, 0].mean())
    res["aligned_max"] = max(res["aligned_max"], int(d[best].max()))
    res["aligned_mean"] += float(d[best].mean())
    res["shifted"] += best != (0, 0)


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"error": f"shape {a.shape} vs {b.shape}"}
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"n": int(len(a)), "max": int(d.max()), "mean": float(d.mean())}
