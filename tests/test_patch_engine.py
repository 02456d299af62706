"""The C++ patch stream (proalign._C.PatchStream): every codec it decodes gives decode/cpu.py's
pixels, and patches through it equal the Python engine path (decoder="imagecodecs") and OpenSlide,
with each tile read and decoded once, the same errors, and nothing left running when a reader stops
early. Skips when proalign._C was built without libjpeg (Deflate cases: without zlib)."""
from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np
import pytest

from proalign.decode.cpu import TileFormat, decode_tile, ycbcr_to_rgb
from proalign.errors import SlideError
from proalign.slides import patches as P
from proalign.slides.patches import PatchStats, iter_patches, read_patches, read_patches_openslide
from proalign.slides.slide import OpenSlideSlide, open_slide
from proalign.testing.synthetic_slides import write_aperio_svs, write_pyramidal_tiff

pytestmark = pytest.mark.skipif(not P.native_patches_available(),
                                reason="proalign._C built without libjpeg: no C++ patch stream")
needs_zlib = pytest.mark.skipif(not P.native_codec_available("deflate"),
                                reason="proalign._C built without zlib: Deflate tiles on the Python path")


def _c():
    from proalign import _C
    return _C


def _engine_decode(tiles, fmt: TileFormat):
    return _c().decode_tiles(tiles, fmt.codec, fmt.tile_width, fmt.tile_height, fmt.samples_per_pixel,
                             fmt.predictor == 2, fmt.compression == 33003, not fmt.tiled)


# --- codecs, tile by tile ------------------------------------------------------------------------------

SLIDES = {
    "svs-jpeg-rgb": (write_aperio_svs, dict(width=1100, height=830, levels=(1, 4))),
    "svs-jpeg-ycbcr": (write_aperio_svs, dict(width=1100, height=830, tile=240, levels=(1, 2.5), photometric="ycbcr")),
    "svs-jpeg2000": (write_aperio_svs, dict(width=900, height=650, levels=(1, 4), compression="jpeg2000")),
    "tiff-jpeg": (write_pyramidal_tiff, dict(width=1027, height=771, levels=(1, 2, 6))),
    "tiff-lzw": (write_pyramidal_tiff, dict(width=777, height=555, tile=128, levels=(1, 3), compression="lzw")),
    "tiff-deflate": (write_pyramidal_tiff, dict(width=777, height=555, tile=128, levels=(1, 3),
                                                compression="deflate")),
    "tiff-raw": (write_pyramidal_tiff, dict(width=640, height=480, tile=128, levels=(1, 2), compression="none",
                                            predictor=False)),
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    out = {}
    for name, (writer, kw) in SLIDES.items():
        path = d / (name + (".svs" if writer is write_aperio_svs else ".tif"))
        writer(path, seed=4, mpp=0.5, tissue="dense", **kw)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(SLIDES))
def test_engine_codecs_equal_decode_tile(generated, name):
    s = open_slide(generated[name])
    if not P.native_codec_available(s.formats[0].codec):
        pytest.skip(f"no engine decoder for {s.formats[0].codec} here")
    for level in range(len(s.levels)):
        p, fmt = s.pages[level], s.formats[level]
        data, errors = s.readers[level].read(p.offsets, p.bytecounts)
        assert not errors
        for (got, err), raw in zip(_engine_decode(data, fmt), data):
            assert err is None, err
            np.testing.assert_array_equal(got, decode_tile(raw, fmt))


def _lzw_pack(codes, lsb: bool, width: int = 9) -> bytes:
    bits = n = 0
    out = bytearray()
    for c in codes:
        if lsb:
            bits |= c << n
        else:
            bits = (bits << width) | c
        n += width
        while n >= 8:
            out.append(bits & 255 if lsb else (bits >> (n - 8)) & 255)
            bits = bits >> 8 if lsb else bits & ((1 << (n - 8)) - 1)
            n -= 8
    if n:
        out.append(bits & 255 if lsb else (bits << (8 - n)) & 255)
    return bytes(out)


