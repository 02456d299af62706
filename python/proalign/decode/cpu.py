"""CPU tile decoder: imagecodecs (libjpeg-turbo, OpenJPEG, LZW, Deflate) on a thread pool.

Every decoder returns tiles as uint8 (tile_h, tile_w, 3) RGB arrays, whole tiles including the
padding of edge tiles; the canvas code crops to the image.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import imagecodecs
import numpy as np


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


def decode_tile(data: bytes, fmt: TileFormat) -> np.ndarray:
    """Decode one tile's bytes (JPEG tables already spliced in) to uint8 RGB (h, w, 3).
    Empty bytes (a tile the writer left out) decode to white."""
    th, tw, spp = fmt.tile_height, fmt.tile_width, fmt.samples_per_pixel
    if not data:
        return np.full((th, tw, 3), 255, np.uint8)
    if fmt.codec == "jpeg":
        a = imagecodecs.jpeg8_decode(data)
    elif fmt.codec == "jpeg2000":
        a = imagecodecs.jpeg2k_decode(data)
        if fmt.compression == 33003:
            a = ycbcr_to_rgb(a)
    else:
        raw = {"none": lambda b: b, "lzw": imagecodecs.lzw_decode, "deflate": zlib.decompress}[fmt.codec](data)
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
        fut = self._pool.submit(self._decode, tiles, self.scale, self.threads)
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


class TileDecodeError(Exception):
    """A tile of a batch failed to decode; `position` is its index in the batch."""

    def __init__(self, position: int, problem: str):
        self.position, self.problem = position, problem
        super().__init__(f"tile {position} of the batch: {problem}")
