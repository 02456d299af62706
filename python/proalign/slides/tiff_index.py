"""The TIFF fast path's directory parser: classic TIFF and BigTIFF, little or big endian.

Reads only what the tile engine needs (tile/strip offsets and byte counts, JPEGTables, codec,
photometric, sizes, ImageDescription, resolution) straight from the IFDs, so a slide opens with a
few small reads and no pixel is touched. Strips are treated as full-width tiles, so plain stripped
TIFFs go through the same engine.

Every field is checked before it is used: a corrupt or crafted file raises SlideError naming the file
and the field, never a raw Python error or a huge allocation. Bounds (no real slide comes near them):
image sides 1..MAX_IMAGE_SIDE, tile sides 1..MAX_TILE_SIDE, and no tile or strip stored in more than
twice its uncompressed size plus 1 MiB (compressed data never grows that much).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError

# Tag numbers (TIFF 6.0, plus Aperio's private compressions and JPEGTables)
NEW_SUBFILE_TYPE, IMAGE_WIDTH, IMAGE_LENGTH, BITS_PER_SAMPLE, COMPRESSION = 254, 256, 257, 258, 259
PHOTOMETRIC, IMAGE_DESCRIPTION, STRIP_OFFSETS, SAMPLES_PER_PIXEL, ROWS_PER_STRIP = 262, 270, 273, 277, 278
STRIP_BYTE_COUNTS, X_RESOLUTION, Y_RESOLUTION, PLANAR_CONFIG, RESOLUTION_UNIT = 279, 282, 283, 284, 296
PREDICTOR, TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTE_COUNTS, SUB_IFDS = 317, 322, 323, 324, 325, 330
SAMPLE_FORMAT, JPEG_TABLES = 339, 347
_WANTED = {NEW_SUBFILE_TYPE, IMAGE_WIDTH, IMAGE_LENGTH, BITS_PER_SAMPLE, COMPRESSION, PHOTOMETRIC,
           IMAGE_DESCRIPTION, STRIP_OFFSETS, SAMPLES_PER_PIXEL, ROWS_PER_STRIP, STRIP_BYTE_COUNTS, X_RESOLUTION,
           Y_RESOLUTION, PLANAR_CONFIG, RESOLUTION_UNIT, PREDICTOR, TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS,
           TILE_BYTE_COUNTS, SUB_IFDS, SAMPLE_FORMAT, JPEG_TABLES}

# TIFF compression code -> our codec name. 33003/33005 are Aperio's JPEG 2000 (YCbCr / RGB).
CODECS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate", 33003: "jpeg2000",
          33005: "jpeg2000", 34712: "jpeg2000"}

# field type -> (struct code, size)
_TYPES = {1: ("B", 1), 2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 5: ("II", 8), 6: ("b", 1), 7: ("B", 1),
          8: ("h", 2), 9: ("i", 4), 10: ("ii", 8), 11: ("f", 4), 12: ("d", 8), 13: ("I", 4), 16: ("Q", 8),
          17: ("q", 8), 18: ("Q", 8)}
_MAX_IFDS = 4096  # a loop in the IFD chain must not hang us
MAX_IMAGE_SIDE = 1 << 20  # 1,048,576 px per side: over 5x the largest whole-slide images (~200,000 px)
MAX_TILE_SIDE = 1 << 16  # 65,536 px: TIFF tiles are 16..4096 px in practice
_BYTECOUNT_SLACK = 1 << 20  # a stored tile may be at most 2x its raw size + 1 MiB


@dataclass(frozen=True)
class TiffPage:
    """One image file directory, with tiles (or strips as full-width tiles)."""

    index: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    tiled: bool
    compression: int
    photometric: int
    samples_per_pixel: int
    bits_per_sample: int
    planar: int
    predictor: int
    subfile_type: int
    description: str
    jpeg_tables: bytes | None
    offsets: np.ndarray  # uint64, one per tile, row-major (tiles_down x tiles_across)
    bytecounts: np.ndarray  # uint64
    x_resolution: float | None
    resolution_unit: int

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)

    @property
    def codec(self) -> str:
        return CODECS.get(self.compression, f"unsupported({self.compression})")


def _read_value(raw: bytes, typ: int, count: int, bo: str):
    code, size = _TYPES[typ]
    if typ == 2:
        return raw[:count].split(b"\0", 1)[0].decode("latin-1")
    if typ == 7:
        return bytes(raw[:count])
    if typ in (5, 10):
        vals = struct.unpack(f"{bo}{2 * count}{code[0]}", raw[: 8 * count])
        return [vals[2 * i] / vals[2 * i + 1] if vals[2 * i + 1] else 0.0 for i in range(count)]
    return list(struct.unpack(f"{bo}{count}{code}", raw[: size * count]))


def read_tiff_pages(path: str | Path) -> list[TiffPage]:
    """Parse every IFD of the main chain (and the SubIFDs of each page) of a TIFF/BigTIFF file."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SlideError(path, f"cannot open: {e.strerror or e}") from e
    try:
        with f:
            pages = _read_pages(path, f)
    except SlideError:
        raise
    except OSError as e:
        raise SlideError(path, f"cannot read: {e.strerror or e}") from e
    except (struct.error, ValueError, TypeError, OverflowError, ZeroDivisionError, IndexError, MemoryError) as e:
        # a field our checks did not anticipate: still this file's problem, not a crash
        raise SlideError(path, f"malformed TIFF directory ({type(e).__name__}: {e})") from e
    if not pages:
        raise SlideError(path, "TIFF has no image directory")
    return pages