def test_lzw_equals_imagecodecs():
    """Random bytes (short strings, table resets), long runs (strings past 16 bytes), a stream without
    its end code, libtiff's old LSB-first flavour, and a bomb: the same bytes or the same refusal."""
    rng = np.random.default_rng(7)
    fmt = TileFormat("lzw", 5, 2, 64, 64)
    limit = 64 * 64 * 3
    samples = [rng.integers(0, 256, limit, dtype=np.uint8).tobytes(),  # incompressible: many clears
               np.repeat(rng.integers(0, 4, limit // 50, dtype=np.uint8), 50)[:limit].tobytes(),
               np.zeros(limit, np.uint8).tobytes(),  # one long run: strings up to hundreds of bytes
               (np.arange(limit) // 7 % 256).astype(np.uint8).tobytes()]
    streams = [imagecodecs.lzw_encode(s) for s in samples]
    streams.append(streams[1][:-2])  # cut short: no end code
    streams.append(_lzw_pack([256, 65, 66, 258, 260, 257], lsb=True))  # old style, with a KwKwK code
    streams.append(_lzw_pack([256, 65, 66, 258, 260, 257], lsb=False))
    for data in streams:
        want = bytes(imagecodecs.lzw_decode(data, out=bytearray(limit + 1)))
        (got, err), = _c().decode_tiles([data], "lzw", 64, 64, 3)
        assert err is None, err
        rows = len(want) // (64 * 3)
        assert got.shape == (rows, 64, 3)
        assert got.tobytes() == want[:rows * 64 * 3]
        np.testing.assert_array_equal(got, decode_tile(data, fmt)[:, :, :3] if rows else got)
    bomb = imagecodecs.lzw_encode(b"\0" * (limit + 1))
    (got, err), = _c().decode_tiles([bomb], "lzw", 64, 64, 3)
    assert got is None and err == f"LZW data expand to more than the tile's {limit} bytes (corrupt tile)"
    (got, err), = _c().decode_tiles([_lzw_pack([256, 65, 300, 257], lsb=False)], "lzw", 64, 64, 3)
    assert got is None and "corrupt LZW data" in err


@needs_zlib
def test_deflate_refusals_match_python():
    limit = 16 * 16 * 3
    bomb, short = zlib.compress(b"\0" * (limit + 1)), zlib.compress(b"\1" * limit)[:-6]
    for data, why in ((bomb, f"Deflate data inflate to more than the tile's {limit} bytes (corrupt tile)"),
                      (short, "Deflate stream is truncated (corrupt tile)")):
        (got, err), = _c().decode_tiles([data], "deflate", 16, 16, 3)
        assert got is None and err == why
    (got, err), = _c().decode_tiles([b"\x78\x9c" + b"\xff" * 20], "deflate", 16, 16, 3)
    assert got is None and err.startswith("error: Error -3 while decompressing data")


def test_aperio_ycbcr_jpeg2000_rounds_like_numpy():
    """33003 tiles: YCbCr -> RGB in float32 as decode/cpu.py's numpy code, on lossless tiles holding
    a spread of YCbCr values, the extremes included (checked once on all 2^24 values: no difference)."""
    if P.openjpeg_for_engine() is None:
        pytest.skip("no OpenJPEG 2.1+ library for the engine")
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    tile[0, :8] = [[0, 0, 0], [255, 255, 255], [0, 255, 0], [255, 0, 255], [128, 128, 128], [0, 0, 255],
                   [255, 255, 0], [16, 240, 16]]
    j = bytes(imagecodecs.jpeg2k_encode(tile, level=0, codecformat="J2K", reversible=True, mct=False))
    (got, err), = _c().decode_tiles([j], "jpeg2000", 128, 128, 3, False, True)
    assert err is None
    np.testing.assert_array_equal(got, ycbcr_to_rgb(imagecodecs.jpeg2k_decode(j)))
    (got, err), = _c().decode_tiles([j], "jpeg2000", 64, 64, 3, False, True)
    assert got is None and err == "JPEG 2000 frame is 128x128 px but the tile is 64x64 px (corrupt tile)"


# --- patches through the stream --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SLIDES))
def test_patch_stream_equals_python_path(generated, name, rng):
    """Random corners (edges and outside included), patches at level 0 and resized from other levels,
    white and black edge fill: the same pixels as the Python path, each tile read and decoded once."""
    s = open_slide(generated[name])
    codec = s.formats[0].codec
    if not P.native_codec_available(codec):
        pytest.skip(f"no engine decoder for {codec} here")
    w, h = s.dimensions
    for patch, out, fill in ((256, 256, "white"), (300, 224, "black"), (512, 128, "white"), (64, 64, "white")):
        coords = np.stack([rng.integers(-patch // 2, w, 120), rng.integers(-patch // 2, h, 120)], 1)
        st, ref_st = PatchStats(), PatchStats()
        ours = read_patches(s, coords, patch, out, edge_fill=fill, stats=st)
        ref = read_patches(s, coords, patch, out, decoder="imagecodecs", edge_fill=fill, stats=ref_st)
        np.testing.assert_array_equal(ours, ref)
        assert st.engine == "proalign._C.PatchStream" and ref_st.engine != st.engine
        assert st.tiles_decoded == st.tiles_needed == ref_st.tiles_needed


def test_aligned_grid_decodes_into_place_and_equals_openslide(generated):
    """A grid on the tile grid: every tile belongs to one patch and is decoded straight into it; the
    patches are OpenSlide's."""
    path = generated["svs-jpeg-rgb"]
    s, ref = open_slide(path), OpenSlideSlide(path)
    xs, ys = np.meshgrid(np.arange(0, 1100 - 255, 256), np.arange(0, 830 - 255, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    st = PatchStats()
    ours = read_patches(s, coords, 256, 256, stats=st)
    assert st.extra["direct_tiles"] == st.tiles_needed == len(coords) and st.peak_cached_tiles == 0
    np.testing.assert_array_equal(ours, read_patches_openslide(ref, coords, 256, 256))


def test_threads_batches_and_shrink_give_the_same_patches(generated, rng):
    path = generated["tiff-jpeg"]
    s = open_slide(path)
    coords = np.stack([rng.integers(-100, 1027, 200), rng.integers(-100, 771, 200)], 1)
    want = read_patches(s, coords, 256, 224)
    try:
        for threads in (1, 3):
            P.set_decode_threads(threads)
            np.testing.assert_array_equal(read_patches(s, coords, 256, 224), want)
    finally:
        P.set_decode_threads(None)
    got = {}
    for idx, batch in iter_patches(s, coords, 256, 224, batch_size=7, max_ahead=1, decoder="cpu"):
        for i, p in zip(idx.tolist(), batch.numpy()):
            got[i] = p
    np.testing.assert_array_equal(np.stack([got[i] for i in range(len(coords))]), want)
    # shrink on load (half-size DCT decoding) gives the engine's NativeJpegDecoder pixels
    s = open_slide(generated["svs-jpeg-rgb"])  # levels 1 and 4: 512 px read at level 0, shrunk 2x
    st = PatchStats()
    fast = read_patches(s, coords, 512, 224, shrink_on_load=True, stats=st)
    assert st.extra["shrink"] == 2 and st.engine == "proalign._C.PatchStream"
    np.testing.assert_array_equal(fast, read_patches(s, coords, 512, 224, shrink_on_load=True, decoder="imagecodecs"))


def test_stopping_early_leaves_nothing_running(generated):
    import threading

    s = open_slide(generated["svs-jpeg-rgb"])
    coords = np.stack(np.meshgrid(np.arange(0, 800, 64), np.arange(0, 600, 64)), -1).reshape(-1, 2)
    before = threading.active_count()
    for _ in range(3):
        it = iter_patches(s, coords, 128, 128, batch_size=4, decoder="cpu")
        next(it)
        it.close()  # the stream's threads are joined, its buffers freed
    assert threading.active_count() == before


def _tiff_with_tiles(path, tiles, w, h, t, compression, **extra):
    from test_crafted_slides import rgb_tags, write_tiff

    offsets = np.cumsum([8] + [len(b) for b in tiles])[:-1].tolist()
    tags = rgb_tags(w, h, t, t, offsets, [len(b) for b in tiles], compression, **extra)
    return write_tiff(path, [tags], b"".join(tiles))


def test_errors_name_the_tile(tmp_path):
    good = imagecodecs.jpeg8_encode(np.full((64, 64, 3), 180, np.uint8))
    bad = good[:40] + b"\0" * 60
    path = _tiff_with_tiles(tmp_path / "j.tif", [good, good, good, bad], 128, 128, 64, 7)
    s = open_slide(path)
    with pytest.raises(SlideError, match=r"j.tif: level 0 tile \(col 1, row 1\) does not decode: "):
        read_patches(s, np.array([[0, 0], [64, 64]]), 64, 64)
    # the patches before the bad tile come out first
    it = iter_patches(s, np.array([[0, 0], [64, 0], [0, 64], [64, 64]]), 64, 64, batch_size=1, decoder="cpu")
    assert [int(i[0]) for i, _ in (next(it), next(it), next(it))] == [0, 1, 2]
    with pytest.raises(SlideError, match=r"tile \(col 1, row 1\)"):
        next(it)
    small = imagecodecs.jpeg8_encode(np.full((32, 32, 3), 180, np.uint8))
    s2 = open_slide(_tiff_with_tiles(tmp_path / "k.tif", [small], 64, 64, 64, 7))
    with pytest.raises(SlideError, match=r"k.tif: level 0 tile \(col 0, row 0\) does not decode: JPEG frame is "
                                         r"32x32 px but the tile is 64x64"):
        read_patches(s2, np.array([[0, 0]]), 64, 64)


def test_missing_tiles_are_white_and_short_tiles_keep_the_fill(tmp_path):
    """A tile the writer left out (0 bytes) is white whatever the edge fill; LZW data that stop
    early give their whole rows, the rest of the tile is the fill, as in the Python path."""
    t = 32
    full = np.full((t, t, 3), 90, np.uint8)
    half = imagecodecs.lzw_encode(full[:t // 2].tobytes())
    tiles = [imagecodecs.lzw_encode(full.tobytes()), b"", half, imagecodecs.lzw_encode(full.tobytes())]
    path = _tiff_with_tiles(tmp_path / "m.tif", tiles, 2 * t, 2 * t, t, 5)
    s = open_slide(path)
    coords = np.array([[0, 0], [16, 16], [40, 40], [-8, -8]])
    for fill in ("white", "black"):
        ours = read_patches(s, coords, 32, 32, edge_fill=fill)
        np.testing.assert_array_equal(ours, read_patches(s, coords, 32, 32, edge_fill=fill, decoder="imagecodecs"))
    ours = read_patches(s, np.array([[t, 0]]), 32, 32, edge_fill="black")
    assert (ours == 255).all()  # the missing tile
    ours = read_patches(s, np.array([[0, t]]), 32, 32, edge_fill="black")
    assert (ours[0, :t // 2] == 90).all() and (ours[0, t // 2:] == 0).all()


@needs_zlib
def test_stripped_tiff_through_the_stream(tmp_path, rng):
    """Strips (the last one shorter) and RGBA samples: alpha dropped, as the Python path does."""
    img = rng.integers(0, 256, (50, 40, 4), dtype=np.uint8)
    strips = [zlib.compress(img[y:y + 16].tobytes()) for y in range(0, 50, 16)]
    offsets = np.cumsum([8] + [len(b) for b in strips])[:-1].tolist()
    from test_crafted_slides import rgb_tags, write_tiff
    tags = rgb_tags(40, 50, 40, 16, offsets, [len(b) for b in strips], 8, tiled=False)
    tags.update({258: (3, [8, 8, 8, 8]), 277: (3, [4]), 338: (3, [2])})
    s = open_slide(write_tiff(tmp_path / "s.tif", [tags], b"".join(strips)))
    coords = np.stack([rng.integers(-10, 40, 30), rng.integers(-10, 50, 30)], 1)
    st = PatchStats()
    ours = read_patches(s, coords, 20, 20, stats=st)
    assert st.engine == "proalign._C.PatchStream"
    np.testing.assert_array_equal(ours, read_patches(s, coords, 20, 20, decoder="imagecodecs"))
    np.testing.assert_array_equal(ours[0], s.read_region(tuple(coords[0]), 0, (20, 20)))


def test_python_path_when_the_stream_is_off(generated, monkeypatch, rng):
    """Without the C++ stream (no libjpeg at build time) the Python path reads the same patches."""
    s = open_slide(generated["tiff-lzw"])
    coords = np.stack([rng.integers(0, 700, 40), rng.integers(0, 500, 40)], 1)
    want = read_patches(s, coords, 128, 96)
    monkeypatch.setattr(P, "native_patches_available", lambda: False)
    st = PatchStats()
    np.testing.assert_array_equal(read_patches(s, coords, 128, 96, stats=st), want)
    assert st.engine != "proalign._C.PatchStream"


def test_jpeg2000_frame_header_checked_in_the_stream(tmp_path):
    if P.openjpeg_for_engine() is None:
        pytest.skip("no OpenJPEG 2.1+ library for the engine")
    j = bytes(imagecodecs.jpeg2k_encode(np.full((32, 32, 3), 120, np.uint8), level=0, codecformat="J2K"))
    path = _tiff_with_tiles(tmp_path / "j2.tif", [j], 64, 64, 64, 33005)
    with pytest.raises(SlideError, match=r"j2.tif: level 0 tile \(col 0, row 0\) does not decode: JPEG 2000 frame "
                                         r"is 32x32 px but the tile is 64x64 px"):
        read_patches(open_slide(path), np.array([[0, 0]]), 64, 64)
    assert struct.unpack(">H", j[:2])[0] == 0xFF4F
