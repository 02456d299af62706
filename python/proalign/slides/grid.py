"""Patch grids: level-0 top-left corners of square patches over the tissue of a slide.

Geometry (all in level-0 pixels unless said otherwise):
- downsample `ds` from level 0 to the target resolution: target_mpp / slide_mpp, or
  slide_magnification / target_magnification. Magnification m and mpp convert as mpp = 10 / m
  (TRIDENT's convention: 20x = 0.5 um/px). A magnification request on a slide with only an mpp
  uses the slide's nominal objective (`nominal_magnification`, e.g. 0.2527 um/px -> 40x), as
  TRIDENT does, so "20x" on that slide is an exact 2x downsample; an mpp request on a slide with
  only an objective power uses 10 / power as its mpp.
- patch_size_level0 = round(patch_size * ds); overlap_level0 = round(overlap * ds);
  stride = patch_size_level0 - overlap_level0 (same along x and y; patch i starts at i * stride).
  TRIDENT's own column formula steps the first column by a whole patch; with overlap=0 both agree.
  (TRIDENT's patcher also rounds; the patch_size_level0 attribute it writes is floored, which
  differs only for non-integer magnification ratios.)
- Edges: `edge="inside"` (default) keeps only patches lying wholly inside level 0, so every pixel
  read is real slide data. `edge="pad"` reproduces TRIDENT and CLAM (default `use_padding=True`):
  every patch whose top-left corner is inside the slide, the reader padding beyond the edge.
- Tissue fraction = area of the patch square covered by mask pixels / full square area, computed
  exactly from the mask's summed-area table (the mask is piecewise constant on its pixel cells;
  parts beyond the mask or the slide count as background). Kept: fraction >= min_tissue; with
  min_tissue=0, any overlap with tissue (TRIDENT's threshold=0 rule).
- Exclusions (optional, same pixel grid as the mask: pen ink, blank/blurred tissue): a patch
  whose excluded area is above `max_excluded` of its square is dropped, whatever its tissue.
- Holes (optional, same pixel grid; the interior rings of GeoJSON contours): a patch whose
  centre falls in a hole is dropped, whatever its tissue fraction (CLAM/TRIDENT's rule).
- Order: row-major (y, then x), which follows the tile order of tiled TIFFs (TRIDENT lists its
  grid column by column; the set of patches is what matters to feature files).
- Read level: the level with the largest downsample <= ds * (1 + level_tolerance) (like
  OpenSlide's best level for a downsample, with room for pyramids whose downsample is 4.0002
  rather than 4); read size there = round(patch_size_level0 / level_downsample).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProAlignError


class MissingResolutionError(ProAlignError, ValueError):
    """The slide's resolution (mpp or objective power) is unknown and none was given."""


class GridError(ProAlignError, ValueError):
    """The requested grid is absurd for the slide: patches smaller than MIN_PATCH_LEVEL0 or larger
    than MAX_PATCH_LEVEL0 level-0 pixels, or more than MAX_GRID_PATCHES positions (a wrong mpp or
    magnification in the metadata, usually)."""


MIN_PATCH_LEVEL0 = 8  # level-0 pixels per patch side
MAX_PATCH_LEVEL0 = 1 << 24  # 16x the largest slide side
MAX_GRID_PATCHES = 10_000_000  # grid positions before tissue filtering (a 200,000 px slide: ~800,000)


EDGE_MODES = ("inside", "pad")


