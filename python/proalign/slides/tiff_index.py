"""The TIFF fast path's directory parser: classic TIFF and BigTIFF, little or big endian.

Reads only what the tile engine needs (tile/strip offsets and byte counts, JPEGTables, codec,
photometric, sizes, ImageDescription, resolution) straight from the IFDs, so a slide opens with a
few small reads and no pixel is touched. Strips are treated as full-width tiles, so plain stripped
TIFFs go through the same engine.
"""
from __future__ import annotations

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
    with f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            raise SlideError(path, "not a TIFF file (no II/MM byte-order mark)")
        bo = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(bo + "H", head[2:4])[0]
        if magic == 42:
            big, first = False, struct.unpack(bo + "I", head[4:8])[0]
        elif magic == 43 and len(head) >= 16:
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
            tags, offset = read_ifd(offset)
            pages.append(_page(path, len(pages), tags))
            for sub in tags.get(SUB_IFDS, []) or []:
                if sub and sub not in seen:
                    seen.add(sub)
                    pages.append(_page(path, len(pages), read_ifd(sub)[0]))
    if not pages:
        raise SlideError(path, "TIFF has no image directory")
    return pages


def _one(tags: dict, tag: int, default=None):
    v = tags.get(tag, default)
    if isinstance(v, (list, np.ndarray)):
        return v[0] if len(v) else default
    return v


def _page(path: Path, index: int, tags: dict) -> TiffPage:
    try:
        width, height = int(_one(tags, IMAGE_WIDTH)), int(_one(tags, IMAGE_LENGTH))
    except TypeError:
        raise SlideError(path, f"TIFF directory {index} has no ImageWidth/ImageLength") from None
    tiled = TILE_OFFSETS in tags
    if tiled:
        tw, th = int(_one(tags, TILE_WIDTH, 0)), int(_one(tags, TILE_LENGTH, 0))
        offsets, counts = tags.get(TILE_OFFSETS), tags.get(TILE_BYTE_COUNTS)
    else:
        tw, th = width, int(min(_one(tags, ROWS_PER_STRIP, height) or height, height))
        offsets, counts = tags.get(STRIP_OFFSETS), tags.get(STRIP_BYTE_COUNTS)
    if offsets is None or counts is None or tw <= 0 or th <= 0:
        raise SlideError(path, f"TIFF directory {index} has no tile/strip layout")
    offsets, counts = np.asarray(offsets, np.uint64), np.asarray(counts, np.uint64)
    n_tiles = (-(-width // tw)) * (-(-height // th))
    spp = int(_one(tags, SAMPLES_PER_PIXEL, 1))
    planar = int(_one(tags, PLANAR_CONFIG, 1))
    expected = n_tiles * (spp if planar == 2 else 1)
    if len(offsets) < n_tiles or len(counts) != len(offsets):
        raise SlideError(path, f"TIFF directory {index}: {len(offsets)} tile offsets / {len(counts)} byte counts "
                               f"for {expected} tiles")
    tables = tags.get(JPEG_TABLES)
    return TiffPage(
        index=index, width=width, height=height, tile_width=tw, tile_height=th, tiled=tiled,
        compression=int(_one(tags, COMPRESSION, 1)), photometric=int(_one(tags, PHOTOMETRIC, 2)),
        samples_per_pixel=spp, bits_per_sample=int(_one(tags, BITS_PER_SAMPLE, 1)), planar=planar,
        predictor=int(_one(tags, PREDICTOR, 1)), subfile_type=int(_one(tags, NEW_SUBFILE_TYPE, 0)),
        description=str(tags.get(IMAGE_DESCRIPTION, "") or ""),
        jpeg_tables=bytes(tables) if tables is not None else None,
        offsets=offsets[:n_tiles], bytecounts=counts[:n_tiles],
        x_resolution=float(_one(tags, X_RESOLUTION)) if X_RESOLUTION in tags else None,
        resolution_unit=int(_one(tags, RESOLUTION_UNIT, 2)),
    )
