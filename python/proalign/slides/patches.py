"""Patches from a slide and level-0 coordinates, each stored tile read and decoded exactly once.

Plan: patches are visited in raster order of their level origin; the tiles they cover are read in
order of first use, in batches streamed by the tile engine (bounded read-ahead); decoded tiles stay
in a cache until their last patch is cut, then are dropped. So host (or GPU) memory holds about one
band of tiles under the patches, whatever the slide's size, and no tile is decoded twice.
Patches are cut at the best pyramid level for the requested downsample and resized to `out_size`
with `resize_patches` (torch, bilinear with antialiasing), on the decoder's device.
On the CPU the plan runs in C++ (proalign._C.PatchStream, engine/patch_stream.cpp): worker threads
read, decode and place each tile (a tile only one patch covers straight into that patch) and hand
over finished batches; the Python path below (decoder="imagecodecs", or no compiled stream) does
the same with the tile engine's reads, a decoder thread pool and numpy pastes.
Slides without the TIFF fast path (DICOM, NDPI, ...) go through OpenSlide's read_region, per patch,
on a thread pool, then the same resize.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..decode.cpu import CpuDecoder, NativeJpegDecoder, TileDecodeError, native_jpeg_available
from ..errors import SlideError
from .slide import OpenSlideSlide, Slide, TiffSlide, paste_tile, tiles_for_rect
from .tiff_index import TiffPage
from .tile_engine import PyTileReader, stream_batches


@dataclass
class PatchStats:
    """What a pass did: checked by the tests (each tile once) and printed by the benchmark."""

    patches: int = 0
    tiles_needed: int = 0
    tiles_read: int = 0
    tiles_decoded: int = 0
    peak_cached_tiles: int = 0
    max_queued_batches: int = 0
    level: int = 0
    read_size: int = 0
    decoder: str = ""
    engine: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TilePlan:
    level: int
    read_size: int  # patch side at the level as decoded
    page: TiffPage  # the level's geometry as decoded (scaled with shrink-on-load)
    order: np.ndarray  # patch indices in visiting order
    origins: np.ndarray  # (n, 2) level-pixel origins, in visiting order
    tiles: np.ndarray  # linear tile indices in first-use order
    ready: np.ndarray  # (n,) tiles that must be decoded before the patch at this position can be cut
    evict_tiles: np.ndarray  # tiles ordered by the position of their last patch ...
    evict_bounds: np.ndarray  # (n + 1,) ... those of position p are evict_tiles[bounds[p]:bounds[p + 1]]

    def evict_after(self, p: int) -> np.ndarray:
        """Tiles no patch after position p needs (two arrays, not one per patch: O(tiles) memory)."""
        return self.evict_tiles[self.evict_bounds[p]:self.evict_bounds[p + 1]]


def choose_level(slide: Slide, patch_size_level0: int, out_size: int) -> tuple[int, int]:
    """(level, read size at that level) for patches of `patch_size_level0` level-0 pixels resized to
    `out_size`: the coarsest level that still has at least out_size pixels across the patch."""
    level = slide.best_level_for_downsample(patch_size_level0 / out_size)
    return level, max(1, int(round(patch_size_level0 / slide.downsamples[level])))


def shrink_factor(page: TiffPage, read_size: int, out_size: int) -> int:
    """2 when JPEG tiles can be decoded at half size in the DCT domain and still leave 10 % more
    pixels than out_size per patch side (the antialiased resize does the last step), else 1.
    Only 1/2: measured against the exact path, 1/2 stays at mean |diff| 0.5 while 1/4 reaches 2.8
    (the DCT-domain filter aliases), too far from what another JPEG decoder would give."""
    if page.codec != "jpeg" or not native_jpeg_available():
        return 1
    if read_size / 2 >= 1.1 * out_size and page.tile_width % 2 == 0 and page.tile_height % 2 == 0:
        return 2
    return 1


def plan_tiles(slide: TiffSlide, coords: np.ndarray, patch_size_level0: int, out_size: int,
               shrink: int = 1) -> TilePlan:
    """`shrink` > 1 plans on the level as decoded at 1/shrink size (JPEG DCT scaling)."""
    level, r = choose_level(slide, patch_size_level0, out_size)
    page = slide.pages[level]
    ds = slide.downsamples[level]
    if shrink > 1:
        page = dataclasses.replace(page, width=-(-page.width // shrink), height=-(-page.height // shrink),
                                   tile_width=page.tile_width // shrink, tile_height=page.tile_height // shrink)
        ds, r = ds * shrink, max(1, int(round(r / shrink)))
    origins = np.floor(np.asarray(coords, np.float64) / ds + 0.5).astype(np.int64)
    order = np.lexsort((origins[:, 0], origins[:, 1]))
    origins = origins[order]
    n = len(order)
    tw, th = page.tile_width, page.tile_height
    # Candidate tiles of every patch: a (n, rows, cols) grid from the patch's first tile, masked to
    # the ones the patch and the image actually cover.
    x0, y0 = np.clip(origins[:, 0], 0, page.width - 1), np.clip(origins[:, 1], 0, page.height - 1)
    x1 = np.clip(origins[:, 0] + r, 1, page.width) - 1
    y1 = np.clip(origins[:, 1] + r, 1, page.height) - 1
    c0, r0, c1, r1 = x0 // tw, y0 // th, x1 // tw, y1 // th
    inside = (origins[:, 0] < page.width) & (origins[:, 1] < page.height) & \
             (origins[:, 0] + r > 0) & (origins[:, 1] + r > 0)
    mc, mr = -(-r // tw) + 1, -(-r // th) + 1
    dc, dr = np.meshgrid(np.arange(mc), np.arange(mr))
    cols = c0[:, None, None] + dc[None]
    rows = r0[:, None, None] + dr[None]
    valid = (cols <= c1[:, None, None]) & (rows <= r1[:, None, None]) & inside[:, None, None]
    lin = (rows * page.tiles_across + cols).reshape(n, -1)
    valid = valid.reshape(n, -1)
    pos = np.repeat(np.arange(n), lin.shape[1]).reshape(n, -1)
    flat_t, flat_p = lin[valid], pos[valid]  # in visiting order
    tiles, first = np.unique(flat_t, return_index=True)
    rank_order = np.argsort(first, kind="stable")
    tiles_in_order = tiles[rank_order]
    rank = np.empty(len(tiles), np.int64)
    rank[rank_order] = np.arange(len(tiles))
    t_rank = rank[np.searchsorted(tiles, flat_t)]
    ready = np.zeros(n, np.int64)
    np.maximum.at(ready, flat_p, t_rank + 1)
    last = np.zeros(len(tiles), np.int64)
    np.maximum.at(last, np.searchsorted(tiles, flat_t), flat_p)
    ready = np.maximum.accumulate(ready) if n else ready  # patches are cut in visiting order
    by_last = np.argsort(last, kind="stable")
    bounds = np.searchsorted(last[by_last], np.arange(n + 1))
    return TilePlan(level, r, page, order, origins, tiles_in_order, ready, tiles[by_last], bounds)


def resize_patches(batch: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> uint8 (n, out_size, out_size, 3): bilinear, antialiased when shrinking.
    The one resize used by every path (engine, OpenSlide twin), so their pixels can be compared.
    On CPU it runs torch's uint8 channels-last kernel (about 18x the float path, 4x PIL); CUDA has no
    uint8 antialiased kernel, so the GPU goes through float32 and rounds: the two differ by at most 1."""
    if batch.shape[1] == out_size and batch.shape[2] == out_size:
        return batch
    x = batch.permute(0, 3, 1, 2)  # NHWC memory seen as channels-last NCHW: no copy
    if x.is_cuda:
        y = F.interpolate(x.float(), size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    else:
        y = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).contiguous()