def _read_pages(path: Path, f) -> list[TiffPage]:
    size = f.seek(0, 2)
    f.seek(0)
    head = f.read(16)
    if len(head) < 4 or head[:2] not in (b"II", b"MM"):
        raise SlideError(path, "not a TIFF file (no II/MM byte-order mark)")
    bo = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(bo + "H", head[2:4])[0]
    if magic == 42:
        if len(head) < 8:
            raise SlideError(path, f"truncated TIFF header ({len(head)} of 8 bytes)")
        big, first = False, struct.unpack(bo + "I", head[4:8])[0]
    elif magic == 43:
        if len(head) < 16:
            raise SlideError(path, f"truncated BigTIFF header ({len(head)} of 16 bytes)")
        offset_size, reserved = struct.unpack(bo + "HH", head[4:8])
        if offset_size != 8 or reserved != 0:
            raise SlideError(path, f"not a valid BigTIFF file (offset size {offset_size}, must be 8)")
        big, first = True, struct.unpack(bo + "Q", head[8:16])[0]
    else:
        raise SlideError(path, f"not a TIFF file (magic number {magic})")

    def read_at(offset: int, n: int) -> bytes:
        if offset + n > size:
            raise SlideError(path, f"truncated TIFF: wants bytes {offset}..{offset + n} of a {size}-byte file")
        f.seek(offset)
        return f.read(n)

    def read_ifd(offset: int) -> tuple[dict[int, object], int]:
        cnt_fmt, cnt_size, ent_size, off_fmt, inline = ("Q", 8, 20, "Q", 8) if big else ("H", 2, 12, "I", 4)
        n = struct.unpack(bo + cnt_fmt, read_at(offset, cnt_size))[0]
        block = read_at(offset + cnt_size, n * ent_size + (8 if big else 4))
        tags: dict[int, object] = {}
        for i in range(n):
            e = block[i * ent_size:(i + 1) * ent_size]
            tag, typ = struct.unpack(bo + "HH", e[:4])
            if tag not in _WANTED or typ not in _TYPES:
                continue
            count = struct.unpack(bo + cnt_fmt.replace("H", "I"), e[4:4 + (8 if big else 4)])[0]
            nbytes = count * _TYPES[typ][1]
            payload = e[(12 if big else 8):]
            if nbytes > inline:
                payload = read_at(struct.unpack(bo + off_fmt, payload)[0], nbytes)
            if tag in (TILE_OFFSETS, TILE_BYTE_COUNTS, STRIP_OFFSETS, STRIP_BYTE_COUNTS) and typ in (3, 4, 13, 16, 18):
                dt = {3: "u2", 4: "u4", 13: "u4", 16: "u8", 18: "u8"}[typ]
                tags[tag] = np.frombuffer(payload, dtype=bo + dt, count=count).astype(np.uint64)
            else:
                tags[tag] = _read_value(payload, typ, count, bo)
        nxt = struct.unpack(bo + off_fmt, block[n * ent_size:n * ent_size + (8 if big else 4)])[0]
        return tags, nxt

    pages: list[TiffPage] = []
    seen: set[int] = set()
    offset = first
    while offset and len(seen) < _MAX_IFDS:
        if offset in seen:
            break  # a cycle in the chain: stop rather than loop forever
        seen.add(offset)
        index = len(pages)
        tags, offset = read_ifd(offset)
        pages.append(_page(path, index, tags))
        subs = tags.get(SUB_IFDS, [])
        if not (isinstance(subs, list) and all(_is_int(v) and v >= 0 for v in subs)):
            raise SlideError(path, f"TIFF directory {index}: SubIFDs is not a list of offsets ({_show(subs)})")
        for sub in subs:
            if sub and sub not in seen and len(seen) < _MAX_IFDS:
                seen.add(sub)
                pages.append(_page(path, len(pages), read_ifd(sub)[0]))
    return pages


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    r = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return r if len(r) <= 40 else r[:37] + "..."


def _int_field(path: Path, index: int, tags: dict, tag: int, name: str, default: int | None = None,
               lo: int | None = None, hi: int | None = None) -> int:
    """The first value of an integer tag, checked: a text, byte, fraction or float value, or one out of
    [lo, hi], raises SlideError. A missing tag (or one with no value) gives `default`."""
    v = tags.get(tag)
    if v is None or (isinstance(v, (list, np.ndarray)) and len(v) == 0):
        if default is None:
            raise SlideError(path, f"TIFF directory {index} has no {name}")
        return default
    x = v[0] if isinstance(v, list) else None
    if not _is_int(x):
        raise SlideError(path, f"TIFF directory {index}: {name} is not an integer ({_show(v)})")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise SlideError(path, f"TIFF directory {index}: {name} {x} is out of range ({lo}..{hi})")
    return x


