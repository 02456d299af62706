"""Tissue masks from slide thumbnails: Otsu on HSV saturation, morphology, pen-mark rejection.

One implementation, written against an array module `xp` (numpy or cupy) and an ndimage module
`ndi` (scipy.ndimage or cupyx.scipy.ndimage); `tissue_mask` runs it on the CPU and
`tissue_mask_gpu` on a GPU, so both follow the same rules step by step.

Steps (thresholds are fractions of full scale, hue in degrees; defaults in `TissueParams`):
1. HSV from RGB (RGBA: fully transparent pixels count as white background).
2. Background: near-black, V < `black_value` (0.15: scanner borders, out-of-slide fill), and
   near-white, V >= `white_value` (0.90) with S < `white_saturation` (0.10).
3. Pen cores by the colour rules below, then grown by up to `pen_grow` pixels (default 1% of the
   longer side) through neighbouring pixels that are neither white nor H&E-like: a blurred ink
   fringe keeps the ink's hue but loses saturation.
4. Otsu threshold on the saturation of every pixel that is neither near-black nor pen (white
   background stays in: it is the second mode Otsu needs), clipped to
   [`min_saturation`, `max_saturation`] (0.05, 0.12): the floor keeps an all-background thumbnail
   empty, the cap keeps pale tissue when the thumbnail is nearly all tissue.
5. Candidate tissue = S > threshold, not background, not pen. Median filter (`median_size`, 3)
   against speckle, closing (`close_radius`, 2) then opening (`open_radius`, 2) with disks, the
   outside counting as tissue during erosion so tissue touching the border keeps its rim; holes
   up to `max_hole_frac` (1%) of the image filled, larger ones (lumens, big tears) stay
   background.
6. Ink blobs: a connected piece of (tissue or coloured ink) whose pixels are at least
   `pen_component_frac` (0.5) ink is an ink stroke, and its leftovers (ink colours that pass for
   stain, e.g. the dark maroon where red and black ink mix) go too. Ink pixels are then removed
   everywhere (after hole filling, so enclosed ink is not filled back in).
7. Components smaller than max(`min_area_px`, `min_area_frac` * h * w) (16 px, 0.01%) removed.
8. Exclusions (`tissue_masks`, for the patch grid and the QC picture): the ink found in steps 3
   and 6 (pure black left out: scanner borders), in pieces at least the minimum area, plus
   blank/blurred tissue: pixels of the mask whose local texture (RMS of grey minus its 3x3 mean,
   over a window of `blur_window` px, default 1% of the longer side) is below `blur_ratio` (0.15)
   times the median texture of the slide's tissue, in pieces at least `blur_min_frac` (2%) of
   the tissue area (an out-of-focus band, a smear, a bubble; a thumbnail shows gross blur only).
   The grid drops the patches whose excluded area is above its `max_excluded` fraction, so a
   stroke thinner than a patch takes the patches under it out too (the mask alone keeps them:
   the tissue beside the ink reaches the minimum tissue fraction).

Pen rules (eosin is pink to magenta, hue ~250-345 with S below ~0.55 near 340; hematoxylin is
blue-purple, hue ~250-315):
- green/cyan ink: hue in [75, 190) and S >= 0.15. H&E has no green or cyan.
- blue ink: hue in [190, 245) and S >= 0.30.
- black/grey ink: V < `dark_value` (0.30) and S < `dark_ink_saturation` (0.35). Dark stained
  tissue is dark but saturated (S >= ~0.5), so it is not taken for ink.
- red ink: hue in [350, 20) and S >= 0.30, or hue in [340, 350) and S >= 0.60. Red ink is
  orange-red and saturated. Blood (red cells) has the colour of red ink and is dropped where it is
  strongly saturated: a small area on a thumbnail, which a patch's tissue fraction absorbs. Brown
  IHC (DAB) stain is hue ~20-40 and mostly clear of the red rule.
- H&E-like (never grown into): hue in [250, 345) and S >= 0.08.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TissueParams:
    """All tunables of the tissue detector; fractions of full scale, radii in mask pixels."""

    min_saturation: float = 0.05
    max_saturation: float = 0.12
    white_value: float = 0.90
    white_saturation: float = 0.10
    black_value: float = 0.15
    dark_value: float = 0.30
    dark_ink_saturation: float = 0.35
    median_size: int = 3
    close_radius: int = 2
    open_radius: int = 2
    max_hole_frac: float | None = 0.01  # None: fill every hole
    min_area_frac: float = 1e-4
    min_area_px: int = 16
    pen_rejection: bool = True
    pen_grow: int | None = None  # None: 1% of the longer side, at least 2 px
    pen_component_frac: float = 0.5
    artifact_rejection: bool = True  # blank/blurred tissue into the exclusions (tissue_masks)
    blur_ratio: float = 0.15
    blur_window: int | None = None  # None: 1% of the longer side, at least 5 px
    blur_min_frac: float = 0.02


def _hue_in(xp, h, lo: float, hi: float):
    """Hue in the half-open arc [lo, hi) degrees, wrapping through 0."""
    return ((h - lo) % 360.0) < ((hi - lo) % 360.0)


def _hsv(xp, rgb):
    c = rgb.astype(xp.float32) * (1.0 / 255.0)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    v = c.max(axis=-1)
    d = v - c.min(axis=-1)
    s = xp.where(v > 0, d / xp.maximum(v, 1e-6), 0.0)
    dd = xp.where(d > 0, d, 1.0)
    h = xp.where(v == r, ((g - b) / dd) % 6.0, xp.where(v == g, (b - r) / dd + 2.0, (r - g) / dd + 4.0)) * 60.0
    return xp.where(d > 0, h, 0.0), s, v


def _disk(xp, r: int):
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return xp.asarray(x * x + y * y <= r * r)


def _otsu(xp, values_u8, weights) -> float:
    """Otsu threshold (0..255 bin index; class 1 is > threshold) of a uint8 image, counting only
    pixels where `weights` is True. Returns 0 when fewer than two levels are present."""
    hist = xp.bincount(values_u8[weights].ravel(), minlength=256)[:256].astype(xp.float64)
    total = hist.sum()
    if float(total) == 0.0:
        return 0.0
    levels = xp.arange(256, dtype=xp.float64)
    w0 = xp.cumsum(hist)
    m0 = xp.cumsum(hist * levels)
    w1 = total - w0
    mu_t = m0[-1]
    # between-class variance for a split after bin k: (mu_t*w0 - m0)^2 / (w0*w1)
    num = (mu_t * w0 - total * m0) ** 2
    den = w0 * w1
    var = xp.where(den > 0, num / xp.where(den > 0, den, 1.0), -1.0)
    return float(xp.argmax(var))


def _component_sizes(xp, ndi, mask):
    labels, n = ndi.label(mask)
    sizes = xp.bincount(labels.ravel(), minlength=int(n) + 1)
    return labels, int(n), sizes


def _tissue_mask_impl(xp, ndi, rgb, p: TissueParams, exclusions: bool = False):
    """The tissue mask; with `exclusions`, (mask, excluded) where excluded marks ink and
    blank/blurred tissue (step 8 of the module notes)."""
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be (h, w, 3) RGB or (h, w, 4) RGBA, got shape {tuple(rgb.shape)}")
    if rgb.dtype != xp.uint8:
        raise ValueError(f"thumbnail must be uint8, got {rgb.dtype}")
    hgt, wid = rgb.shape[:2]
    if hgt == 0 or wid == 0:
        z = xp.zeros((hgt, wid), dtype=bool)
        return (z, z.copy()) if exclusions else z
    transparent = None
    if rgb.shape[2] == 4:
        transparent = rgb[..., 3] == 0
        rgb = rgb[..., :3]
    h, s, v = _hsv(xp, rgb)
    dark = v < p.black_value
    white = (v >= p.white_value) & (s < p.white_saturation)
    if transparent is not None:
        white |= transparent
        dark &= ~transparent

    if p.pen_rejection:
        core = (_hue_in(xp, h, 75, 190) & (s >= 0.15)) | (_hue_in(xp, h, 190, 245) & (s >= 0.30))
        core |= (_hue_in(xp, h, 350, 20) & (s >= 0.30)) | (_hue_in(xp, h, 340, 350) & (s >= 0.60))
        core |= (v < p.dark_value) & (s < p.dark_ink_saturation)  # black/grey ink, near-black
        core &= ~white
        he_like = _hue_in(xp, h, 250, 345) & (s >= 0.08)
        grow = p.pen_grow if p.pen_grow is not None else max(2, round(0.01 * max(hgt, wid)))
        if grow > 0 and bool(core.any()):
            # geodesic growth: at most `grow` steps, only through non-H&E, non-white pixels
            pen = ndi.binary_dilation(core, structure=_disk(xp, 1), iterations=grow,
                                      mask=~he_like & ~white) | core
        else:
            pen = core
    else:
        pen = dark

    sat = xp.clip(s * 255.0 + 0.5, 0, 255).astype(xp.uint8)
    t = _otsu(xp, sat, ~dark & ~pen) / 255.0
    t = min(max(t, p.min_saturation), p.max_saturation)
    fg = (s > t) & ~white & ~pen
    if transparent is not None:
        fg &= ~transparent

    if p.median_size and p.median_size > 1:
        fg = ndi.median_filter(fg.view(xp.uint8), size=p.median_size, mode="nearest").astype(bool)
    if p.close_radius > 0:
        st = _disk(xp, p.close_radius)
        # erosion treats the outside as tissue so a blob touching the edge keeps its rim
        fg = ndi.binary_erosion(ndi.binary_dilation(fg, structure=st), structure=st, border_value=1)
    if p.open_radius > 0:
        st = _disk(xp, p.open_radius)
        fg = ndi.binary_dilation(ndi.binary_erosion(fg, structure=st, border_value=1), structure=st)
    fg = _fill_holes(xp, ndi, fg, p.max_hole_frac)

    ink_out = None
    if p.pen_rejection:
        # blobs of tissue + coloured ink (pure black left out: a black scanner border touching
        # tissue must not turn a whole tissue piece into an "ink blob")
        ink = pen & ~dark
        labels, n, sizes = _component_sizes(xp, ndi, fg | ink)
        if n:
            pen_count = xp.bincount(labels[ink].ravel(), minlength=n + 1)
            ink_blob = pen_count >= p.pen_component_frac * xp.maximum(sizes, 1)
            ink_blob[0] = False
            if exclusions:
                ink_out = ink | (fg & ink_blob[labels])
            fg &= ~ink_blob[labels]
    fg &= ~pen

    min_area = max(int(p.min_area_px), int(np.ceil(p.min_area_frac * hgt * wid)))
    fg = _drop_small(xp, ndi, fg, min_area)
    if not exclusions:
        return fg
    excluded = xp.zeros_like(fg)
    if ink_out is not None:
        excluded |= _drop_small(xp, ndi, ink_out & ~white, min_area)
    if p.artifact_rejection and bool(fg.any()):
        blurred = _blurred(xp, ndi, v, fg, p)
        fg &= ~blurred
        excluded |= blurred
    return fg, excluded


def _drop_small(xp, ndi, m, min_area: int):
    if min_area <= 1:
        return m
    labels, n, sizes = _component_sizes(xp, ndi, m)
    if not n:
        return m
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _blurred(xp, ndi, v, fg, p: TissueParams):
    """Tissue pixels with little local texture for this slide (blank or out-of-focus areas)."""
    hgt, wid = fg.shape
    win = p.blur_window if p.blur_window is not None else max(5, round(0.01 * max(hgt, wid)))
    hp = v - ndi.uniform_filter(v, size=3, mode="reflect")
    energy = xp.sqrt(ndi.uniform_filter(hp * hp, size=win, mode="reflect"))
    inner = ndi.binary_erosion(fg, structure=_disk(xp, 1), iterations=max(1, win // 2))
    ref_px = energy[inner] if bool(inner.any()) else energy[fg]
    ref = float(xp.median(ref_px))
    if not ref > 0:
        return xp.zeros_like(fg)
    low = fg & (energy < p.blur_ratio * ref)
    low = ndi.binary_opening(low, structure=_disk(xp, 1), iterations=2)
    return _drop_small(xp, ndi, low, max(int(p.min_area_px), int(np.ceil(p.blur_min_frac * float(fg.sum())))))


def _fill_holes(xp, ndi, fg, max_hole_frac: float | None):
    filled = ndi.binary_fill_holes(fg)
    if max_hole_frac is None:
        return filled
    holes = filled & ~fg
    labels, n, sizes = _component_sizes(xp, ndi, holes)
    if not n:
        return fg
    small = sizes <= max_hole_frac * fg.size
    small[0] = False
    return fg | small[labels]


def _params(overrides: dict[str, Any]) -> TissueParams:
    unknown = set(overrides) - set(TissueParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown tissue_mask option(s): {sorted(unknown)}")
    return TissueParams(**overrides)


def tissue_mask(thumb_rgb: np.ndarray, **options: Any) -> np.ndarray:
    """Boolean tissue mask (h, w) of a uint8 RGB/RGBA thumbnail, on the CPU.
    Options are the fields of `TissueParams` (e.g. `min_area_frac`, `close_radius`,
    `pen_rejection=False`)."""
    import scipy.ndimage as ndi

    return _tissue_mask_impl(np, ndi, np.asarray(thumb_rgb), _params(options))


def tissue_masks(thumb_rgb: np.ndarray, *, use_gpu: bool | None = False,
                 **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, excluded) boolean masks (h, w) of a thumbnail: the tissue mask without the
    blank/blurred pieces, and the exclusions (ink, blank/blurred tissue: step 8 of the module
    notes), which the patch grid keeps its patches out of. With `pen_rejection=False` the ink is
    tissue and nothing is excluded for it (`--keep-penmarks`); `artifact_rejection=False` keeps
    blurred tissue. `use_gpu=None`: the GPU when one is usable."""
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        import cupy
        import cupyx.scipy.ndimage as cndi

        m, e = _tissue_mask_impl(cupy, cndi, cupy.asarray(thumb_rgb), _params(options), exclusions=True)
        return cupy.asnumpy(m), cupy.asnumpy(e)
    import scipy.ndimage as ndi

    return _tissue_mask_impl(np, ndi, np.asarray(thumb_rgb), _params(options), exclusions=True)