_decode_threads: int | None = None  # None: one per core


def set_decode_threads(threads: int | None) -> None:
    """Threads of the CPU decoders this process makes from now on. A worker sets its share of the
    cores (pipeline.worker.set_threads), so N workers on one node do not each start one per core."""
    global _decode_threads
    _decode_threads = None if threads is None else max(1, int(threads))


def _gpu_decode_possible() -> bool:
    return torch.cuda.is_available() and _has_dali()


def _make_decoder(decoder: str | object, codec: str):
    if not isinstance(decoder, str):
        return decoder
    if decoder == "auto":
        decoder = "dali-gpu" if codec in ("jpeg", "jpeg2000") and _gpu_decode_possible() else "cpu"
    if decoder in ("cpu", "imagecodecs"):
        return CpuDecoder(threads=_decode_threads or os.cpu_count() or 1)
    if decoder in ("dali-gpu", "dali-cpu"):
        from ..decode.dali_decode import DaliDecoder
        return DaliDecoder(device=decoder.split("-")[1])
    raise ValueError(f"unknown decoder {decoder!r}: auto, cpu, imagecodecs, dali-cpu or dali-gpu")


def _has_dali() -> bool:
    from ..decode.dali_decode import dali_available
    return dali_available() is None


EDGE_FILLS = {"white": 255, "black": 0}


