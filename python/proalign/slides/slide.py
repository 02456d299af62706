"""Opening slides: the TIFF fast path (our own directory parser + tile engine) for Aperio SVS and
generic tiled/stripped TIFF, OpenSlide 4 for everything else (DICOM-WSI, NDPI, MRXS, SCN, ...).

Both give the same `SlideInfo` and the same `read_region` convention as OpenSlide: level-0
coordinates for the top-left corner, size in pixels of the requested level, uint8 RGB (h, w, 3).
Pixels outside the image are white (brightfield background), in both paths. At a level whose
downsample makes x/ds fractional, the fast path starts at the nearest level pixel, where OpenSlide
resamples at the fractional offset (cairo, bilinear); grids read at level > 0 put their corners on
level pixels, so both agree there.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .tiff_index import CODECS, TiffPage, read_tiff_pages

TIFF_SUFFIXES = {".svs", ".tif", ".tiff"}
_OPENSLIDE_WHITE = 255
# Plausible microscope resolutions: metadata outside these is treated as missing (a 72-dpi default,
# a typo, a crafted file), so the usual "pass --slide-mpp" error applies instead of an absurd grid.
MPP_RANGE = (0.01, 100.0)  # microns per level-0 pixel
MAGNIFICATION_RANGE = (1.0, 200.0)  # objective power
# The most uncompressed bytes one stored tile or strip may hold (256 MiB): one decoded tile is the
# unit of memory of every reader, so larger ones (a whole big image in a single strip) are refused.
MAX_TILE_RAW_BYTES = 1 << 28
_THUMBNAIL_BAND_BYTES = 64 << 20  # most bytes of one band read by get_thumbnail
_DECODE_CHUNK_BYTES = 64 << 20  # read_region decodes its tiles in chunks of about this many bytes


@dataclass(frozen=True)
class SlideInfo:
    path: str
    format: str  # "aperio-svs" | "generic-tiff" | "openslide:<vendor>"
    levels: list[tuple[int, int]]  # (width, height) per level, level 0 first
    downsamples: list[float]
    mpp: float | None  # microns per pixel at level 0
    objective_power: float | None
    tile_size: tuple[int, int] | None  # (width, height) of level 0's stored tiles, None if unknown
    codec: str | None  # level 0's codec, None if unknown (OpenSlide path)
    mpp_source: str = "metadata"  # "metadata" | "user" | "key:<property>" (--custom-mpp-keys) | "none"
    properties: dict[str, str] = field(default_factory=dict)
    resolution_note: str = ""  # why a metadata mpp/magnification was ignored, for error messages


class Slide:
    """Common behaviour of both readers; subclasses set `info` and implement `_read_level`."""

    info: SlideInfo

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def levels(self) -> list[tuple[int, int]]:
        return self.info.levels

    @property
    def downsamples(self) -> list[float]:
        return self.info.downsamples

    @property
    def mpp(self) -> float | None:
        return self.info.mpp

    @property
    def objective_power(self) -> float | None:
        return self.info.objective_power

    @property
    def format(self) -> str:
        return self.info.format

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.levels[0]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level not coarser than `downsample` (1% slack: level downsamples are ratios of
        rounded sizes, e.g. 4.0003); the same rule as the patch grid's."""
        from .grid import best_level

        return best_level(self.downsamples, downsample)

    def level_origin(self, x: int, y: int, level: int) -> tuple[int, int]:
        ds = self.downsamples[level]
        return int(math.floor(x / ds + 0.5)), int(math.floor(y / ds + 0.5))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    fill: int = 255) -> np.ndarray:
        """uint8 RGB (h, w, 3) of `size` pixels at `level`, top-left at level-0 `location`. Pixels
        outside the image get the grey value `fill`: 255 white (default), 0 black (what OpenSlide's
        RGBA converted to RGB gives, as TRIDENT reads)."""
        if not 0 <= level < len(self.levels):
            raise SlideError(self.path, f"level {level} does not exist (the slide has {len(self.levels)})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {size}")
        return self._read_level(level, *self.level_origin(int(location[0]), int(location[1]), level), w, h,
                                fill=fill)

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int, fill: int = 255) -> np.ndarray:
        raise NotImplementedError

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide, longest side at most `max_size`, read band by band from the smallest
        level that is at least that large, so memory stays bounded by one band plus the result."""
        from PIL import Image

        w0, h0 = self.levels[0]
        scale = max(w0, h0) / max_size
        level = self.best_level_for_downsample(max(scale, 1.0))
        lw, lh = self.levels[level]
        tw, th = max(1, round(w0 / max(scale, 1.0))), max(1, round(h0 / max(scale, 1.0)))
        band = max(1, min(1024, _THUMBNAIL_BAND_BYTES // (3 * lw)))  # wide levels without a pyramid
        out = np.empty((th, tw, 3), np.uint8)
        row = 0
        for ly in range(0, lh, band):
            bh = min(band, lh - ly)
            y_end = th if ly + bh >= lh else round((ly + bh) * th / lh)
            if y_end <= row:
                continue
            img = self._read_level(level, 0, ly, lw, bh)
            out[row:y_end] = np.asarray(Image.fromarray(img).resize((tw, y_end - row), Image.BILINEAR,
                                                                    reducing_gap=2.0))
            row = y_end
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return (f"<{type(self).__name__} {Path(i.path).name} {i.format} {i.levels[0][0]}x{i.levels[0][1]} "
                f"levels={len(i.levels)} mpp={i.mpp} codec={i.codec}>")


def _aperio_fields(description: str) -> dict[str, str]:
    fields = {}
    for part in description.split("|")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            fields[k.strip()] = v.strip()
    return fields


def _float_or_none(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _in_range(v, bounds: tuple[float, float]) -> float | None:
    f = _float_or_none(v)
    return f if f is not None and bounds[0] <= f <= bounds[1] else None


def _metadata_resolution(raw_mpp, raw_mag) -> tuple[float | None, float | None, str]:
    """(mpp, objective power, note) from metadata strings: values outside MPP_RANGE /
    MAGNIFICATION_RANGE count as missing, and the note says what was ignored."""
    mpp, mag = _in_range(raw_mpp, MPP_RANGE), _in_range(raw_mag, MAGNIFICATION_RANGE)
    notes = []
    if raw_mpp is not None and mpp is None:
        notes.append(f"metadata mpp {raw_mpp!r} ignored (plausible: {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px)")
    if raw_mag is not None and mag is None:
        notes.append(f"metadata magnification {raw_mag!r} ignored (plausible: {MAGNIFICATION_RANGE[0]:g}-"
                     f"{MAGNIFICATION_RANGE[1]:g}x)")
    if mpp is not None and mag is not None and not 1 / 3 <= mag * mpp / 10.0 <= 3:
        # The two disagree wildly (10 / mpp is the magnification an mpp stands for: 0.25 um/px ~ 40x).
        # The mpp is measured by the scanner, the magnification typed in a profile: trust the mpp,
        # so a --mag request goes through the slide's nominal magnification of its mpp instead.
        notes.append(f"metadata magnification {mag:g}x ignored: it disagrees with the mpp {mpp:g} um/px")
        mag = None
    return mpp, mag, "; ".join(notes)


class TiffSlide(Slide):
    """Aperio SVS and generic TIFF through our parser, the tile engine and the CPU decoder."""

    def __init__(self, path: str | Path, pages: list[TiffPage] | None = None, threads: int = 4):
        from ..decode.cpu import CpuDecoder, TileFormat
        from .tile_engine import jpeg_prefix, open_reader

        path = Path(path)
        pages = pages if pages is not None else read_tiff_pages(path)
        base = pages[0]
        aperio = base.description.startswith("Aperio")
        _check_rgb(path, base)
        levels = [base]
        for p in pages[1:]:
            if aperio and ("label" in p.description or "macro" in p.description):
                continue
            if (p.tiled and p.width < levels[-1].width and _same_aspect(base, p)
                    and p.samples_per_pixel == base.samples_per_pixel and p.codec in CODECS.values()):
                levels.append(p)
        self.pages = levels
        props: dict[str, str] = {}
        mpp = objective = None
        note = ""
        if aperio:
            props = {f"aperio.{k}": v for k, v in _aperio_fields(base.description).items()}
            mpp, objective, note = _metadata_resolution(props.get("aperio.MPP"), props.get("aperio.AppMag"))
        elif base.x_resolution and base.resolution_unit in (2, 3):
            per_unit_um = 25400.0 if base.resolution_unit == 2 else 10000.0
            mpp = _in_range(per_unit_um / base.x_resolution, MPP_RANGE)  # 72 dpi defaults are not microscope mpp
        for i, p in enumerate(levels):
            raw = p.tile_width * p.tile_height * p.samples_per_pixel
            if raw > MAX_TILE_RAW_BYTES:
                what = "tile" if p.tiled else "strip"
                raise SlideError(path, f"level {i}: one {what} of {p.tile_width}x{p.tile_height} px holds {raw} "
                                       f"bytes uncompressed (over {MAX_TILE_RAW_BYTES >> 20} MiB): this layout "
                                       "is not supported")
        w0, h0 = base.width, base.height
        self.info = SlideInfo(
            path=str(path), format="aperio-svs" if aperio else "generic-tiff",
            levels=[(p.width, p.height) for p in levels],
            downsamples=[(w0 / p.width + h0 / p.height) / 2.0 for p in levels],
            mpp=mpp, objective_power=objective, tile_size=(base.tile_width, base.tile_height), codec=base.codec,
            mpp_source="metadata" if mpp else "none", properties=props, resolution_note=note)
        self.formats = [TileFormat(p.codec, p.compression, p.photometric, p.tile_width, p.tile_height,
                                   p.samples_per_pixel, p.predictor, p.tiled) for p in levels]
        self.readers = [open_reader(path, jpeg_prefix(p.jpeg_tables, p.photometric) if p.codec == "jpeg" else b"",
                                    p.codec == "jpeg", threads) for p in levels]
        self.decoder = CpuDecoder(threads=min(threads, 4))
        # (level, {tile index: decoded tile}) of the last read's bottom tile row (at most one chunk of
        # _read_level): the next band of a band-by-band read (get_thumbnail) often starts in that row,
        # so a big strip is decoded once, not once per band.
        self._last_row: tuple[int, dict[int, np.ndarray]] = (-1, {})

    def tiles_for_rect(self, level: int, lx: int, ly: int, w: int, h: int) -> list[tuple[int, int]]:
        """(column, row) of every stored tile of `level` that overlaps the rectangle."""
        return tiles_for_rect(self.pages[level], lx, ly, w, h)

    def read_tiles(self, level: int, tiles: list[tuple[int, int]]) -> list[np.ndarray]:
        """Read and decode tiles of a level; a bad tile raises SlideError naming slide, level and tile."""
        from ..decode.cpu import TileDecodeError

        p = self.pages[level]
        idx = [r * p.tiles_across + c for c, r in tiles]
        cached_level, cached = self._last_row
        if cached_level != level:
            cached = {}
        todo = [k for k, t in enumerate(idx) if t not in cached]
        want = np.array([idx[k] for k in todo], np.int64)
        data, errors = self.readers[level].read(p.offsets[want], p.bytecounts[want])
        if errors:
            c, r = tiles[todo[errors[0][0]]]
            raise SlideError(self.path, f"level {level} tile (col {c}, row {r}): {errors[0][1]}")
        try:
            decoded = self.decoder.decode(data, self.formats[level])
        except TileDecodeError as e:
            c, r = tiles[todo[e.position]]
            raise SlideError(self.path, f"level {level} tile (col {c}, row {r}) does not decode: {e.problem}") from e
        out = [cached.get(t) for t in idx]
        for k, img in zip(todo, decoded):
            out[k] = img
        if tiles:
            last = max(r for _, r in tiles)
            self._last_row = (level, {t: img for t, (_, r), img in zip(idx, tiles, out) if r == last})
        return out

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int, fill: int = 255) -> np.ndarray:
        p = self.pages[level]
        # tiles the writer left empty are background: white whatever `fill` (outside the image) is
        covered = self.tiles_for_rect(level, lx, ly, w, h)
        tiles = [(c, r) for c, r in covered if p.bytecounts[r * p.tiles_across + c]]
        out = np.full((h, w, 3), fill, np.uint8)
        if fill != _OPENSLIDE_WHITE and len(tiles) < len(covered):
            white = np.full((p.tile_height, p.tile_width, 3), _OPENSLIDE_WHITE, np.uint8)
            for c, r in covered:
                if not p.bytecounts[r * p.tiles_across + c]:
                    paste_tile(out, white, lx, ly, c, r, p)
        # decoded a chunk at a time: memory holds `out` plus at most _DECODE_CHUNK_BYTES of tiles (or one)
        step = max(1, _DECODE_CHUNK_BYTES // (p.tile_width * p.tile_height * 3))
        for s in range(0, len(tiles), step):
            chunk = tiles[s:s + step]
            for (c, r), img in zip(chunk, self.read_tiles(level, chunk)):
                paste_tile(out, img, lx, ly, c, r, p)
        return out

    def close(self) -> None:
        self._last_row = (-1, {})
        self.decoder.close()
        for r in self.readers:
            if hasattr(r, "close"):
                r.close()


def tiles_for_rect(p: TiffPage, lx: int, ly: int, w: int, h: int) -> list[tuple[int, int]]:
    """(column, row) of every tile of a level (geometry `p`) that overlaps the rectangle."""
    x0, y0 = max(lx, 0), max(ly, 0)
    x1, y1 = min(lx + w, p.width), min(ly + h, p.height)
    if x1 <= x0 or y1 <= y0:
        return []
    return [(c, r) for r in range(y0 // p.tile_height, (y1 - 1) // p.tile_height + 1)
            for c in range(x0 // p.tile_width, (x1 - 1) // p.tile_width + 1)]


def paste_tile(out, tile, lx: int, ly: int, col: int, row: int, page: TiffPage) -> None:
    """Copy the part of decoded tile (col, row) that lies inside both the image and the region whose
    top-left is (lx, ly) at this level into `out` (numpy or torch, (h, w, 3))."""
    tx, ty = col * page.tile_width, row * page.tile_height
    x0, y0 = max(tx, lx), max(ty, ly)
    x1 = min(tx + page.tile_width, lx + out.shape[1], page.width, tx + tile.shape[1])
    y1 = min(ty + page.tile_height, ly + out.shape[0], page.height, ty + tile.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]


def _same_aspect(a: TiffPage, b: TiffPage) -> bool:
    ds_x, ds_y = a.width / b.width, a.height / b.height
    # level sizes are rounded: allow one pixel of rounding on either axis
    return abs(ds_x - ds_y) <= max(ds_x / min(b.width, b.height), 0.01 * ds_x) + 1e-9


def _check_rgb(path: Path, p: TiffPage) -> None:
    if p.codec.startswith("unsupported"):
        raise SlideError(path, f"unsupported TIFF compression {p.compression} (we read JPEG, JPEG 2000, LZW, "
                               "Deflate and uncompressed tiles)")
    if p.bits_per_sample != 8:
        raise SlideError(path, f"{p.bits_per_sample}-bit samples: only 8-bit RGB brightfield slides are supported")
    if p.samples_per_pixel not in (3, 4) or p.photometric not in (2, 6):
        raise SlideError(path, f"not an RGB brightfield image (SamplesPerPixel={p.samples_per_pixel}, "
                               f"Photometric={p.photometric}); multi-channel fluorescence slides are not supported")
    if p.planar != 1:
        raise SlideError(path, "planar (separate-plane) RGB TIFFs are not supported")


class OpenSlideSlide(Slide):
    """Every format OpenSlide 4 opens (DICOM-WSI, NDPI, MRXS, SCN, Philips TIFF, ...)."""

    def __init__(self, path: str | Path):
        import openslide

        path = Path(path)
        try:
            self._os = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(path, "unsupported or unrecognised slide format (neither our TIFF reader nor "
                                   "OpenSlide can open it)") from None
        except openslide.OpenSlideError as e:
            raise SlideError(path, f"OpenSlide cannot open it: {e}") from None
        props = dict(self._os.properties)
        mpp, objective, note = _metadata_resolution(props.get("openslide.mpp-x"),
                                                    props.get("openslide.objective-power"))
        tw = _float_or_none(props.get("openslide.level[0].tile-width"))
        th = _float_or_none(props.get("openslide.level[0].tile-height"))
        self.info = SlideInfo(
            path=str(path), format=f"openslide:{props.get('openslide.vendor', 'unknown')}",
            levels=[tuple(map(int, d)) for d in self._os.level_dimensions],
            downsamples=[float(d) for d in self._os.level_downsamples], mpp=mpp,
            objective_power=objective, tile_size=(int(tw), int(th)) if tw and th else None, codec=None,
            mpp_source="metadata" if mpp else "none", properties=props, resolution_note=note)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    fill: int = 255) -> np.ndarray:
        import openslide

        if not 0 <= level < len(self.levels):
            raise SlideError(self.path, f"level {level} does not exist (the slide has {len(self.levels)})")
        x, y, w, h = int(location[0]), int(location[1]), int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {size}")
        try:
            rgba = np.asarray(self._os.read_region((x, y), level, (w, h)))
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"OpenSlide read failed at level {level} ({x}, {y}) {w}x{h}: {e}") from None
        if fill == 0:  # RGBA -> RGB dropping alpha (PIL's convert, TRIDENT's read): transparent is black
            return np.ascontiguousarray(rgba[..., :3])
        return composite_on_white(rgba) if fill == _OPENSLIDE_WHITE else composite_on(rgba, fill)

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int, fill: int = 255) -> np.ndarray:
        ds = self.downsamples[level]
        return self.read_region((round(lx * ds), round(ly * ds)), level, (w, h), fill=fill)

    def close(self) -> None:
        self._os.close()


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA -> RGB on a white background (transparent = outside the image)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))  # premultiplied: c + (1 - a) * white
    return np.minimum(out, 255).astype(np.uint8)


def composite_on(rgba: np.ndarray, fill: int) -> np.ndarray:
    """As composite_on_white, on the grey value `fill` (0-255) instead of white."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint32) + (255 - alpha.astype(np.uint32)) * int(fill) // 255
    return np.minimum(out, 255).astype(np.uint8)