@dataclass
class PatchGrid:
    """Patch coordinates plus everything needed to read the patches and to write TRIDENT files."""

    coords: np.ndarray  # (n, 2) int64, level-0 (x, y) of each patch's top-left corner
    patch_size: int  # side at the target resolution (pixels handed to the encoder)
    patch_size_level0: int  # side in level-0 pixels
    level: int  # pyramid level to read from
    level_downsample: float  # that level's downsample
    read_size: int  # side to read at `level`, resized to patch_size afterwards
    downsample: float  # level 0 -> target
    overlap: int = 0  # target pixels shared by neighbouring patches
    level0_size: tuple[int, int] | None = None  # (width, height)
    level0_mpp: float | None = None
    target_mpp: float | None = None
    level0_magnification: float | None = None
    target_magnification: float | None = None
    edge: str = "inside"
    min_tissue: float | None = None
    tissue_fraction: np.ndarray | None = None  # (n,) float64, when a mask was used
    name: str = ""
    savetodir: str = ""
    extra_attrs: dict[str, Any] = field(default_factory=dict)  # source file's other attributes

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __repr__(self) -> str:
        return (f"PatchGrid(n={len(self)}, patch_size={self.patch_size}, patch_size_level0={self.patch_size_level0}, "
                f"overlap={self.overlap}, level={self.level}, read_size={self.read_size}, "
                f"downsample={self.downsample:.6g}, level0_size={self.level0_size}, edge={self.edge!r}, "
                f"name={self.name!r})")

    @property
    def stride_level0(self) -> int:
        return self.patch_size_level0 - round(self.overlap * self.downsample)

    def trident_attrs(self) -> dict[str, Any]:
        """The `coords` dataset attributes TRIDENT writes (plus level-0 size and mpp values when
        known). Magnifications come out as int when integral, as TRIDENT writes them; an unknown
        one is the string 'None', as TRIDENT stores None."""
        def mag(v: float | None) -> int | float | str:
            return "None" if v is None else _int_if_integral(v)

        attrs: dict[str, Any] = {
            "patch_size": int(self.patch_size),
            "patch_size_level0": int(self.patch_size_level0),
            "level0_magnification": mag(self.level0_magnification),
            "target_magnification": mag(self.target_magnification),
            "overlap": int(self.overlap),
            "name": self.name,
            "savetodir": self.savetodir,
        }
        if self.level0_size is not None:
            attrs["level0_width"], attrs["level0_height"] = (int(v) for v in self.level0_size)
        if self.level0_mpp is not None:
            attrs["level0_mpp"] = float(self.level0_mpp)
        if self.target_mpp is not None:
            attrs["target_mpp"] = float(self.target_mpp)
        attrs["edge"] = self.edge
        if self.min_tissue is not None:
            attrs["min_tissue"] = float(self.min_tissue)
        return attrs


def _int_if_integral(v: float) -> int | float:
    v = float(v)
    return round(v) if abs(v - round(v)) < 1e-9 else v


NOMINAL_MAX_MPP = 2.4  # the coarsest level-0 mpp with a standard magnification bucket (5x)


def nominal_magnification(mpp: float) -> int:
    """The standard objective a level-0 pixel size belongs to (TRIDENT's bands):
    < 0.16 um/px 80x, < 0.2 60x, < 0.3 40x, < 0.6 20x, < 1.2 10x, < 2.4 5x."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    raise MissingResolutionError(f"slide mpp {mpp} um/px is too coarse for a nominal magnification "
                                 "(>= 2.4); request target_mpp instead")


@dataclass(frozen=True)
class Resolution:
    downsample: float
    level0_mpp: float | None
    target_mpp: float | None
    level0_magnification: float | None
    target_magnification: float | None


def resolve_resolution(*, target_mpp: float | None = None, target_magnification: float | None = None,
                       slide_mpp: float | None = None, slide_magnification: float | None = None) -> Resolution:
    """Downsample from level 0 to the requested resolution, and the four mpp/magnification values
    (see the module notes). Raises MissingResolutionError when the slide's resolution is unknown."""
    if (target_mpp is None) == (target_magnification is None):
        raise ValueError("give exactly one of target_mpp or target_magnification")
    for nm, v in (("target_mpp", target_mpp), ("target_magnification", target_magnification),
                  ("slide_mpp", slide_mpp), ("slide_magnification", slide_magnification)):
        if v is not None and not (isinstance(v, numbers.Real) and not isinstance(v, bool)
                                  and math.isfinite(v) and v > 0):
            raise ValueError(f"{nm} must be a positive number, got {v!r}")
    if slide_mpp is None and slide_magnification is None:
        want = f"target_mpp={target_mpp}" if target_mpp is not None else f"target_magnification={target_magnification}"
        raise MissingResolutionError(
            f"the slide has no mpp (microns per pixel) or objective power in its metadata, so {want} "
            "cannot be turned into a downsample; pass slide_mpp=... (e.g. 0.25 for a 40x scan) or "
            "slide_magnification=...")
    if target_mpp is not None:
        mpp0 = slide_mpp if slide_mpp is not None else 10.0 / slide_magnification
        ds = target_mpp / mpp0
        mag0 = 10.0 / mpp0 if slide_magnification is None else float(slide_magnification)
        # written magnifications must reproduce ds for readers that use their ratio (TRIDENT)
        return Resolution(ds, mpp0, target_mpp, mag0, mag0 / ds)
    mag0 = float(slide_magnification) if slide_magnification is not None else float(nominal_magnification(slide_mpp))
    ds = mag0 / target_magnification
    mpp0 = slide_mpp if slide_mpp is not None else 10.0 / mag0
    return Resolution(ds, mpp0, mpp0 * ds, mag0, float(target_magnification))


def best_level(level_downsamples: Sequence[float], downsample: float, tolerance: float = 0.01) -> int:
    """Index of the level with the largest downsample <= downsample * (1 + tolerance); level 0 when
    even level 0 is coarser (upsampling)."""
    ds = np.asarray(level_downsamples, dtype=np.float64)
    if ds.ndim != 1 or ds.size == 0 or not np.all(np.isfinite(ds)) or np.any(ds <= 0):
        raise ValueError(f"level_downsamples must be positive numbers, got {list(level_downsamples)}")
    ok = np.flatnonzero(ds <= downsample * (1.0 + tolerance))
    if ok.size == 0:
        return 0
    return int(ok[np.argmax(ds[ok])])


