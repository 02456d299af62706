"""Synthetic whole-slide files for tests and benchmarks: Aperio SVS and generic pyramidal TIFF.

Everything is generated (nothing is downloaded). The content is H&E-like tissue: pink stroma with
purple nuclei, built from stain optical densities, on a flat near-white background; optionally
green/blue/red/black pen strokes. It is deterministic in ``seed`` and the files are byte-identical
for the same arguments.

How the files are made (so tests can rely on it):

* The slide is cut into square cells (a multiple of the tile size) and a chosen subset of cells
  carries one tissue fragment each ("blobs": about half of them, "sparse": ``n_regions``,
  "dense": all of them, filled edge to edge, with visible seams between cells). Each cell is
  rendered on its own, once, and every other tile is the flat background.
* Every background tile is encoded once and, with ``share_blank_tiles`` (default), all of them
  point at the same bytes in the file. A 100,000 x 100,000 "sparse" slide is written in seconds
  and is a few MB.
* Lower levels are box-filtered straight from level 0 (``SyntheticSlide.render``) and level
  sizes are ``floor(size / downsample)`` (Aperio's rule; ``level_rounding="ceil"`` is there too).
* The TIFF structure is written here (no tifffile writer): tile data first, then the IFDs at
  the end; the file is classic TIFF unless an offset would pass 4 GiB (then BigTIFF), or as
  ``bigtiff`` forces.

Aperio SVS (``write_aperio_svs``) follows real files (CMU-1, TCGA): page 0 is the tiled level 0
with an ImageDescription that starts "Aperio Image Library" and carries ``|AppMag = ..|MPP = ..``
(both left out when None, as in TCGA JP2K slides); page 1 the stripped JPEG thumbnail; then the
tiled lower levels; then the LZW label (NewSubfileType 1) and the JPEG macro (NewSubfileType 9).
JPEG tiles are abbreviated streams (SOI, SOF0, SOS, data, EOI: no DQT/DHT/APPn) with the tables
in JPEGTables (tag 347), exactly one quantisation and one Huffman table pair for RGB. With
``photometric="rgb"`` (Aperio's default) the JPEG data are RGB with no colour transform, 4:4:4,
component ids 0, 1, 2 and no JFIF/Adobe marker, like Aperio's encoder: a decoder that is not told
the colour space guesses YCbCr and gets the colours wrong (OpenSlide and tifffile pass it from
the Photometric tag). ``photometric="ycbcr"`` writes ordinary YCbCr JPEG (ids 1, 2, 3, 4:2:0 by
default) with Photometric 6. JPEG 2000 tiles are J2K codestreams with Aperio compression 33005
(RGB, OpenJPEG's irreversible transform with MCT; ``quality`` is the target PSNR in dB, 100 means
lossless).

Generic TIFF (``write_pyramidal_tiff``): the levels are consecutive IFDs, level 1 onwards with
NewSubfileType 1 (reduced image), which is what OpenSlide's "generic-tiff" reader walks (it does
not read SubIFDs). JPEG (YCbCr by default, as libtiff/libvips write), Deflate, LZW or no
compression; X/YResolution in pixels per centimetre when ``mpp`` is given.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "BACKGROUND",
    "PEN_COLOURS",
    "Region",
    "PenStroke",
    "SyntheticSlide",
    "synthetic_slide",
    "level_image",
    "write_aperio_svs",
    "write_pyramidal_tiff",
    "split_jpeg",
]

BACKGROUND: tuple[int, int, int] = (242, 241, 239)
"""Flat background colour of every synthetic slide (glass with a little lamp tint)."""

PEN_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (40, 150, 85),
    "blue": (45, 75, 185),
    "red": (205, 45, 60),
    "black": (45, 45, 50),
}
"""Ink colours of the pen strokes (what a stroke looks like over the background)."""

# Stain optical-density directions (unit vectors, R, G, B): haematoxylin stains nuclei purple,
# eosin stains cytoplasm and stroma pink.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_HEMATOXYLIN /= np.linalg.norm(_HEMATOXYLIN)
_EOSIN = np.array([0.10, 0.85, 0.45], np.float32)
_EOSIN /= np.linalg.norm(_EOSIN)

_TISSUE_KINDS = ("blobs", "sparse", "dense", "none")
_APERIO_LIB = "Aperio Image Library v12.0.16"

# TIFF field types
_ASCII, _SHORT, _LONG, _RATIONAL, _UNDEFINED, _LONG8 = 2, 3, 4, 5, 7, 16
_TYPE_SIZE = {_ASCII: 1, _SHORT: 2, _LONG: 4, _RATIONAL: 8, _UNDEFINED: 1, _LONG8: 8}
_OFFSETS = -1  # pseudo type: LONG in classic TIFF, LONG8 in BigTIFF

COMPRESSION_CODES = {"none": 1, "lzw": 5, "jpeg": 7, "deflate": 8, "jpeg2000": 33005}
PHOTOMETRIC_CODES = {"rgb": 2, "ycbcr": 6}


# --------------------------------------------------------------------------------------------
# content
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A rectangle of the slide rendered as one piece, in level-0 pixels.

    ``tissue`` tells whether it carries a tissue fragment (a region may hold only pen strokes);
    ``cell`` is its (row, column) in the layout grid and seeds its rendering."""

    x: int
    y: int
    width: int
    height: int
    cell: tuple[int, int]
    tissue: bool = True

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive."""
        return self.x, self.y, self.x + self.width, self.y + self.height


@dataclass(frozen=True)
class PenStroke:
    """One pen stroke: its ink name and a level-0 bounding box (x0, y0, x1, y1) of the ink."""

    colour: str
    box: tuple[int, int, int, int]
    region: int  # index into SyntheticSlide.regions


@dataclass
class SyntheticSlide:
    """The level-0 content of a synthetic slide, rendered on demand and deterministically.

    Build it with :func:`synthetic_slide`. ``render(downsample, size)`` gives the exact RGB a
    writer encodes for a level (before compression); ``level0()`` is ``render(1, (w, h))``."""

    width: int
    height: int
    tile: int
    seed: int
    tissue: str
    mpp: float | None
    regions: tuple[Region, ...]
    pen_strokes: tuple[PenStroke, ...]
    background: tuple[int, int, int] = BACKGROUND
    image: np.ndarray | None = field(default=None, repr=False)
    _pens_by_region: dict[int, list[tuple[str, int]]] = field(default_factory=dict, repr=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tissue_boxes(self) -> list[tuple[int, int, int, int]]:
        """Level-0 boxes (x0, y0, x1, y1) of the regions that carry tissue."""
        return [r.box for r in self.regions if r.tissue]

    def render_region(self, index: int) -> np.ndarray:
        """Level-0 RGB (height, width, 3) uint8 of ``regions[index]``."""
        r = self.regions[index]
        if self.image is not None:
            return self.image[r.y:r.y + r.height, r.x:r.x + r.width]
        rng = np.random.default_rng([self.seed, 1, r.cell[0], r.cell[1]])
        return _render_tissue(r.height, r.width, rng, tissue=r.tissue, dense=self.tissue == "dense",
                              mpp=self.mpp or 0.25, background=self.background,
                              pens=self._pens_by_region.get(index, []), seed=self.seed)

    def pen_mask(self, min_alpha: float = 0.1) -> np.ndarray:
        """Level-0 boolean (height, width): where a pen stroke's ink opacity is at least `min_alpha`
        (strokes are drawn at up to 0.9; their edges are blurred by about a pixel). All False
        without pen marks. The ground truth for tests of pen-mark removal."""
        out = np.zeros((self.height, self.width), dtype=bool)
        for i, plist in self._pens_by_region.items():
            r = self.regions[i]
            for _, k in plist:
                out[r.y:r.y + r.height, r.x:r.x + r.width] |= _pen_alpha(r.height, r.width, k, self.seed) >= min_alpha
        return out

    def level0(self, max_pixels: int = 200_000_000) -> np.ndarray:
        """The whole level-0 RGB image (only for slides up to ``max_pixels``)."""
        return self.render(1.0, (self.width, self.height), max_pixels=max_pixels)

    def render(self, downsample: float, size: tuple[int, int], window: tuple[int, int, int, int] | None = None,
               max_pixels: int = 200_000_000) -> np.ndarray:
        """The RGB image (h, w, 3) of a level with this downsample and size (w, h), composed
        exactly the way the writers compose its tiles; ``window=(x, y, w, h)`` in that level's
        pixels renders only that part (and only the regions it touches)."""
        x, y, w, h = window if window is not None else (0, 0, *size)
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} is too large to render in one array (max_pixels={max_pixels})")
        pieces = []
        for i, r in enumerate(self.regions):
            if (math.floor(r.x / downsample) >= x + w or math.ceil((r.x + r.width) / downsample) <= x
                    or math.floor(r.y / downsample) >= y + h or math.ceil((r.y + r.height) / downsample) <= y):
                continue
            pieces += _pieces_of(self._cached_region(i), r, [downsample], [size], self.background)[0]
        return _compose(pieces, x, y, w, h, self.background)

    def _cached_region(self, index: int) -> np.ndarray:
        """render_region, remembered while the cache holds under 64 Mpx (for repeated renders
        of small slides in tests; the writers render each region once and never cache)."""
        if index in self._cache:
            return self._cache[index]
        raster = self.render_region(index)
        cached = sum(a.shape[0] * a.shape[1] for a in self._cache.values())
        if cached + raster.shape[0] * raster.shape[1] <= 64 << 20:
            self._cache[index] = raster
        return raster


def synthetic_slide(
    width: int,
    height: int,
    *,
    tile: int = 256,
    seed: int = 0,
    tissue: str = "blobs",
    pen_marks: bool | Sequence[str] = False,
    mpp: float | None = 0.25,
    n_regions: int = 3,
    region_size: int = 2048,
    tissue_fraction: float = 0.5,
    image: np.ndarray | None = None,
) -> SyntheticSlide:
    """Lay out a synthetic slide (cheap: nothing is rendered until asked).

    tissue: "blobs" (one irregular fragment in each of about ``tissue_fraction`` of the cells, all
    cells when there are at most 4), "sparse" (``n_regions`` fragments), "dense" (texture in
    every cell, no background tile at all) or "none". Cells are about ``region_size`` pixels
    (smaller on small slides), a multiple of ``tile``.
    pen_marks: True for green, blue and red strokes, or a sequence of names from PEN_COLOURS.
    mpp only scales the texture (nuclei are about 6 um across); None renders as 0.25.
    image: use this (height, width, 3) uint8 array as level 0 instead of generated tissue.
    """
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (TIFF), got {tile}")
    if image is not None:
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (height, width, 3) uint8, got {image.shape} {image.dtype}")
        if (image.shape[1], image.shape[0]) != (width, height):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, not {width}x{height}")
        if pen_marks:
            raise ValueError("pen_marks are drawn on generated tissue only, not on a given image")
        region = Region(0, 0, width, height, (0, 0), True)
        return SyntheticSlide(width, height, tile, seed, "image", mpp, (region,), (), image=image)
    if width < 1 or height < 1:
        raise ValueError(f"bad slide size {width}x{height}")
    if tissue not in _TISSUE_KINDS:
        raise ValueError(f"tissue must be one of {_TISSUE_KINDS}, got {tissue!r}")
    pens = _pen_list(pen_marks)

    longest = max(width, height)
    target = {"blobs": longest / 2, "sparse": longest / 4}.get(tissue, region_size)
    cell = int(min(region_size, max(target, 256)))
    cell = max(tile, int(round(cell / tile)) * tile)
    rows, cols = -(-height // cell), -(-width // cell)
    usable = [(r, c) for r in range(rows) for c in range(cols)
              if min(width - c * cell, cell) >= 64 and min(height - r * cell, cell) >= 64]
    rng = np.random.default_rng([seed, 0])
    if tissue in ("blobs", "dense") and (tissue == "dense" or len(usable) <= 4):
        chosen = usable
    elif tissue == "blobs":
        k = max(1, int(round(tissue_fraction * len(usable))))
        chosen = [usable[i] for i in sorted(rng.choice(len(usable), size=min(k, len(usable)), replace=False))]
    elif tissue == "sparse":
        k = min(n_regions, len(usable))
        chosen = [usable[i] for i in sorted(rng.choice(len(usable), size=k, replace=False))] if k else []
    else:
        chosen = []
    has_tissue = bool(chosen)
    if not chosen and pens and usable:
        chosen = [usable[len(usable) // 2]]  # a pen-only region on bare glass
    regions = tuple(Region(c * cell, r * cell, min(cell, width - c * cell), min(cell, height - r * cell),
                           (r, c), has_tissue) for r, c in chosen)

    pens_by_region: dict[int, list[tuple[str, int]]] = {}
    strokes: list[PenStroke] = []
    for k, colour in enumerate(pens):
        if not regions:
            break
        i = k % len(regions)
        pens_by_region.setdefault(i, []).append((colour, k))
    slide = SyntheticSlide(width, height, tile, seed, tissue, mpp, regions, (), _pens_by_region=pens_by_region)
    for i, plist in pens_by_region.items():
        r = regions[i]
        for colour, k in plist:
            x0, y0, x1, y1 = _pen_path(r.height, r.width, np.random.default_rng([seed, 2, k]))[1]
            strokes.append(PenStroke(colour, (r.x + x0, r.y + y0, r.x + x1, r.y + y1), i))
    slide.pen_strokes = tuple(strokes)
    return slide


def _pen_list(pen_marks: bool | Sequence[str]) -> list[str]:
    if pen_marks is True:
        return ["green", "blue", "red"]
    if not pen_marks:
        return []
    if isinstance(pen_marks, str):
        pen_marks = [pen_marks]
    out = list(pen_marks)
    for p in out:
        if p not in PEN_COLOURS:
            raise ValueError(f"unknown pen colour {p!r}; known: {sorted(PEN_COLOURS)}")
    return out


def _noise(rng: np.random.Generator, h: int, w: int, scale_y: float, scale_x: float | None = None) -> np.ndarray:
    """Smooth noise (float32, std about 0.7) with features of about ``scale`` pixels."""
    scale_x = scale_y if scale_x is None else scale_x
    gy, gx = h / max(scale_y, 1e-3), w / max(scale_x, 1e-3)
    grid = rng.standard_normal((int(gy) + 4, int(gx) + 4), dtype=np.float32)
    img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC, box=(1.0, 1.0, 1.0 + gx, 1.0 + gy))
    return np.asarray(img, dtype=np.float32)


def _upsample(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32)).resize((w, h), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def _render_tissue(h: int, w: int, rng: np.random.Generator, *, tissue: bool, dense: bool, mpp: float,
                   background: tuple[int, int, int], pens: list[tuple[str, int]], seed: int) -> np.ndarray:
    bg = np.asarray(background, np.float32)
    if not tissue:
        rgb = np.empty((h, w, 3), np.float32)
        rgb[:] = bg
        return _draw_pens(rgb, pens, seed)

    # tissue mask at 1/4 resolution: a few rotated elliptical lobes roughened by noise
    f = 4
    hs, ws = max(2, -(-h // f)), max(2, -(-w // f))
    if dense:
        soft = np.ones((h, w), np.float32)
    else:
        yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32)
        yy /= hs
        xx /= ws
        env = np.full((hs, ws), -10.0, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.36, 0.64, 2)
            rx, ry = rng.uniform(0.16, 0.30, 2)
            a = rng.uniform(0, np.pi)
            dx, dy = xx - cx, yy - cy
            u = (dx * np.cos(a) + dy * np.sin(a)) / rx
            v = (-dx * np.sin(a) + dy * np.cos(a)) / ry
            env = np.maximum(env, 1.0 - (u * u + v * v))
        m = min(hs, ws)
        fld = env + 0.45 * _noise(rng, hs, ws, m / 4) + 0.15 * _noise(rng, hs, ws, m / 14)
        edge = np.minimum(np.minimum(xx, 1 - xx) * ws, np.minimum(yy, 1 - yy) * hs) / max(1.0, 0.05 * m)
        fld -= 3.0 * np.clip(1.0 - edge, 0, 1)
        mask = _upsample(fld, w, h) > 0.05
        b = 8  # keep the region's border bare so neighbouring regions never touch
        mask[:b] = mask[-b:] = False
        mask[:, :b] = mask[:, -b:] = False
        soft = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)),
                          np.float32) / 255.0

    px_um = 1.0 / mpp  # pixels per micrometre
    # holes (lumens, fat) and stroma with fibres
    holes = _noise(rng, h, w, 35 * px_um)
    hole = np.clip((holes - 0.75) * 4.0, 0.0, 1.0)
    fib_a = np.abs(_noise(rng, h, w, 2.0 * px_um, 14 * px_um))
    fib_b = np.abs(_noise(rng, h, w, 14 * px_um, 2.0 * px_um))
    mix = np.clip(0.5 + 1.5 * _noise(rng, h, w, 40 * px_um), 0.0, 1.0)  # smooth change of fibre direction
    fib = mix * fib_a + (1.0 - mix) * fib_b
    stain_e, stain_h = rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15)  # staining varies between fragments
    eosin = 0.55 + 0.22 * _noise(rng, h, w, 8 * px_um) + 0.30 * fib
    eosin = stain_e * np.clip(eosin, 0.12, 1.2) * (1.0 - 0.85 * hole)

    # nuclei: rotated ellipses over about 22% of the tissue area, 30% of them small and dark
    r_px = 3.0 * px_um
    area = float(soft.sum())
    n = int(0.22 * area / (np.pi * r_px * r_px))
    nuc_img = Image.new("L", (w, h), 0)
    if n > 0 and area > 0:
        frac = area / (h * w)
        cand = int(n / max(frac, 1e-3) * 1.1) + 8
        cy = rng.uniform(0, h, cand)
        cx = rng.uniform(0, w, cand)
        keep = (soft[cy.astype(int), cx.astype(int)] > 0.5) & (hole[cy.astype(int), cx.astype(int)] < 0.3)
        cy, cx = cy[keep][:n], cx[keep][:n]
        k = len(cx)
        small = rng.random(k) < 0.3  # round, dark lymphocyte-like nuclei
        ra = r_px * np.where(small, rng.uniform(0.55, 0.75, k), rng.uniform(0.75, 1.4, k))
        rb = ra * np.where(small, rng.uniform(0.85, 1.0, k), rng.uniform(0.45, 0.95, k))
        ang = rng.uniform(0, np.pi, k)
        val = np.where(small, 255, rng.integers(140, 240, k))
        t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        ex = ra[:, None] * np.cos(t)[None]
        ey = rb[:, None] * np.sin(t)[None]
        px = cx[:, None] + ex * np.cos(ang)[:, None] - ey * np.sin(ang)[:, None]
        py = cy[:, None] + ex * np.sin(ang)[:, None] + ey * np.cos(ang)[:, None]
        pts = np.stack([px, py], axis=-1).reshape(k, -1)
        draw = ImageDraw.Draw(nuc_img)
        for i in range(k):
            draw.polygon(pts[i].tolist(), fill=int(val[i]))
        nuc_img = nuc_img.filter(ImageFilter.GaussianBlur(max(0.6, 0.12 * r_px)))
    nuc = np.asarray(nuc_img, np.float32) / 255.0
    chrom = 0.75 + 0.25 * np.clip(_noise(rng, h, w, 0.8 * px_um) + 0.5, 0, 1)
    hema = stain_h * (0.10 + 1.35 * nuc * chrom)

    od = hema[..., None] * _HEMATOXYLIN + (0.62 * eosin)[..., None] * _EOSIN
    od *= soft[..., None]
    rgb = bg * np.exp(-od)
    rgb += rng.standard_normal((h, w, 1), dtype=np.float32) * (2.0 * soft)[..., None]
    return _draw_pens(rgb, pens, seed)


def _pen_path(h: int, w: int, rng: np.random.Generator
              ) -> tuple[list[tuple[float, float]], tuple[int, int, int, int], int]:
    """A smooth stroke across a region: points, bounding box (x0, y0, x1, y1) of the ink, width."""
    width = max(6, min(h, w) // 28)
    horizontal = rng.random() < 0.5
    tt = np.linspace(0.08, 0.92, 240)
    a = np.full_like(tt, rng.uniform(0.25, 0.75)) + rng.uniform(-0.15, 0.15) * (tt - 0.5)
    for freq in (1.0, 2.3):  # a hand-drawn wobble
        a += rng.uniform(0.02, 0.07) / freq * np.sin(2 * np.pi * freq * tt + rng.uniform(0, 2 * np.pi))
    if horizontal:
        xs, ys = tt * w, a * h
    else:
        xs, ys = a * w, tt * h
    pts = list(zip(xs.tolist(), ys.tolist()))
    half = width // 2 + 3
    x0 = max(0, int(np.floor(xs.min())) - half)
    y0 = max(0, int(np.floor(ys.min())) - half)
    x1 = min(w, int(np.ceil(xs.max())) + half + 1)
    y1 = min(h, int(np.ceil(ys.max())) + half + 1)
    return pts, (x0, y0, x1, y1), width


def _pen_alpha(h: int, w: int, k: int, seed: int) -> np.ndarray:
    """Ink opacity (h, w) float32 in [0, 0.9] of stroke `k` over a region of h x w pixels."""
    pts, _, width = _pen_path(h, w, np.random.default_rng([seed, 2, k]))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    xy = np.asarray(pts)
    seg = np.hypot(*np.diff(xy, axis=0).T)
    dist = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(0.0, dist[-1] + 1.0, 1.5)  # a round nib every 1.5 px: no gaps at the joints
    r = width / 2
    for x, y in zip(np.interp(s, dist, xy[:, 0]), np.interp(s, dist, xy[:, 1])):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0)), np.float32) * (0.9 / 255.0)


def _draw_pens(rgb: np.ndarray, pens: list[tuple[str, int]], seed: int) -> np.ndarray:
    """Translucent ink over float RGB, then round to uint8."""
    h, w = rgb.shape[:2]
    for colour, k in pens:
        alpha = _pen_alpha(h, w, k, seed)
        ink = np.asarray(PEN_COLOURS[colour], np.float32) / 255.0
        rgb *= 1.0 - alpha[..., None] * (1.0 - ink)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# levels: pieces (a region downsampled into a level) and their composition into tiles
# --------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    x: int  # level pixels
    y: int
    arr: np.ndarray  # (h, w, 3) uint8

    @property
    def x1(self) -> int:
        return self.x + self.arr.shape[1]

    @property
    def y1(self) -> int:
        return self.y + self.arr.shape[0]


def _pieces_of(raster: np.ndarray, region: Region, downsamples: Sequence[float], sizes: Sequence[tuple[int, int]],
               background: tuple[int, int, int]) -> list[list[_Piece]]:
    """The region, box-filtered into each level. Level pixel i covers level-0 [i*ds, (i+1)*ds)."""
    out: list[list[_Piece]] = []
    x0, y0, x1, y1 = region.box
    for ds, (lw, lh) in zip(downsamples, sizes):
        if ds == 1:
            out.append([_Piece(x0, y0, raster)] if x0 < lw and y0 < lh else [])
            continue
        lx0, ly0 = int(math.floor(x0 / ds)), int(math.floor(y0 / ds))
        lx1, ly1 = min(lw, int(math.ceil(x1 / ds))), min(lh, int(math.ceil(y1 / ds)))
        if lx1 <= lx0 or ly1 <= ly0:
            out.append([])
            continue
        fx0, fy0, fx1, fy1 = lx0 * ds, ly0 * ds, lx1 * ds, ly1 * ds  # level-0 footprint
        ix0, iy0 = int(math.floor(fx0)), int(math.floor(fy0))
        ix1, iy1 = int(math.ceil(fx1)), int(math.ceil(fy1))
        pad = np.empty((iy1 - iy0, ix1 - ix0, 3), np.uint8)
        pad[:] = background
        sx0, sy0 = max(x0, ix0), max(y0, iy0)
        sx1, sy1 = min(x1, ix1), min(y1, iy1)
        pad[sy0 - iy0:sy1 - iy0, sx0 - ix0:sx1 - ix0] = raster[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
        img = Image.fromarray(pad).resize((lx1 - lx0, ly1 - ly0), Image.Resampling.BOX,
                                          box=(fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0))
        out.append([_Piece(lx0, ly0, np.asarray(img))])
    return out


def _compose(pieces: Iterable[_Piece], x: int, y: int, w: int, h: int, background: tuple[int, int, int]) -> np.ndarray:
    """The (h, w, 3) window at (x, y) of a level: background, darkened by every piece that
    overlaps it (pieces of neighbouring regions only share blended border pixels)."""
    hits = []
    for p in pieces:
        ax0, ay0 = max(x, p.x), max(y, p.y)
        ax1, ay1 = min(x + w, p.x1), min(y + h, p.y1)
        if ax0 < ax1 and ay0 < ay1:
            hits.append((p, ax0, ay0, ax1, ay1))
    out = np.empty((h, w, 3), np.uint8)
    out[:] = background
    if len(hits) == 1:
        p, ax0, ay0, ax1, ay1 = hits[0]
        out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = p.arr[ay0 - p.y:ay1 - p.y, ax0 - p.x:ax1 - p.x]
    elif hits:
        acc = out.astype(np.int16)
        bg = np.asarray(background, np.int16)
        for p, ax0, ay0, ax1, ay1 in hits:
            acc[ay0 - y:ay1 - y, ax0 - x:ax1 - x] -= bg - p.arr[ay0 - p.y:ay1 - p.y, ax0 - p.x:ax1 - p.x]
        out = np.clip(acc, 0, 255).astype(np.uint8)
    return out


def level_image(info: Mapping[str, Any], level: int, max_pixels: int = 200_000_000) -> np.ndarray:
    """The exact RGB (before compression) that a writer encoded for ``level`` of the file that
    ``info`` (the writer's return value) describes."""
    lv = info["levels"][level]
    return info["slide"].render(lv["downsample"], (lv["width"], lv["height"]), max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------
# codecs
# --------------------------------------------------------------------------------------------


def split_jpeg(stream: bytes) -> tuple[bytes, bytes, bytes]:
    """Split an interchange JPEG into (tables, frame and scan segments, entropy data to EOI).

    tables is SOI + every DQT/DHT + EOI (a JPEGTables value); APPn and COM are dropped."""
    if stream[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    tables, frame = [], []
    i = 2
    while True:
        if stream[i] != 0xFF:
            raise ValueError(f"bad JPEG marker at {i}")
        marker = stream[i + 1]
        length = int.from_bytes(stream[i + 2:i + 4], "big")
        seg = stream[i:i + 2 + length]
        if marker in (0xDB, 0xC4):
            tables.append(seg)
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            pass
        else:
            frame.append(seg)
        i += 2 + length
        if marker == 0xDA:
            break
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"".join(frame), stream[i:]


def _set_component_ids(frame: bytes, ids: Sequence[int]) -> bytes:
    """Rewrite the component ids in SOF0 and the selectors in SOS (in this order)."""
    out = bytearray(frame)
    i = 0
    while i < len(out):
        marker, length = out[i + 1], int.from_bytes(out[i + 2:i + 4], "big")
        if marker == 0xC0:
            n = out[i + 9]
            for c in range(n):
                out[i + 10 + 3 * c] = ids[c]
        elif marker == 0xDA:
            n = out[i + 4]
            for c in range(n):
                out[i + 5 + 2 * c] = ids[c]
        i += 2 + length
    return bytes(out)


class _JpegCodec:
    """Abbreviated baseline JPEG streams sharing one JPEGTables value."""

    compression = 7

    def __init__(self, quality: int, photometric: str, subsampling: str | None) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be 1..100, got {quality}")
        self.quality = quality
        self.rgb = photometric == "rgb"
        self.photometric = PHOTOMETRIC_CODES[photometric]
        if self.rgb:
            if subsampling not in (None, "444"):
                raise ValueError("RGB JPEG (Aperio style) is 4:4:4; use photometric='ycbcr' to subsample")
            self.subsampling = "444"
        else:
            self.subsampling = subsampling or "420"
            if self.subsampling not in ("444", "422", "420"):
                raise ValueError(f"subsampling must be '444', '422' or '420', got {subsampling!r}")
        self.ycbcr_subsampling = {"444": (1, 1), "422": (2, 1), "420": (2, 2)}[self.subsampling]
        self.jpegtables: bytes | None = None

    def encode(self, arr: np.ndarray) -> bytes:
        import imagecodecs

        stream = imagecodecs.jpeg8_encode(np.ascontiguousarray(arr), level=self.quality, colorspace="RGB",
                                          outcolorspace="RGB" if self.rgb else "YCBCR",
                                          subsampling=self.subsampling, optimize=False)
        tables, frame, data = split_jpeg(bytes(stream))
        if self.rgb:
            frame = _set_component_ids(frame, (0, 1, 2))  # what Aperio's encoder writes
        if self.jpegtables is None:
            self.jpegtables = tables
        elif tables != self.jpegtables:  # fixed quality + standard Huffman tables: cannot happen
            raise RuntimeError("JPEG tables differ between tiles")
        return b"\xff\xd8" + frame + data


class _J2kCodec:
    """Aperio JPEG 2000 (compression 33005): one J2K codestream per tile, RGB components."""

    compression = 33005
    photometric = 2
    jpegtables = None
    ycbcr_subsampling = None

    def __init__(self, quality: int) -> None:
        if quality <= 0:
            raise ValueError(f"JPEG 2000 quality is a PSNR in dB (> 0; 100 = lossless), got {quality}")
        self.quality = quality

    def encode(self, arr: np.ndarray) -> bytes:
        import imagecodecs

        if self.quality >= 100:
            return bytes(imagecodecs.jpeg2k_encode(arr, None, codecformat="J2K", reversible=True, numthreads=1))
        return bytes(imagecodecs.jpeg2k_encode(arr, self.quality, codecformat="J2K", reversible=False, mct=True,
                                               numthreads=1))


class _PlainCodec:
    """No compression, LZW or Deflate (zlib), with optional horizontal differencing."""

    photometric = 2
    jpegtables = None
    ycbcr_subsampling = None

    def __init__(self, kind: str, predictor: bool, level: int = 6) -> None:
        self.kind = kind
        self.compression = COMPRESSION_CODES[kind]
        self.predictor = predictor and kind != "none"
        self.level = level

    def encode(self, arr: np.ndarray) -> bytes:
        if self.predictor:
            d = arr.copy()
            d[:, 1:] -= arr[:, :-1]  # uint8 wraps, as TIFF Predictor 2 expects
            arr = d
        raw = np.ascontiguousarray(arr).tobytes()
        if self.kind == "none":
            return raw
        if self.kind == "deflate":
            import zlib

            return zlib.compress(raw, self.level)
        import imagecodecs

        return bytes(imagecodecs.lzw_encode(raw))


# --------------------------------------------------------------------------------------------
# TIFF writer: data first, IFDs at the end, classic or BigTIFF decided when closing
# --------------------------------------------------------------------------------------------


@dataclass
class _Tag:
    code: int
    type: int
    count: int
    payload: bytes | np.ndarray


def _short(code: int, *v: int) -> _Tag:
    return _Tag(code, _SHORT, len(v), np.asarray(v, "<u2").tobytes())


def _long(code: int, *v: int) -> _Tag:
    return _Tag(code, _LONG, len(v), np.asarray(v, "<u4").tobytes())


def _ascii(code: int, text: str) -> _Tag:
    b = text.encode("ascii", "replace") + b"\0"
    return _Tag(code, _ASCII, len(b), b)


def _rational(code: int, *pairs: tuple[int, int]) -> _Tag:
    return _Tag(code, _RATIONAL, len(pairs), np.asarray(pairs, "<u4").tobytes())


def _undefined(code: int, b: bytes) -> _Tag:
    return _Tag(code, _UNDEFINED, len(b), bytes(b))


def _offsets(code: int, arr: np.ndarray) -> _Tag:
    return _Tag(code, _OFFSETS, len(arr), np.asarray(arr, np.uint64))


class _TiffWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "wb")
        self.fh.write(b"\0" * 16)  # room for either header
        self.pos = 16
        self.pages: list[list[_Tag]] = []

    def write(self, data: bytes) -> int:
        if self.pos & 1:  # keep every block word-aligned, as TIFF 6 asks
            self.fh.write(b"\0")
            self.pos += 1
        off = self.pos
        self.fh.write(data)
        self.pos += len(data)
        return off

    @staticmethod
    def _ifd_bytes(tags: list[_Tag], pos: int, next_ifd: int, big: bool) -> bytes:
        tags = sorted(tags, key=lambda t: t.code)
        entry, cnt, ptr = (20, 8, 8) if big else (12, 2, 4)
        data_pos = pos + cnt + len(tags) * entry + ptr
        entries, extra = [], bytearray()
        for t in tags:
            typ, payload = t.type, t.payload
            if typ == _OFFSETS:
                typ = _LONG8 if big else _LONG
                payload = np.asarray(payload).astype("<u8" if big else "<u4").tobytes()
            elif isinstance(payload, np.ndarray):
                payload = payload.tobytes()
            if len(payload) <= ptr:
                value = payload.ljust(ptr, b"\0")
            else:
                value = struct.pack("<Q" if big else "<I", data_pos + len(extra))
                extra += payload
                if len(extra) % 8:
                    extra += b"\0" * (8 - len(extra) % 8)
            entries.append(struct.pack("<HH", t.code, typ) + struct.pack("<Q" if big else "<I", t.count) + value)
        head = struct.pack("<Q" if big else "<H", len(tags)) + b"".join(entries)
        return head + struct.pack("<Q" if big else "<I", next_ifd) + bytes(extra)

    @staticmethod
    def _ifd_size(tags: list[_Tag], big: bool) -> int:
        entry, cnt, ptr = (20, 8, 8) if big else (12, 2, 4)
        size = cnt + len(tags) * entry + ptr
        for t in tags:
            n = t.count * (8 if big else 4) if t.type == _OFFSETS else t.count * _TYPE_SIZE[t.type]
            if n > ptr:
                size += -(-n // 8) * 8
        return size

    def close(self, bigtiff: bool | None) -> bool:
        """Write the IFDs and the header; returns whether the file is BigTIFF."""
        def layout(big: bool) -> tuple[list[int], int]:
            positions, p = [], (self.pos + 7) & ~7
            for tags in self.pages:
                positions.append(p)
                p = (p + self._ifd_size(tags, big) + 7) & ~7
            return positions, p

        try:
            big = bigtiff
            if big is None:
                positions, end = layout(False)
                big = end >= 2**32
            if not big:
                positions, end = layout(False)
                if end >= 2**32:
                    raise ValueError("the file passes 4 GiB: it needs BigTIFF (bigtiff=True or None)")
            else:
                positions, end = layout(True)
            for i, tags in enumerate(self.pages):
                nxt = positions[i + 1] if i + 1 < len(positions) else 0
                self.fh.write(b"\0" * (positions[i] - self.pos))
                b = self._ifd_bytes(tags, positions[i], nxt, big)
                assert len(b) == self._ifd_size(tags, big)
                self.fh.write(b)
                self.pos = positions[i] + len(b)
            self.fh.seek(0)
            if big:
                self.fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, positions[0]))
            else:
                self.fh.write(b"II" + struct.pack("<HI", 42, positions[0]))
        finally:
            self.fh.close()
        return big


# --------------------------------------------------------------------------------------------
# the pyramid
# --------------------------------------------------------------------------------------------


@dataclass
class _Level:
    width: int
    height: int
    downsample: float
    tile: int
    offsets: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    pieces: list[_Piece] = field(default_factory=list)
    next_row: int = 0
    encoded: int = 0

    def __post_init__(self) -> None:
        self.cols = -(-self.width // self.tile)
        self.rows = -(-self.height // self.tile)
        self.offsets = np.full(self.rows * self.cols, -1, np.int64)  # -1: background tile
        self.counts = np.zeros(self.rows * self.cols, np.int64)


def _level_sizes(width: int, height: int, levels: Sequence[float], rounding: str) -> list[tuple[int, int]]:
    if not levels or levels[0] != 1:
        raise ValueError(f"levels must start with 1 (level 0), got {tuple(levels)}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"downsamples must increase, got {tuple(levels)}")
    rnd = {"floor": math.floor, "ceil": math.ceil}[rounding]
    sizes = [(max(1, int(rnd(width / ds))), max(1, int(rnd(height / ds)))) for ds in levels]
    for a, b in zip(sizes, sizes[1:]):
        if a == b:
            raise ValueError(f"two levels would both be {a[0]}x{a[1]}; use fewer levels")
    return sizes


class _PyramidBuilder:
    """Renders the slide region by region and writes every non-background tile once."""

    def __init__(self, writer: _TiffWriter, slide: SyntheticSlide, downsamples: Sequence[float],
                 sizes: Sequence[tuple[int, int]], codec: Any, extra_scales: Sequence[tuple[float, tuple[int, int]]]):
        self.w, self.slide, self.codec = writer, slide, codec
        self.bg = np.asarray(slide.background, np.uint8)
        self.levels = [_Level(s[0], s[1], float(ds), slide.tile) for ds, s in zip(downsamples, sizes)]
        self.extra_scales = list(extra_scales)
        self.extra_pieces: list[list[_Piece]] = [[] for _ in extra_scales]
        self.blank_bytes: bytes | None = None

    def _emit(self, lv: _Level, index: int, arr: np.ndarray) -> None:
        if (arr == self.bg).all():
            return
        data = self.codec.encode(arr)
        lv.offsets[index] = self.w.write(data)
        lv.counts[index] = len(data)
        lv.encoded += 1

    def _flush(self, lv: _Level, y_done: float, final: bool) -> None:
        t = lv.tile
        while lv.next_row < lv.rows:
            r = lv.next_row
            bottom = min((r + 1) * t, lv.height)
            if not final and bottom * lv.downsample > y_done:
                break
            top = r * t
            cols: dict[int, list[_Piece]] = {}
            for p in lv.pieces:
                if p.y < bottom and p.y1 > top:
                    for c in range(p.x // t, min(lv.cols, -(-p.x1 // t))):
                        cols.setdefault(c, []).append(p)
            for c, ps in sorted(cols.items()):
                self._emit(lv, r * lv.cols + c, _compose(ps, c * t, top, t, t, self.slide.background))
            lv.next_row += 1
        lv.pieces = [p for p in lv.pieces if p.y1 > lv.next_row * t]

    def run(self, share_blank: bool) -> bytes:
        slide, t = self.slide, self.slide.tile
        lv0 = self.levels[0]
        downs = [lv.downsample for lv in self.levels[1:]] + [s[0] for s in self.extra_scales]
        sizes = [(lv.width, lv.height) for lv in self.levels[1:]] + [s[1] for s in self.extra_scales]
        last_y = None
        for i, region in enumerate(slide.regions):
            if region.y != last_y:  # a new row of cells: everything above it is final
                for lv in self.levels[1:]:
                    self._flush(lv, region.y, final=False)
                last_y = region.y
            raster = slide.render_region(i)
            # level 0: cells are tile-aligned, so these tiles see only this region
            piece = [_Piece(region.x, region.y, raster)]
            for ty in range(region.y // t, -(-(region.y + region.height) // t)):
                for tx in range(region.x // t, -(-(region.x + region.width) // t)):
                    self._emit(lv0, ty * lv0.cols + tx, _compose(piece, tx * t, ty * t, t, t, slide.background))
            for k, ps in enumerate(_pieces_of(raster, region, downs, sizes, slide.background)):
                if k < len(self.levels) - 1:
                    self.levels[k + 1].pieces.extend(ps)
                else:
                    self.extra_pieces[k - len(self.levels) + 1].extend(ps)
            del raster, piece
        for lv in self.levels[1:]:
            self._flush(lv, float(slide.height), final=True)

        blank = np.empty((t, t, 3), np.uint8)
        blank[:] = slide.background
        self.blank_bytes = self.codec.encode(blank)
        shared = None
        for lv in self.levels:
            holes = np.flatnonzero(lv.offsets < 0)
            if not len(holes):
                continue
            if share_blank:
                if shared is None:
                    shared = self.w.write(self.blank_bytes)
                lv.offsets[holes] = shared
            else:
                for j in holes:
                    lv.offsets[j] = self.w.write(self.blank_bytes)
            lv.counts[holes] = len(self.blank_bytes)
        return self.blank_bytes

    def extra_image(self, k: int) -> np.ndarray:
        _, (w, h) = self.extra_scales[k]
        return _compose(self.extra_pieces[k], 0, 0, w, h, self.slide.background)


def _strip_page_data(writer: _TiffWriter, img: np.ndarray, codec: Any, rows_per_strip: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    offs, cnts = [], []
    for y in range(0, img.shape[0], rows_per_strip):
        data = codec.encode(np.ascontiguousarray(img[y:y + rows_per_strip]))
        offs.append(writer.write(data))
        cnts.append(len(data))
    return np.asarray(offs, np.uint64), np.asarray(cnts, np.uint64)


def _image_tags(*, width: int, height: int, codec: Any, subfiletype: int, description: str | None,
                offsets: np.ndarray, counts: np.ndarray, tile: int | None = None,
                rows_per_strip: int | None = None, predictor: bool = False,
                resolution: tuple[int, int] | None = None, software: str | None = None,
                aperio: bool = False) -> list[_Tag]:
    tags = [
        _long(254, subfiletype), _long(256, width), _long(257, height), _short(258, 8, 8, 8),
        _short(259, codec.compression), _short(262, codec.photometric), _short(277, 3), _short(284, 1),
    ]
    if description is not None:
        tags.append(_ascii(270, description))
    if software:
        tags.append(_ascii(305, software))
    if tile is not None:
        tags += [_long(322, tile), _long(323, tile), _offsets(324, offsets),
                 _Tag(325, _LONG, len(counts), np.asarray(counts, "<u4").tobytes())]
    else:
        tags += [_offsets(273, offsets), _long(278, rows_per_strip),
                 _Tag(279, _LONG, len(counts), np.asarray(counts, "<u4").tobytes())]
    if predictor and getattr(codec, "predictor", False):
        tags.append(_short(317, 2))
    if codec.jpegtables is not None:
        tags.append(_undefined(347, codec.jpegtables))
    if codec.compression == 7:
        if codec.photometric == 6:
            tags.append(_short(530, *codec.ycbcr_subsampling))
            tags.append(_rational(532, (0, 1), (255, 1), (128, 1), (255, 1), (128, 1), (255, 1)))
        elif aperio:
            tags.append(_short(530, 2, 2))  # Aperio writes it on RGB JPEG pages too; readers ignore it
    if resolution is not None:
        tags += [_rational(282, resolution), _rational(283, resolution), _short(296, 3)]
    if aperio:
        tags.append(_long(32997, 1))  # ImageDepth, as Aperio writes it
    return tags


def _resolution(mpp: float, downsample: float) -> tuple[int, int]:
    """Pixels per centimetre as a TIFF rational."""
    from fractions import Fraction

    fr = Fraction(1e4 / (mpp * downsample)).limit_denominator(10_000)
    while fr.numerator >= 2**32:
        fr = Fraction(fr.numerator // 2, max(1, fr.denominator // 2))
    return fr.numerator, fr.denominator


def _check_common(width: int, height: int, tile: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"bad slide size {width}x{height}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (TIFF), got {tile}")


def _codec_for(compression: str, quality: int | None, photometric: str | None, subsampling: str | None,
               predictor: bool, default_photometric: str, allowed: Sequence[str]) -> tuple[Any, int | None, str]:
    if compression not in allowed:
        raise ValueError(f"compression must be one of {tuple(allowed)}, got {compression!r}")
    if compression == "jpeg":
        photometric = photometric or default_photometric
        if photometric not in PHOTOMETRIC_CODES:
            raise ValueError(f"photometric must be 'rgb' or 'ycbcr', got {photometric!r}")
        q = 80 if quality is None else int(quality)
        return _JpegCodec(q, photometric, subsampling), q, photometric
    if photometric not in (None, "rgb"):
        raise ValueError(f"{compression} tiles are written as RGB (photometric='rgb')")
    if compression == "jpeg2000":
        q = 40 if quality is None else int(quality)
        return _J2kCodec(q), q, "rgb"
    return _PlainCodec(compression, predictor), None, "rgb"


def _levels_info(builder: _PyramidBuilder, width: int, height: int) -> list[dict[str, Any]]:
    out = []
    for lv in builder.levels:
        n = len(lv.offsets)
        out.append({
            "width": lv.width, "height": lv.height, "downsample": lv.downsample,
            # what OpenSlide reports: the mean of the width and height ratios
            "openslide_downsample": (width / lv.width + height / lv.height) / 2,
            "tiles_across": lv.cols, "tiles_down": lv.rows, "tiles": n,
            "encoded_tiles": lv.encoded, "background_tiles": n - lv.encoded,
        })
    return out


# --------------------------------------------------------------------------------------------
# public writers
# --------------------------------------------------------------------------------------------


def write_aperio_svs(
    path: str | PathLike[str],
    width: int,
    height: int,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int | None = None,
    levels: Sequence[float] = (1, 4, 16),
    mpp: float | None = 0.25,
    app_mag: float | None = 40,
    seed: int = 0,
    tissue: str = "blobs",
    pen_marks: bool | Sequence[str] = False,
    photometric: str = "rgb",
    subsampling: str | None = None,
    thumbnail: bool = True,
    label: bool = True,
    macro: bool = True,
    level_rounding: str = "floor",
    share_blank_tiles: bool = True,
    bigtiff: bool | None = None,
    n_regions: int = 3,
    region_size: int = 2048,
    tissue_fraction: float = 0.5,
    image: np.ndarray | None = None,
    extra_fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an Aperio-style SVS and describe it.

    compression: "jpeg" (quality 1..100, default 80) or "jpeg2000" (Aperio 33005; quality is
    the target PSNR in dB, default 40; 100 is lossless). photometric: "rgb" (Aperio: RGB JPEG
    data, no colour transform) or "ycbcr" (JPEG only; subsampling "420" by default).
    levels: downsample factors, starting at 1; any increasing values (3, 2.5, ...) work and level
    sizes are floor(size / downsample) (``level_rounding="ceil"`` for the other rule).
    mpp / app_mag: written as ``|MPP = ..|AppMag = ..``; None leaves the field out.
    thumbnail/label/macro: the stripped associated images (thumbnail second, label and macro last).
    extra_fields: more ``key = value`` fields for the description (OpenSlide shows them as
    ``aperio.<key>``). See :func:`synthetic_slide` for tissue, pen_marks, n_regions,
    region_size, tissue_fraction and image.

    Returns a dict: path, format ("aperio"), width, height, tile, compression (name),
    compression_code, photometric (name), photometric_code, quality, mpp, app_mag, bigtiff,
    file_size, levels (per level: width, height, downsample, openslide_downsample, tiles,
    tiles_across, tiles_down, encoded_tiles, background_tiles), level_dimensions,
    level_downsamples (as OpenSlide computes them), associated (names), thumbnail_size and
    thumbnail_downsample (``slide.render(thumbnail_downsample, thumbnail_size)`` is the
    thumbnail), jpeg_tables (bytes or None), blank_tile (the bytes every background tile points
    at), description (level 0), slide (the SyntheticSlide: ``slide.level0()``,
    ``slide.render(ds, size, window=...)``, ``slide.tissue_boxes``, ``slide.pen_strokes``; see
    also :func:`level_image`).

    Cost: rendering takes about 0.7 s per 2048 x 2048 tissue cell on one core; a "sparse"
    100,000 x 100,000 slide takes about 3 s and 2 MB, a "blobs" one renders about 1,200 such
    cells (a quarter of an hour). Memory: one cell at level 0 plus the lower levels' pieces of about one
    row of cells.
    """
    _check_common(width, height, tile)
    codec, q, photometric = _codec_for(compression, quality, photometric, subsampling, False, "rgb",
                                       ("jpeg", "jpeg2000"))
    sizes = _level_sizes(width, height, levels, level_rounding)
    slide = synthetic_slide(width, height, tile=tile, seed=seed, tissue=tissue, pen_marks=pen_marks, mpp=mpp,
                            n_regions=n_regions, region_size=region_size, tissue_fraction=tissue_fraction,
                            image=image)
    path = Path(path)

    codec_desc = (f"J2K/KDU Q={q}" if compression == "jpeg2000"
                  else f"JPEG/{'RGB' if photometric == 'rgb' else 'YCC'} Q={q}")
    fields: dict[str, Any] = {}
    if app_mag is not None:
        fields["AppMag"] = f"{app_mag:g}"
    fields.update({"StripeWidth": 2040, "ScanScope ID": "SYNTHETIC", "Filename": path.stem,
                   "Date": "01/01/26", "Time": "00:00:00", "User": "proalign-synthetic"})
    if mpp is not None:
        fields["MPP"] = f"{mpp:.4f}" if mpp >= 1e-4 else f"{mpp:g}"
    fields.update(extra_fields or {})
    props = "".join(f"|{k} = {v}" for k, v in fields.items())
    head = f"{_APERIO_LIB}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"

    thumb_scale = max(width / 1024, height / 768, 1.0)
    thumb_size = (max(1, int(width / thumb_scale)), max(1, int(height / thumb_scale)))
    extra = [(thumb_scale, thumb_size)] if (thumbnail or macro) else []

    writer = _TiffWriter(path)
    try:
        builder = _PyramidBuilder(writer, slide, list(levels), sizes, codec, extra)
        blank = builder.run(share_blank_tiles)
        pages: list[list[_Tag]] = []
        for i, lv in enumerate(builder.levels):
            desc = f"{head} {codec_desc}{props}" if i == 0 else f"{head} -> {lv.width}x{lv.height} {codec_desc}"
            pages.append(_image_tags(width=lv.width, height=lv.height, codec=codec, subfiletype=0, description=desc,
                                     offsets=lv.offsets, counts=lv.counts, tile=tile, aperio=True))
        associated = []
        thumb_img = builder.extra_image(0) if extra else None
        if thumbnail:
            tcodec = _JpegCodec(q if compression == "jpeg" else 80, photometric if compression == "jpeg" else "rgb",
                                subsampling if compression == "jpeg" else None)
            offs, cnts = _strip_page_data(writer, thumb_img, tcodec, 16)
            desc = f"{_APERIO_LIB}\n{width}x{height} -> {thumb_size[0]}x{thumb_size[1]} - {props}"
            pages.insert(1, _image_tags(width=thumb_size[0], height=thumb_size[1], codec=tcodec, subfiletype=0,
                                        description=desc, offsets=offs, counts=cnts, rows_per_strip=16, aperio=True))
            associated.append("thumbnail")
        if label:
            lab = _label_image(seed, path.stem)
            lcodec = _PlainCodec("lzw", predictor=True)
            offs, cnts = _strip_page_data(writer, lab, lcodec, 16)
            pages.append(_image_tags(width=lab.shape[1], height=lab.shape[0], codec=lcodec, subfiletype=1,
                                     description=f"{_APERIO_LIB}\nlabel {lab.shape[1]}x{lab.shape[0]}",
                                     offsets=offs, counts=cnts, rows_per_strip=16, predictor=True, aperio=True))
            associated.append("label")
        if macro:
            mac = _macro_image(thumb_img, _label_image(seed, path.stem), slide.background)
            mcodec = _JpegCodec(85, "rgb", None)
            offs, cnts = _strip_page_data(writer, mac, mcodec, 16)
            pages.append(_image_tags(width=mac.shape[1], height=mac.shape[0], codec=mcodec, subfiletype=9,
                                     description=f"{_APERIO_LIB}\nmacro {mac.shape[1]}x{mac.shape[0]}",
                                     offsets=offs, counts=cnts, rows_per_strip=16, aperio=True))
            associated.append("macro")
        writer.pages = pages
        big = writer.close(bigtiff)
    except BaseException:
        writer.fh.close()
        path.unlink(missing_ok=True)
        raise

    info = _common_info(path, slide, builder, codec, compression, photometric, q, mpp, big, blank, width, height)
    info.update({"format": "aperio", "app_mag": app_mag, "associated": sorted(associated),
                 "thumbnail_size": thumb_size if thumbnail else None,
                 "thumbnail_downsample": thumb_scale if thumbnail else None,
                 "description": pages[0][[t.code for t in pages[0]].index(270)].payload[:-1].decode()})
    return info


def write_pyramidal_tiff(
    path: str | PathLike[str],
    width: int,
    height: int,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int | None = None,
    levels: Sequence[float] = (1, 4, 16),
    mpp: float | None = 0.25,
    seed: int = 0,
    tissue: str = "blobs",
    pen_marks: bool | Sequence[str] = False,
    photometric: str | None = None,
    subsampling: str | None = None,
    predictor: bool = True,
    level_rounding: str = "floor",
    share_blank_tiles: bool = True,
    bigtiff: bool | None = None,
    n_regions: int = 3,
    region_size: int = 2048,
    tissue_fraction: float = 0.5,
    image: np.ndarray | None = None,
    description: str | None = "proalign synthetic pyramidal TIFF",
) -> dict[str, Any]:
    """Write a generic tiled pyramidal TIFF (OpenSlide vendor "generic-tiff") and describe it.

    Levels are consecutive IFDs; levels 1.. have NewSubfileType 1 (reduced image).
    compression: "jpeg" (YCbCr 4:2:0 by default, tables in JPEGTables; photometric="rgb" gives
    Aperio-style RGB JPEG), "deflate", "lzw" or "none" (``predictor``: horizontal differencing
    for Deflate/LZW). mpp: X/YResolution in pixels per centimetre on every level (scaled by the
    level's downsample); None writes no resolution tags. Other arguments and the returned dict
    as for :func:`write_aperio_svs` (format "generic-tiff", no associated images).
    """
    _check_common(width, height, tile)
    codec, q, photometric = _codec_for(compression, quality, photometric, subsampling, predictor, "ycbcr",
                                       ("jpeg", "deflate", "lzw", "none"))
    sizes = _level_sizes(width, height, levels, level_rounding)
    slide = synthetic_slide(width, height, tile=tile, seed=seed, tissue=tissue, pen_marks=pen_marks, mpp=mpp,
                            n_regions=n_regions, region_size=region_size, tissue_fraction=tissue_fraction,
                            image=image)
    path = Path(path)
    writer = _TiffWriter(path)
    try:
        builder = _PyramidBuilder(writer, slide, list(levels), sizes, codec, [])
        blank = builder.run(share_blank_tiles)
        pages = []
        for i, lv in enumerate(builder.levels):
            res = None
            if mpp is not None:
                res = _resolution(mpp, width / lv.width)
            pages.append(_image_tags(width=lv.width, height=lv.height, codec=codec, subfiletype=0 if i == 0 else 1,
                                     description=description if i == 0 else None, offsets=lv.offsets,
                                     counts=lv.counts, tile=tile, predictor=predictor, resolution=res,
                                     software="proalign synthetic_slides"))
        writer.pages = pages
        big = writer.close(bigtiff)
    except BaseException:
        writer.fh.close()
        path.unlink(missing_ok=True)
        raise
    info = _common_info(path, slide, builder, codec, compression, photometric, q, mpp, big, blank, width, height)
    info.update({"format": "generic-tiff", "associated": [], "description": description,
                 "predictor": bool(getattr(codec, "predictor", False))})
    return info


def _common_info(path: Path, slide: SyntheticSlide, builder: _PyramidBuilder, codec: Any, compression: str,
                 photometric: str, quality: int | None, mpp: float | None, big: bool, blank: bytes,
                 width: int, height: int) -> dict[str, Any]:
    lvs = _levels_info(builder, width, height)
    return {
        "path": str(path), "width": width, "height": height, "tile": slide.tile,
        "compression": compression, "compression_code": codec.compression,
        "photometric": photometric, "photometric_code": codec.photometric,
        "quality": quality, "mpp": mpp, "bigtiff": big, "file_size": path.stat().st_size,
        "levels": lvs, "level_dimensions": [(lv["width"], lv["height"]) for lv in lvs],
        "level_downsamples": [lv["openslide_downsample"] for lv in lvs],
        "jpeg_tables": codec.jpegtables, "blank_tile": blank, "slide": slide,
    }


# --------------------------------------------------------------------------------------------
# associated images
# --------------------------------------------------------------------------------------------


def _label_image(seed: int, name: str) -> np.ndarray:
    """A slide label: white paper, a 2D-barcode-like block and two lines of text."""
    w, h = 400, 460
    img = Image.new("RGB", (w, h), (250, 250, 247))
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng([seed, 3])
    n, cell, x0, y0 = 16, 14, 88, 40
    modules = rng.random((n, n)) < 0.5
    modules[:, 0] = True
    modules[-1, :] = True
    modules[0, ::2] = True
    modules[1::2, -1] = True
    for (r, c) in zip(*np.nonzero(modules)):
        draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1],
                       fill=(20, 20, 20))
    font = ImageFont.load_default()
    draw.text((40, 300), "PROALIGN SYNTHETIC", fill=(20, 20, 20), font=font)
    draw.text((40, 340), f"{name[:28]}  seed {seed}", fill=(20, 20, 20), font=font)
    return np.asarray(img)


def _macro_image(thumb: np.ndarray | None, label: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """A macro photo of the glass: the label at the left, the scanned area at the right."""
    mh, mw = 431, 1280
    img = Image.new("RGB", (mw, mh), (205, 207, 210))
    draw = ImageDraw.Draw(img)
    draw.rectangle([6, 6, mw - 7, mh - 7], fill=tuple(int(v) - 8 for v in background))
    lw = int(label.shape[1] * (mh - 40) / label.shape[0])
    img.paste(Image.fromarray(label).resize((lw, mh - 40), Image.Resampling.BILINEAR), (20, 20))
    if thumb is not None:
        area_w, area_h = mw - lw - 80, mh - 40
        s = min(area_w / thumb.shape[1], area_h / thumb.shape[0])
        tw, th = max(1, int(thumb.shape[1] * s)), max(1, int(thumb.shape[0] * s))
        x = lw + 50 + (area_w - tw) // 2
        img.paste(Image.fromarray(thumb).resize((tw, th), Image.Resampling.BILINEAR), (x, 20 + (area_h - th) // 2))
    return np.asarray(img)