def open_slide(path: str | Path, mpp: float | None = None, threads: int = 4, mpp_keys: tuple[str, ...] = ()) -> Slide:
    """Open a slide: the TIFF fast path for SVS/TIFF files it understands, OpenSlide otherwise.
    `mpp` (microns per pixel at level 0) overrides or supplies the slide's own. `mpp_keys`:
    property names that hold the mpp when the standard metadata has none (slides/mpp.py)."""
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file")
    if not path.is_file():
        raise SlideError(path, "not a file")
    slide: Slide | None = None
    fast_error: SlideError | None = None
    if path.suffix.lower() in TIFF_SUFFIXES or _looks_like_tiff(path):
        try:
            pages = read_tiff_pages(path)
            if not _openslide_vendor_tiff(pages):
                slide = TiffSlide(path, pages, threads=threads)
        except SlideError as e:
            fast_error = e
    if slide is None:
        try:
            slide = OpenSlideSlide(path)
        except SlideError as e:
            raise fast_error or e from None
    if mpp is not None:
        if _in_range(mpp, MPP_RANGE) is None:
            raise SlideError(path, f"mpp must be a number of microns per pixel in {MPP_RANGE[0]}-{MPP_RANGE[1]}, "
                                   f"got {mpp}")
        info = slide.info
        slide.info = SlideInfo(**{**info.__dict__, "mpp": float(mpp), "mpp_source": "user"})
    elif mpp_keys:
        from .mpp import apply_mpp_keys

        apply_mpp_keys(slide, mpp_keys)
    return slide


def _looks_like_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\0", b"\0*", b"+\0", b"\0+")


# Vendor TIFF variants whose layout our parser does not model (OpenSlide knows them).
_VENDOR_MARKERS = (re.compile(r"^<\?xml.*<DataObject ObjectType=\"DPUfsImport\"", re.S),  # Philips
                   re.compile(r"^Leica SCN"), re.compile(r"<OME ", re.S))


def _openslide_vendor_tiff(pages: list[TiffPage]) -> bool:
    d = pages[0].description
    return any(m.search(d) for m in _VENDOR_MARKERS) or d.lstrip().startswith("<?xml") and "scn" in d.lower()