def _axis_count(length: int, size0: int, stride: int, edge: str) -> int:
    if edge == "inside":
        return (length - size0) // stride + 1 if length >= size0 else 0
    return -(-length // stride) if length > 0 else 0  # top-left corner inside the slide


def _axis_starts(length: int, size0: int, stride: int, edge: str) -> np.ndarray:
    return np.arange(_axis_count(length, size0, stride, edge), dtype=np.int64) * stride


def _interp_cols(sat: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Summed-area table interpolated at fractional column positions u (clipped to the mask):
    the integral of the mask over [0, v_i) x [0, u) is bilinear in each cell, so linear
    interpolation along each axis is exact."""
    w = sat.shape[1] - 1
    u = np.clip(u, 0.0, float(w))
    i = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    a = u - i
    if w == 0:
        return sat[:, :1].repeat(len(u), axis=1)
    return sat[:, i] * (1.0 - a) + sat[:, i + 1] * a


def tissue_fractions(mask: np.ndarray, mask_scale_xy: tuple[float, float], xs: np.ndarray, ys: np.ndarray,
                     size0: int) -> np.ndarray:
    """Tissue fraction (len(ys), len(xs)) of the square patches with level-0 top-left corners on
    the grid xs x ys and side size0, against a mask whose pixel (i, j) covers level-0
    [j*sx, (j+1)*sx) x [i*sy, (i+1)*sy)."""
    m = np.asarray(mask, dtype=bool)
    sx, sy = (float(v) for v in mask_scale_xy)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {m.shape}")
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"mask_scale_xy must be two positive numbers, got {mask_scale_xy}")
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(m, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
    u0, u1 = xs / sx, (xs + size0) / sx
    v0, v1 = ys / sy, (ys + size0) / sy
    cols = np.concatenate([u0, u1])
    g = _interp_cols(sat, cols)  # (h+1, 2*nx)
    g = _interp_cols(np.ascontiguousarray(g.T), np.concatenate([v0, v1])).T  # (2*ny, 2*nx)
    nx, ny = len(xs), len(ys)
    area = g[ny:, nx:] - g[ny:, :nx] - g[:ny, nx:] + g[:ny, :nx]
    return area / ((size0 / sx) * (size0 / sy))


def patch_grid(mask: np.ndarray | None, mask_scale_xy: tuple[float, float] | None, level0_size: tuple[int, int], *,
               patch_size: int = 256, target_mpp: float | None = None, target_magnification: float | None = None,
               slide_mpp: float | None = None, slide_magnification: float | None = None, overlap: int = 0,
               min_tissue: float = 0.1, level_downsamples: Sequence[float] = (1.0,), edge: str = "inside",
               level_tolerance: float = 0.01, name: str = "", savetodir: str = "",
               exclude: np.ndarray | None = None, max_excluded: float = 0.05,
               holes: np.ndarray | None = None) -> PatchGrid:
    """Square patches of `patch_size` target pixels at `target_mpp` (or `target_magnification`),
    over the tissue in `mask` (None: every grid position). See the module notes for the rules.

    mask: (h, w) bool; mask_scale_xy: level-0 pixels per mask pixel (sx, sy), as returned by
    `mask_from_slide`; level0_size: (width, height); level_downsamples: the slide's pyramid."""
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {EDGE_MODES}, got {edge!r}")
    if not (isinstance(patch_size, (int, np.integer)) and patch_size >= 1):
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not (isinstance(overlap, (int, np.integer)) and 0 <= overlap < patch_size):
        raise ValueError(f"overlap must be an int in [0, patch_size={patch_size}), got {overlap!r}")
    if not (0.0 <= float(min_tissue) <= 1.0):
        raise ValueError(f"min_tissue must be a fraction in [0, 1], got {min_tissue}")
    if not (0.0 <= float(max_excluded) <= 1.0):
        raise ValueError(f"max_excluded must be a fraction in [0, 1], got {max_excluded}")
    w0, h0 = (int(v) for v in level0_size)
    if w0 < 0 or h0 < 0:
        raise ValueError(f"level0_size must be non-negative (width, height), got {level0_size}")
    res = resolve_resolution(target_mpp=target_mpp, target_magnification=target_magnification,
                             slide_mpp=slide_mpp, slide_magnification=slide_magnification)
    size0 = max(1, round(patch_size * res.downsample))
    if not MIN_PATCH_LEVEL0 <= size0 <= MAX_PATCH_LEVEL0:
        raise GridError(f"a {patch_size} px patch at downsample {res.downsample:.4g} covers {size0} level-0 px "
                        f"(allowed: {MIN_PATCH_LEVEL0}..{MAX_PATCH_LEVEL0}); check the slide's mpp/magnification "
                        f"(level-0 mpp {res.level0_mpp:.4g}, magnification {res.level0_magnification:.4g})")
    stride = size0 - round(overlap * res.downsample)
    if stride < 1:
        raise ValueError(f"overlap {overlap} leaves no step between patches at downsample {res.downsample:.4g}")
    n_grid = _axis_count(w0, size0, stride, edge) * _axis_count(h0, size0, stride, edge)
    if n_grid > MAX_GRID_PATCHES:
        raise GridError(f"{n_grid} patch positions of {size0} level-0 px over {w0}x{h0} px: more than "
                        f"{MAX_GRID_PATCHES}; check the slide's mpp/magnification or the patch size")
    level = best_level(level_downsamples, res.downsample, level_tolerance)
    lds = float(level_downsamples[level])
    read_size = max(1, round(size0 / lds))

    xs = _axis_starts(w0, size0, stride, edge)
    ys = _axis_starts(h0, size0, stride, edge)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64).reshape(-1, 2)
    frac = None
    if mask is not None:
        if mask_scale_xy is None:
            raise ValueError("mask_scale_xy is required with a mask")
        frac = tissue_fractions(mask, mask_scale_xy, xs.astype(np.float64), ys.astype(np.float64), size0).ravel()
        # a hair of slack: the summed-area arithmetic is float64, the threshold a user's decimal
        keep = frac > 1e-12 if min_tissue == 0 else frac >= float(min_tissue) - 1e-9
        if exclude is not None and bool(np.any(exclude)):
            ex = tissue_fractions(_same_shape(exclude, mask, "exclude"), mask_scale_xy, xs.astype(np.float64),
                                  ys.astype(np.float64), size0).ravel()
            keep &= ex <= float(max_excluded) + 1e-9
        if holes is not None and bool(np.any(holes)):
            hm = _same_shape(holes, mask, "holes")
            sx, sy = (float(v) for v in mask_scale_xy)
            ci = np.clip(((coords[:, 1] + size0 / 2) // sy).astype(np.int64), 0, hm.shape[0] - 1)
            cj = np.clip(((coords[:, 0] + size0 / 2) // sx).astype(np.int64), 0, hm.shape[1] - 1)
            keep &= ~hm[ci, cj]
        coords, frac = coords[keep], frac[keep]
    return PatchGrid(coords=coords, patch_size=int(patch_size), patch_size_level0=size0, level=level,
                     level_downsample=lds, read_size=read_size, downsample=res.downsample, overlap=int(overlap),
                     level0_size=(w0, h0), level0_mpp=res.level0_mpp, target_mpp=res.target_mpp,
                     level0_magnification=res.level0_magnification,
                     target_magnification=res.target_magnification, edge=edge,
                     min_tissue=float(min_tissue) if mask is not None else None, tissue_fraction=frac,
                     name=name, savetodir=savetodir)


def _same_shape(a: np.ndarray, mask: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=bool)
    if a.shape != np.shape(mask):
        raise ValueError(f"{what} must have the mask's shape {np.shape(mask)}, got {a.shape}")
    return a


def grid_for_slide(slide: Any, mask: np.ndarray | None, mask_scale_xy: tuple[float, float] | None, *,
                   slide_mpp: float | None = None, slide_magnification: float | None = None,
                   **kwargs: Any) -> PatchGrid:
    """`patch_grid` with the level-0 size, pyramid and resolution taken from a slide object
    (`levels`, `downsamples`, and `mpp` / `objective_power` when it has them); explicit
    slide_mpp / slide_magnification win over the slide's metadata. A slide with an mpp gets its
    magnification from it (`nominal_magnification`'s standard buckets, as TRIDENT does: 0.499
    um/px -> 20x even where the metadata's objective power says otherwise; the exact mpp is kept
    as level0_mpp); the metadata's objective power counts only for a slide without an mpp (or one
    too coarse for a bucket)."""
    mpp = slide_mpp if slide_mpp is not None else getattr(slide, "mpp", None)
    mag = slide_magnification
    if mag is None:
        mag = getattr(slide, "objective_power", None)
        if mpp is not None and mpp < NOMINAL_MAX_MPP:
            mag = None  # resolve_resolution takes the bucket of the mpp
    name = getattr(slide, "name", None) or (Path(str(slide.path)).stem if getattr(slide, "path", None) else "")
    kwargs.setdefault("name", str(name))
    return patch_grid(mask, mask_scale_xy, tuple(slide.levels[0]), slide_mpp=mpp, slide_magnification=mag,
                      level_downsamples=list(slide.downsamples), **kwargs)