def edge_fill_value(edge_fill: str | int) -> int:
    """'white' -> 255, 'black' -> 0 (TRIDENT: OpenSlide's RGBA converted to RGB), or a grey 0-255."""
    if isinstance(edge_fill, str):
        if edge_fill not in EDGE_FILLS:
            raise ValueError(f"edge_fill must be one of {sorted(EDGE_FILLS)}, got {edge_fill!r}")
        return EDGE_FILLS[edge_fill]
    v = int(edge_fill)
    if not 0 <= v <= 255:
        raise ValueError(f"edge_fill must be a grey value 0-255, got {edge_fill!r}")
    return v


def iter_patches(slide: Slide, coords: np.ndarray, patch_size_level0: int, out_size: int, *,
                 batch_size: int = 64, decoder: str | object = "auto", tiles_per_batch: int = 64,
                 max_ahead: int = 2, shrink_on_load: bool = False, edge_fill: str | int = "white",
                 stats: PatchStats | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (indices into coords, uint8 patches (b, out_size, out_size, 3)) until every patch was
    produced once. Patches come in the engine's visiting order, not coords order.
    decoder: "cpu" (our CPU path: the C++ patch stream when proalign._C has it, which reads, decodes
    and places JPEG, JPEG 2000, LZW, Deflate and raw tiles on its own threads; else the Python path),
    "imagecodecs" (the Python path forced: C++ reads, imagecodecs decodes on a thread pool, numpy
    pastes; same pixels), "dali-cpu", "dali-gpu", or "auto" (dali-gpu for JPEG / JPEG 2000 when a
    GPU and DALI are there, else "cpu"). max_ahead: batches decoded ahead of the one handed out.
    edge_fill: the pixels of a patch beyond the image's edge (grids with edge="pad"): "white"
    (default) or "black" (what TRIDENT reads: OpenSlide's transparent outside, RGBA -> RGB).
    Tiles the slide's writer left out are white either way.
    shrink_on_load: when patches are downsampled about 2x or more, decode JPEG tiles at half size
    in the DCT domain (libjpeg scaling, engine decoder): several times less decoding, pixels
    mean |diff| < 0.6 and max <= 16 vs the exact path, about what another JPEG
    decoder gives (nvJPEG vs libjpeg-turbo)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    fill = edge_fill_value(edge_fill)
    stats = stats if stats is not None else PatchStats()
    stats.patches = len(coords)
    if not len(coords):
        return
    if isinstance(slide, TiffSlide):
        yield from _iter_engine(slide, coords, patch_size_level0, out_size, batch_size, decoder,
                                tiles_per_batch, max_ahead, shrink_on_load, stats, fill)
    else:
        yield from _iter_read_region(slide, coords, patch_size_level0, out_size, batch_size, stats, fill)


def native_patches_available() -> bool:
    """True when proalign._C has the C++ patch stream (built with libjpeg; Deflate also needs zlib)."""
    try:
        from .. import _C
    except ImportError:
        return False
    return hasattr(_C, "PatchStream")


_openjpeg: str | None | bool = False  # False: not looked for yet; None: none loads


def openjpeg_for_engine() -> str | None:
    """The OpenJPEG version the patch stream decodes JPEG 2000 tiles with, loaded on first use: the
    libopenjp2 that imagecodecs ships (so the engine and decode_tile run the same library), else the
    system's; None when no 2.1+ library loads (JPEG 2000 then stays on the Python path)."""
    global _openjpeg
    if _openjpeg is not False:
        return _openjpeg
    _openjpeg = None
    if not native_patches_available():
        return None
    import ctypes.util
    import glob

    from .. import _C
    candidates = []
    try:
        import imagecodecs
        libs = os.path.join(os.path.dirname(os.path.dirname(imagecodecs.__file__)), "imagecodecs.libs")
        candidates += sorted(glob.glob(os.path.join(libs, "libopenjp2*.so*")))
    except ImportError:
        pass
    found = ctypes.util.find_library("openjp2")
    candidates += [found] if found else []
    for path in candidates:
        try:
            _openjpeg = _C.load_openjpeg(path)
            break
        except RuntimeError:
            continue
    return _openjpeg


_NATIVE_CODECS = {"jpeg", "lzw", "none"}


def native_codec_available(codec: str) -> bool:
    """The C++ patch stream reads this codec's tiles here."""
    if not native_patches_available():
        return False
    if codec == "deflate":
        from .. import _C
        return bool(getattr(_C, "HAS_ZLIB", False))
    return codec in _NATIVE_CODECS or codec == "jpeg2000" and openjpeg_for_engine() is not None


def _cpu_decoder_choice(decoder) -> bool:
    """The pass decodes on the CPU with our own code: "cpu", "auto" without a GPU decoder, or
    "imagecodecs" (the Python path forced)."""
    return isinstance(decoder, str) and (decoder in ("cpu", "imagecodecs")
                                         or decoder == "auto" and not _gpu_decode_possible())


def _iter_engine(slide: TiffSlide, coords, patch_size_level0, out_size, batch_size, decoder, tiles_per_batch,
                 max_ahead, shrink_on_load, stats: PatchStats, fill: int = 255):
    level, r0 = choose_level(slide, patch_size_level0, out_size)
    shrink = 1
    if shrink_on_load and _cpu_decoder_choice(decoder):
        shrink = shrink_factor(slide.pages[level], r0, out_size)
    if (decoder != "imagecodecs" and (shrink > 1 or _cpu_decoder_choice(decoder))
            and native_codec_available(slide.formats[level].codec)
            and not isinstance(slide.readers[level], PyTileReader)):
        yield from _iter_native(slide, coords, patch_size_level0, out_size, batch_size, max_ahead, shrink, stats, fill)
        return
    plan = plan_tiles(slide, coords, patch_size_level0, out_size, shrink)
    level, r = plan.level, plan.read_size
    stored, fmt = slide.pages[level], slide.formats[level]
    page = plan.page
    dec = NativeJpegDecoder(scale=shrink) if shrink > 1 else _make_decoder(decoder, fmt.codec)
    stats.extra["shrink"] = shrink
    on_gpu = getattr(dec, "device", "cpu") == "gpu"
    dev = torch.device(f"cuda:{dec.device_id}") if on_gpu else torch.device("cpu")
    stats.level, stats.read_size, stats.tiles_needed = level, r, len(plan.tiles)
    stats.decoder, stats.engine = getattr(dec, "name", type(dec).__name__), type(slide.readers[level]).__module__
    reader = slide.readers[level]
    chunks = [plan.tiles[s:s + tiles_per_batch] for s in range(0, len(plan.tiles), tiles_per_batch)]
    stream = stream_batches(reader, [(stored.offsets[c], stored.bytecounts[c]) for c in chunks], max_ahead)
    cache: dict[int, object] = {}
    decoded = 0
    p, n = 0, len(plan.order)
    buf = None
    filled = 0

    # The canvas is numpy on CPU: torch's small strided copies run through its thread pool and were
    # measured 500x slower than numpy's (4 ms vs 7 us per tile paste on 2 busy cores).
    # Tiles are pasted cropped to the image, so what stays of the fill is outside the image.
    def new_buffer():
        if on_gpu:
            return torch.full((batch_size, r, r, 3), fill, dtype=torch.uint8, device=dev)
        return np.full((batch_size, r, r, 3), fill, np.uint8)

    def flush(count):
        idx = plan.order[p - count:p]
        batch = buf[:count] if on_gpu else torch.from_numpy(buf[:count])
        return idx, resize_patches(batch, out_size)

    def tile_error(t: int, problem: str) -> SlideError:
        return SlideError(slide.path, f"level {level} tile (col {t % page.tiles_across}, row "
                                      f"{t // page.tiles_across}){problem}")

    def decoded_chunks():
        """(chunk, decoded tiles), with the next chunk decoding while the caller cuts this one."""
        pending = None
        for chunk, (data, errors) in zip(chunks, stream):
            stats.tiles_read += len(data)
            if errors:
                i, msg = errors[0]
                raise tile_error(int(chunk[i]), f": {msg}")
            job = (dec.submit(data, fmt) if hasattr(dec, "submit")
                   else (lambda data=data: dec.decode(data, fmt)))
            if pending is not None:
                yield pending[0], collect(*pending)
            pending = (chunk, job)
        if pending is not None:
            yield pending[0], collect(*pending)

    def collect(chunk, job):
        try:
            return job()
        except TileDecodeError as e:
            raise tile_error(int(chunk[e.position]), f" does not decode: {e.problem}") from e

    try:
        for chunk, imgs in decoded_chunks():
            stats.tiles_decoded += len(imgs)
            for t, img in zip(chunk.tolist(), imgs):
                cache[t] = img
            decoded += len(imgs)
            stats.peak_cached_tiles = max(stats.peak_cached_tiles, len(cache))
            while p < n and plan.ready[p] <= decoded:
                if buf is None:
                    buf = new_buffer()
                lx, ly = plan.origins[p]
                out = buf[filled]
                for c, rr in tiles_for_rect(page, int(lx), int(ly), r, r):
                    paste_tile(out, cache[rr * page.tiles_across + c], int(lx), int(ly), c, rr, page)
                for t in plan.evict_after(p).tolist():
                    cache.pop(t, None)
                p += 1
                filled += 1
                if filled == batch_size:
                    yield flush(filled)
                    buf, filled = None, 0
        # patches that cover no stored tile (entirely outside the image) are all fill
        while p < n:
            if buf is None:
                buf = new_buffer()
            p += 1
            filled += 1
            if filled == batch_size:
                yield flush(filled)
                buf, filled = None, 0
        if filled:
            yield flush(filled)
    finally:
        stats.max_queued_batches = getattr(stream, "max_queued", 0)
        if isinstance(decoder, str):
            dec.close()


def _iter_native(slide: TiffSlide, coords, patch_size_level0, out_size, batch_size, max_ahead, shrink, stats: PatchStats,
                 fill: int):
    """A level through proalign._C.PatchStream: C++ threads read each tile once, decode it (libjpeg,
    at 1/shrink size when asked; OpenJPEG; LZW; zlib) into the patches that need it, and hand over
    finished batches; Python only resizes them. Same plan, pixels and errors as the Python path."""
    from .. import _C

    plan = plan_tiles(slide, coords, patch_size_level0, out_size, shrink)
    level, r, page = plan.level, plan.read_size, plan.page
    stored, fmt = slide.pages[level], slide.formats[level]
    threads = _decode_threads or os.cpu_count() or 1
    # at most max_ahead batches decode ahead of this one; big patches (a few hundred MB a batch) keep one
    ahead = max_ahead if batch_size * r * r * 3 <= (96 << 20) else 1
    stream = _C.PatchStream(slide.readers[level], page.width, page.height, page.tile_width, page.tile_height,
                            page.tiles_across, r, shrink, fmt.tile_width, fmt.tile_height, not fmt.tiled, fill,
                            stored.offsets, stored.bytecounts, plan.origins, batch_size, threads, ahead,
                            fmt.codec, fmt.samples_per_pixel, fmt.predictor == 2, fmt.compression == 33003)
    stats.level, stats.read_size, stats.tiles_needed = level, r, len(plan.tiles)
    stats.decoder = {"jpeg": f"libjpeg-engine/{shrink}", "jpeg2000": f"openjpeg-engine {openjpeg_for_engine()}",
                     "lzw": "lzw-engine", "deflate": "zlib-engine", "none": "raw-engine"}[fmt.codec]
    stats.engine = "proalign._C.PatchStream"
    stats.extra["shrink"] = shrink
    p = 0
    try:
        for batch, error in stream:
            if error is not None:
                t, decoding, msg = error
                where = f"level {level} tile (col {t % page.tiles_across}, row {t // page.tiles_across})"
                raise SlideError(slide.path, f"{where} does not decode: {msg}" if decoding else f"{where}: {msg}")
            idx = plan.order[p:p + len(batch)]
            p += len(batch)
            yield idx, resize_patches(torch.from_numpy(batch), out_size)
    finally:
        stats.tiles_read = stats.tiles_decoded = stream.tiles_decoded
        stats.peak_cached_tiles = stream.peak_cached_tiles
        stats.max_queued_batches = stream.max_batches_ahead
        stats.extra["direct_tiles"] = stream.direct_tiles
        stats.extra.update(worker_wait_s=stream.worker_wait_s, consumer_wait_s=stream.consumer_wait_s,
                           assemble_s=stream.assemble_s)
        del stream


def _iter_read_region(slide: Slide, coords, patch_size_level0, out_size, batch_size, stats: PatchStats,
                      fill: int = 255):
    level, r = choose_level(slide, patch_size_level0, out_size)
    stats.level, stats.read_size, stats.decoder, stats.engine = level, r, "openslide", "openslide"
    kw = {} if fill == 255 else {"fill": fill}
    with ThreadPoolExecutor(4) as pool:
        for s in range(0, len(coords), batch_size):
            idx = np.arange(s, min(s + batch_size, len(coords)))
            regions = list(pool.map(lambda i: slide.read_region(tuple(coords[i]), level, (r, r), **kw), idx))
            yield idx, resize_patches(torch.from_numpy(np.stack(regions)), out_size)


def read_patches(slide: Slide, coords: np.ndarray, patch_size_level0: int, out_size: int, *,
                 decoder: str | object = "cpu", shrink_on_load: bool = False, edge_fill: str | int = "white",
                 stats: PatchStats | None = None) -> np.ndarray:
    """uint8 (n, out_size, out_size, 3) RGB patches, in the order of `coords` (level-0 top-left
    corners), through the engine path (edge_fill: as iter_patches). Holds all n patches in memory:
    the pipeline streams with iter_patches instead."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    out = np.empty((len(coords), out_size, out_size, 3), np.uint8)
    for idx, batch in iter_patches(slide, coords, patch_size_level0, out_size, decoder=decoder,
                                   shrink_on_load=shrink_on_load, edge_fill=edge_fill, stats=stats):
        out[idx] = batch.cpu().numpy()
    return out


def read_patches_openslide(slide: OpenSlideSlide, coords: np.ndarray, patch_size_level0: int,
                           out_size: int, *, edge_fill: str | int = "white") -> np.ndarray:
    """The reference path: OpenSlide read_region at the same level, the same resize."""
    out = np.empty((len(coords), out_size, out_size, 3), np.uint8)
    for idx, batch in _iter_read_region(slide, np.asarray(coords, np.int64).reshape(-1, 2), patch_size_level0,
                                        out_size, 64, PatchStats(), edge_fill_value(edge_fill)):
        out[idx] = batch.numpy()
    return out