def _uint_array(path: Path, index: int, tags: dict, tag: int, name: str) -> np.ndarray | None:
    v = tags.get(tag)
    if v is None or isinstance(v, np.ndarray):
        return v
    if isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v):
        return np.array(v, np.uint64)
    raise SlideError(path, f"TIFF directory {index}: {name} are not unsigned integers ({_show(v)})")


def _resolution(v) -> float | None:
    """XResolution as a positive finite number, or None: it is metadata, so junk counts as missing."""
    x = v[0] if isinstance(v, list) and v else None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) and x > 0 else None


def _page(path: Path, index: int, tags: dict) -> TiffPage:
    def field(tag: int, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        return _int_field(path, index, tags, tag, name, default, lo, hi)

    width = field(IMAGE_WIDTH, "ImageWidth", lo=1, hi=MAX_IMAGE_SIDE)
    height = field(IMAGE_LENGTH, "ImageLength", lo=1, hi=MAX_IMAGE_SIDE)
    tiled = TILE_OFFSETS in tags
    if tiled:
        if TILE_WIDTH not in tags or TILE_LENGTH not in tags:
            raise SlideError(path, f"TIFF directory {index} has no tile/strip layout (no TileWidth/TileLength)")
        tw = field(TILE_WIDTH, "TileWidth", lo=1, hi=MAX_TILE_SIDE)
        th = field(TILE_LENGTH, "TileLength", lo=1, hi=MAX_TILE_SIDE)
        offsets = _uint_array(path, index, tags, TILE_OFFSETS, "TileOffsets")
        counts = _uint_array(path, index, tags, TILE_BYTE_COUNTS, "TileByteCounts")
    else:
        # RowsPerStrip 0 or larger than the image (often 2**32 - 1) means one strip
        tw, th = width, min(field(ROWS_PER_STRIP, "RowsPerStrip", height, lo=0) or height, height)
        offsets = _uint_array(path, index, tags, STRIP_OFFSETS, "StripOffsets")
        counts = _uint_array(path, index, tags, STRIP_BYTE_COUNTS, "StripByteCounts")
    if offsets is None or counts is None:
        raise SlideError(path, f"TIFF directory {index} has no tile/strip layout")
    n_tiles = (-(-width // tw)) * (-(-height // th))
    spp = field(SAMPLES_PER_PIXEL, "SamplesPerPixel", 1, lo=1, hi=64)
    bps = field(BITS_PER_SAMPLE, "BitsPerSample", 1, lo=1, hi=64)
    planar = field(PLANAR_CONFIG, "PlanarConfiguration", 1)
    expected = n_tiles * (spp if planar == 2 else 1)
    if len(offsets) < n_tiles or len(counts) != len(offsets):
        raise SlideError(path, f"TIFF directory {index}: {len(offsets)} tile offsets / {len(counts)} byte counts "
                               f"for {expected} tiles")
    offsets, counts = offsets[:n_tiles], counts[:n_tiles]
    raw = tw * th * spp * -(-bps // 8)  # uncompressed bytes of one tile or strip
    bound = 2 * raw + _BYTECOUNT_SLACK
    if n_tiles and int(counts.max()) > bound:
        i = int(np.argmax(counts))
        what = "tile" if tiled else "strip"
        raise SlideError(path, f"TIFF directory {index}: {what} {i} claims {int(counts[i])} stored bytes for "
                               f"{raw} uncompressed bytes ({tw}x{th}x{spp}): corrupt byte counts")
    tables = tags.get(JPEG_TABLES)
    if isinstance(tables, list) and all(_is_int(v) and 0 <= v < 256 for v in tables):
        tables = bytes(tables)
    if tables is not None and not isinstance(tables, bytes):
        raise SlideError(path, f"TIFF directory {index}: JPEGTables is not a byte string ({_show(tables)})")
    desc = tags.get(IMAGE_DESCRIPTION)
    return TiffPage(
        index=index, width=width, height=height, tile_width=tw, tile_height=th, tiled=tiled,
        compression=field(COMPRESSION, "Compression", 1), photometric=field(PHOTOMETRIC, "Photometric", 2),
        samples_per_pixel=spp, bits_per_sample=bps, planar=planar,
        predictor=field(PREDICTOR, "Predictor", 1), subfile_type=field(NEW_SUBFILE_TYPE, "NewSubfileType", 0),
        description=desc if isinstance(desc, str) else "",
        jpeg_tables=tables, offsets=offsets, bytecounts=counts,
        x_resolution=_resolution(tags.get(X_RESOLUTION)),
        resolution_unit=field(RESOLUTION_UNIT, "ResolutionUnit", 2),
    )