def gpu_available() -> bool:
    """True when cupy is installed and sees a GPU."""
    try:
        import cupy
    except Exception:  # noqa: BLE001 - cupy missing, or its CUDA libraries broken
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # noqa: BLE001 - a driver problem means no GPU
        return False


def tissue_mask_gpu(thumb_rgb: Any, *, return_numpy: bool = True, **options: Any) -> Any:
    """`tissue_mask` on the GPU with cupy/cupyx.scipy.ndimage: same rules, same result. Accepts a
    numpy or cupy array; returns numpy unless `return_numpy=False` (then a cupy array)."""
    import cupy
    import cupyx.scipy.ndimage as ndi

    out = _tissue_mask_impl(cupy, ndi, cupy.asarray(thumb_rgb), _params(options))
    return cupy.asnumpy(out) if return_numpy else out


def tissue_mask_auto(thumb_rgb: np.ndarray, *, use_gpu: bool | None = None, **options: Any) -> np.ndarray:
    """`tissue_mask_gpu` when a GPU is usable (or `use_gpu=True`), else `tissue_mask`."""
    if use_gpu is None:
        use_gpu = gpu_available()
    return tissue_mask_gpu(thumb_rgb, **options) if use_gpu else tissue_mask(thumb_rgb, **options)


def mask_from_slide(slide: Any, max_size: int = 2048, *, use_gpu: bool | None = None,
                    **options: Any) -> tuple[np.ndarray, tuple[float, float]]:
    """Tissue mask of a slide's thumbnail (longer side <= `max_size`) and its scale
    (sx, sy): level-0 pixels per mask pixel, so mask pixel (i, j) covers level-0
    [j*sx, (j+1)*sx) x [i*sy, (i+1)*sy).

    `slide` needs `levels` ([(width, height), ...], level 0 first) and
    `get_thumbnail(max_size) -> uint8 (h, w, 3)`."""
    w0, h0 = (int(v) for v in slide.levels[0])
    thumb = np.asarray(slide.get_thumbnail(max_size))
    if thumb.ndim != 3 or thumb.shape[0] == 0 or thumb.shape[1] == 0:
        raise ValueError(f"slide thumbnail has shape {thumb.shape}, expected (h, w, 3)")
    mask = tissue_mask_auto(thumb, use_gpu=use_gpu, **options)
    return mask, (w0 / thumb.shape[1], h0 / thumb.shape[0])
