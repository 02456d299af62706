"""CPU tile decoder: imagecodecs (libjpeg-turbo, OpenJPEG, LZW, Deflate) on a thread pool.

Every decoder returns tiles as uint8 (tile_h, tile_w, 3) RGB arrays, whole tiles including the
padding of edge tiles; the canvas code crops to the image.

A tile never decodes to more than its own size: a JPEG or JPEG 2000 frame whose header does not
match the tile, or LZW/Deflate data that would inflate past the tile's raw bytes (a decompression
bomb), raises TileDecodeError before anything large is allocated.
"""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import imagecodecs
import numpy as np

from ..errors import ProAlignError


@dataclass(frozen=True)
class TileFormat:
    """What a decoder must know about a level's tiles."""

    codec: str  # "jpeg" | "jpeg2000" | "lzw" | "deflate" | "none"
    compression: int  # the TIFF code (33003 = Aperio JPEG 2000 in YCbCr)
    photometric: int
    tile_width: int
    tile_height: int
    samples_per_pixel: int = 3
    predictor: int = 1
    tiled: bool = True  # False: strips, whose last one may hold fewer rows than tile_height


def ycbcr_to_rgb(a: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr -> RGB (the JFIF formula), for Aperio 33003 JPEG 2000 tiles."""
    f = a.astype(np.float32)
    y, cb, cr = f[..., 0], f[..., 1] - 128.0, f[..., 2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _to_rgb(a: np.ndarray, fmt: TileFormat) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    return a


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) in the first frame header (SOF) of a JPEG stream, walking the marker segments
    from SOI; None when there is none before the scan (not a JPEG, or a corrupt one)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):  # end of image or start of scan: no frame header came first
            return None
        if m in _JPEG_SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


def jpeg2000_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the SIZ segment of a raw JPEG 2000 codestream (what TIFF tiles hold);
    None for other data (a JP2 file is decoded unchecked)."""
    if data[:4] != b"\xff\x4f\xff\x51" or len(data) < 24:
        return None
    x1, y1, x0, y0 = struct.unpack_from(">IIII", data, 8)
    return x1 - x0, y1 - y0


def _check_frame(size: tuple[int, int] | None, fmt: TileFormat, kind: str) -> None:
    """The frame must be the tile's size (a strip may be shorter: the last one of an image)."""
    tw, th = fmt.tile_width, fmt.tile_height
    if size is None:
        raise TileDecodeError(0, f"no {kind} frame header (corrupt tile)")
    w, h = size
    if w != tw or not (h == th or (not fmt.tiled and 1 <= h < th)):
        what = "tile" if fmt.tiled else "strip"
        raise TileDecodeError(0, f"{kind} frame is {w}x{h} px but the {what} is {tw}x{th} px (corrupt tile)")


def check_frame(data: bytes, fmt: TileFormat) -> None:
    """Raise TileDecodeError unless a JPEG / JPEG 2000 tile's frame header gives the tile's size
    (checked before any decoder, CPU or GPU, allocates the frame). Other codecs: nothing to check."""
    if fmt.codec == "jpeg":
        _check_frame(jpeg_frame_size(data), fmt, "JPEG")
    elif fmt.codec == "jpeg2000":
        size = jpeg2000_frame_size(data)
        if size is not None:
            _check_frame(size, fmt, "JPEG 2000")


def _inflate(data: bytes, limit: int) -> bytes:
    """Deflate data, refusing to produce more than `limit` bytes (a tile's raw size)."""
    d = zlib.decompressobj()
    raw = d.decompress(data, limit + 1)
    if len(raw) > limit:
        raise TileDecodeError(0, f"Deflate data inflate to more than the tile's {limit} bytes (corrupt tile)")
    if not d.eof:
        raise TileDecodeError(0, "Deflate stream is truncated (corrupt tile)")
    return raw


def _unlzw(data: bytes, limit: int) -> bytes:
    """LZW data into a buffer of limit + 1 bytes: imagecodecs stops at the buffer's end, so a full
    buffer means the data would expand past the tile (a decompression bomb)."""
    raw = imagecodecs.lzw_decode(data, out=bytearray(limit + 1))
    if len(raw) > limit:
        raise TileDecodeError(0, f"LZW data expand to more than the tile's {limit} bytes (corrupt tile)")
    return bytes(raw)


def decode_tile(data: bytes, fmt: TileFormat) -> np.ndarray:
    """Decode one tile's bytes (JPEG tables already spliced in) to uint8 RGB (h, w, 3).
    Empty bytes (a tile the writer left out) decode to white."""
    th, tw, spp = fmt.tile_height, fmt.tile_width, fmt.samples_per_pixel
    if not data:
        return np.full((th, tw, 3), 255, np.uint8)
    check_frame(data, fmt)
    if fmt.codec == "jpeg":
        a = imagecodecs.jpeg8_decode(data)
    elif fmt.codec == "jpeg2000":
        a = imagecodecs.jpeg2k_decode(data)
        if fmt.compression == 33003:
            a = ycbcr_to_rgb(a)
    else:
        limit = th * tw * spp
        if fmt.codec == "lzw":
            raw = _unlzw(data, limit)
        elif fmt.codec == "deflate":
            raw = _inflate(data, limit)
        else:
            raw = data[:limit]
        rows = len(raw) // (tw * spp)
        a = np.frombuffer(raw, np.uint8, count=rows * tw * spp).reshape(rows, tw, spp)
        if fmt.predictor == 2:  # horizontal differencing: running sum along x, modulo 256
            a = np.cumsum(a, axis=1, dtype=np.uint8)
    a = _to_rgb(np.asarray(a), fmt)
    if a.dtype != np.uint8:
        raise ValueError(f"decoded tile has dtype {a.dtype}, expected 8-bit samples")
    return a


class CpuDecoder:
    """Decodes batches of tiles on `threads` threads (imagecodecs releases the GIL)."""

    name = "imagecodecs"
    device = "cpu"

    def __init__(self, threads: int = 2):
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def submit(self, tiles: list[bytes], fmt: TileFormat) -> Callable[[], list[np.ndarray]]:
        """Start decoding a batch on the pool; the returned function waits and gives the tiles in
        order, raising TileDecodeError for the first bad one. Lets the caller cut patches from the
        previous batch while this one decodes."""
        def one(i: int, data: bytes) -> np.ndarray:
            try:
                return decode_tile(data, fmt)
            except TileDecodeError as e:
                raise TileDecodeError(i, e.problem) from e
            except Exception as e:  # imagecodecs raises its own error classes per codec
                raise TileDecodeError(i, f"{type(e).__name__}: {e}") from e
        if self._pool is None or len(tiles) < 2:
            return lambda: [one(i, t) for i, t in enumerate(tiles)]
        futures = [self._pool.submit(one, i, t) for i, t in enumerate(tiles)]
        return lambda: [f.result() for f in futures]

    def decode(self, tiles: list[bytes], fmt: TileFormat) -> list[np.ndarray]:
        """Decoded tiles in order; TileDecodeError names the first bad one."""
        return self.submit(tiles, fmt)()

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()


def native_jpeg_available() -> bool:
    try:
        from .. import _C
    except ImportError:
        return False
    return bool(getattr(_C, "HAS_LIBJPEG", False))


class NativeJpegDecoder:
    """JPEG tiles decoded by the engine (libjpeg in C++ threads, GIL released), optionally at
    1/scale size in the DCT domain. Same contract as CpuDecoder, for JPEG only."""

    device = "cpu"

    def __init__(self, scale: int = 1, threads: int | None = None):
        from .. import _C

        self._decode = _C.decode_jpeg
        self.scale, self.threads = scale, threads or os.cpu_count() or 1
        self.name = f"libjpeg-engine/{scale}"
        self._pool = ThreadPoolExecutor(1)  # one batch in flight; the C++ side fans out

    def submit(self, tiles: list[bytes], fmt: TileFormat) -> Callable[[], list[np.ndarray]]:
        if fmt.codec != "jpeg":
            raise TileDecodeError(0, f"the engine decoder reads JPEG tiles only, not {fmt.codec}")
        # the engine checks each frame header against the tile size before it decodes
        fut = self._pool.submit(self._decode, tiles, self.scale, self.threads, fmt.tile_width, fmt.tile_height,
                                not fmt.tiled)
        white = (fmt.tile_height // self.scale, fmt.tile_width // self.scale, 3)

        def result() -> list[np.ndarray]:
            arrays, errors = fut.result()
            for i, msg in errors:
                if tiles[i]:
                    raise TileDecodeError(i, msg)
                arrays[i] = np.full(white, 255, np.uint8)  # a tile the writer left out
            return arrays
        return result

    def decode(self, tiles: list[bytes], fmt: TileFormat) -> list[np.ndarray]:
        return self.submit(tiles, fmt)()

    def close(self) -> None:
        self._pool.shutdown()


class TileDecodeError(ProAlignError):
    """A tile of a batch failed to decode; `position` is its index in the batch. The slide readers
    turn it into a SlideError naming the file, the level and the tile."""

    def __init__(self, position: int, problem: str):
        self.position, self.problem = position, problem
        super().__init__(f"tile {position} of the batch: {problem}")
