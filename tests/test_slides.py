"""Slide reading: our TIFF parser and tile engine against OpenSlide on the real samples in
../shared/testdata, the C++ engine against its Python twin, decoders against each other, errors."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from proalign.decode.cpu import CpuDecoder, TileFormat, decode_tile
from proalign.slides.patches import PatchStats, iter_patches, read_patches, read_patches_openslide
from proalign.errors import SlideError
from proalign.slides.slide import OpenSlideSlide, TiffSlide, open_slide
from proalign.slides.tiff_index import read_tiff_pages
from proalign.slides.tile_engine import PyTileReader, jpeg_prefix, native_available, open_reader

TESTDATA = Path(os.environ.get("PROALIGN_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))
needs_data = pytest.mark.skipif(not TESTDATA.is_dir(), reason=f"real test slides not found at {TESTDATA} "
                                                              "(set PROALIGN_TESTDATA)")
CMU = TESTDATA / "svs" / "CMU-1-Small-Region.svs"
TCGA = TESTDATA / "svs" / "tcga-cr-7395-01a-01-ts1.svs"  # JPEG 2000, two levels, no mpp
SMALL = TESTDATA / "svs" / "openslide-python-small.svs"  # 16x16 image in one 64x64 tile
KIDNEY = TESTDATA / "tiff" / "kidney-48-5.tif"  # stripped, uncompressed, OpenSlide rejects it
DICOM_OK = ["gmi-multi_frame_jpeg2000_camelyon_challenge_image.dcm", "highdicom-sm_image.dcm",
            "openslide-python-boxes_0.dcm"]


@needs_data
@pytest.mark.parametrize("path", [CMU, TCGA, SMALL, KIDNEY])
def test_tiff_parser_matches_tifffile(path):
    import tifffile

    ours = read_tiff_pages(path)
    with tifffile.TiffFile(path) as tf:
        assert len(ours) == len(tf.pages)
        for p, q in zip(ours, tf.pages):
            assert (p.width, p.height, p.samples_per_pixel, p.compression) == (q.imagewidth, q.imagelength,
                                                                               q.samplesperpixel, q.compression)
            np.testing.assert_array_equal(p.offsets, np.asarray(q.dataoffsets, np.uint64)[:len(p.offsets)])
            np.testing.assert_array_equal(p.bytecounts, np.asarray(q.databytecounts, np.uint64)[:len(p.offsets)])
            assert (p.jpeg_tables or None) == (q.jpegtables or None)


@needs_data
@pytest.mark.parametrize("path", [CMU, TCGA, SMALL])
def test_slide_info_matches_openslide(path):
    ours, ref = open_slide(path), OpenSlideSlide(path)
    assert isinstance(ours, TiffSlide) and ours.format == "aperio-svs"
    assert ours.levels == ref.levels
    np.testing.assert_allclose(ours.downsamples, ref.downsamples, rtol=1e-12)
    assert ours.mpp == ref.mpp and ours.objective_power == ref.objective_power


@needs_data
def test_metadata_and_mpp_override():
    s = open_slide(CMU)
    assert s.mpp == pytest.approx(0.499) and s.objective_power == 20 and s.info.codec == "jpeg"
    assert s.info.tile_size == (240, 240)
    t = open_slide(TCGA)
    assert t.mpp is None and t.objective_power is None and t.info.mpp_source == "none"  # real TCGA: none
    t2 = open_slide(TCGA, mpp=0.25)
    assert t2.mpp == 0.25 and t2.info.mpp_source == "user"
    with pytest.raises(SlideError, match="mpp must be"):
        open_slide(TCGA, mpp=-1)


@needs_data
@pytest.mark.parametrize("path", [CMU, TCGA, SMALL])
def test_whole_levels_equal_openslide(path):
    """Every pixel of every level, with a margin outside the image (white in both)."""
    ours, ref = open_slide(path), OpenSlideSlide(path)
    for level, (w, h) in enumerate(ours.levels):
        a = ours.read_region((0, 0), level, (w + 9, h + 5))
        b = ref.read_region((0, 0), level, (w + 9, h + 5))
        np.testing.assert_array_equal(a, b)
        assert (a[:, w:] == 255).all() and (a[h:] == 255).all()


@needs_data
@pytest.mark.parametrize("name", DICOM_OK)
def test_dicom_through_openslide(name):
    s = open_slide(TESTDATA / "dicom" / name)
    assert isinstance(s, OpenSlideSlide) and s.format == "openslide:dicom"
    w, h = s.levels[0]
    img = s.read_region((0, 0), 0, (min(w, 300), min(h, 300)))
    assert img.shape == (min(h, 300), min(w, 300), 3) and img.dtype == np.uint8
    coords = np.array([[0, 0], [max(w - 64, 0), max(h - 64, 0)]])
    np.testing.assert_array_equal(read_patches(s, coords, 64, 32), read_patches_openslide(s, coords, 64, 32))


@needs_data
def test_stripped_tiff_opens_on_fast_path():
    import tifffile

    s = open_slide(KIDNEY)
    assert s.format == "generic-tiff" and s.mpp is None and s.levels == [(1493, 901)]
    np.testing.assert_array_equal(s.read_region((0, 0), 0, (1493, 901)), tifffile.imread(KIDNEY))


@needs_data
@pytest.mark.parametrize("name, problem", [
    ("invalid/histolab-broken.svs", "not a TIFF"),
    ("invalid/openslide-python-unopenable.tiff", "unsupported TIFF compression 52479"),
    ("qptiff/pathml-small_vectra.qptiff", "not an RGB brightfield image"),
    ("dicom/pathml-small_dicom.dcm", "OpenSlide cannot open it"),
])
def test_invalid_files_get_clear_errors(name, problem):
    with pytest.raises(SlideError, match=problem) as e:
        open_slide(TESTDATA / name)
    assert str(TESTDATA / name) in str(e.value)


def test_missing_file_error(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


@needs_data
@pytest.mark.parametrize("patch, out", [(256, 224), (512, 256), (100, 100)])
def test_patches_equal_openslide_level0(patch, out, rng):
    """Random corners, edges and outside included: the engine path equals OpenSlide read_region plus
    the same resize, pixel for pixel (same libjpeg-turbo underneath)."""
    s, ref = open_slide(CMU), OpenSlideSlide(CMU)
    w, h = s.dimensions
    coords = np.stack([rng.integers(-patch // 2, w, 300), rng.integers(-patch // 2, h, 300)], 1)
    stats = PatchStats()
    ours = read_patches(s, coords, patch, out, stats=stats)
    np.testing.assert_array_equal(ours, read_patches_openslide(ref, coords, patch, out))
    assert stats.level == 0 and stats.tiles_decoded == stats.tiles_needed == stats.tiles_read


@needs_data
def test_patches_equal_openslide_jpeg2000_level1(rng):
    """TCGA JPEG 2000 slide, read at level 1 (downsample 2.0005). OpenSlide resamples fractional
    level offsets bilinearly, so corners are put where x/ds is within 0.05 px of a level pixel;
    there OpenSlide's interpolation moves pixels by less than 0.05 px: tolerance mean abs < 0.5,
    max <= 16 levels."""
    s, ref = open_slide(TCGA), OpenSlideSlide(TCGA)
    ds = s.downsamples[1]
    lx = rng.integers(0, 180, 100)
    ly = rng.integers(0, 180, 100)
    coords = np.stack([2 * lx, 2 * ly], 1)
    assert np.abs(coords / ds - np.round(coords / ds)).max() < 0.05
    ours = read_patches(s, coords, 512, 256)
    theirs = read_patches_openslide(ref, coords, 512, 256)
    d = np.abs(ours.astype(int) - theirs)
    assert d.mean() < 0.5 and d.max() <= 16
    direct = s.read_region((0, 0), 1, s.levels[1])  # our level-1 pixels, cut by hand
    for i in range(5):
        y0, x0 = int(np.floor(coords[i, 1] / ds + 0.5)), int(np.floor(coords[i, 0] / ds + 0.5))
        np.testing.assert_array_equal(ours[i], direct[y0:y0 + 256, x0:x0 + 256])


@needs_data
def test_each_tile_read_and_decoded_once_with_bounded_cache(rng):
    s = open_slide(CMU)
    w, h = s.dimensions
    xs, ys = np.meshgrid(np.arange(0, w - 255, 128), np.arange(0, h - 255, 128))  # 50% overlap
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    rng.shuffle(coords)
    stats = PatchStats()
    got = {}
    for idx, batch in iter_patches(s, coords, 256, 256, batch_size=16, tiles_per_batch=8, stats=stats):
        for i, p in zip(idx.tolist(), batch.numpy()):
            assert i not in got
            got[i] = p
    assert sorted(got) == list(range(len(coords)))
    n_tiles = len({(c, r) for x, y in coords for c, r in s.tiles_for_rect(0, x, y, 256, 256)})
    assert stats.tiles_read == stats.tiles_decoded == stats.tiles_needed == n_tiles
    # about two rows of tiles live at once (10 tiles per row), never the whole slide (130)
    assert stats.peak_cached_tiles <= 3 * s.pages[0].tiles_across + 8
    assert stats.max_queued_batches <= 2
    full = s.read_region((0, 0), 0, s.dimensions)
    for i in rng.choice(len(coords), 10, replace=False):
        x, y = coords[i]
        np.testing.assert_array_equal(got[i], full[y:y + 256, x:x + 256])


@needs_data
@pytest.mark.parametrize("native", [True, False])
def test_engines_agree_and_splice_tables(native):
    if native and not native_available():
        pytest.skip("proalign._C is not built (no C++ compiler at install time)")
    p = read_tiff_pages(CMU)[0]
    prefix = jpeg_prefix(p.jpeg_tables, p.photometric)
    reader = open_reader(CMU, prefix, True, threads=3, native=native)
    twin = PyTileReader(str(CMU), prefix, True, threads=1)
    idx = np.arange(len(p.offsets))
    data, errors = reader.read(p.offsets[idx], p.bytecounts[idx])
    assert errors == [] and data == twin.read(p.offsets[idx], p.bytecounts[idx])[0]
    raw = CMU.read_bytes()
    for i in (0, 57):
        tile = raw[int(p.offsets[i]):int(p.offsets[i] + p.bytecounts[i])]
        assert data[i] == prefix + tile[2:]  # tables + Adobe marker, then the tile after its SOI
        assert b"\xff\xdb" not in tile and b"\xff\xdb" in data[i]  # abbreviated tile, tables spliced
    # empty tile -> empty bytes; past the end -> an error naming the byte range
    d2, e2 = reader.read(np.array([0, len(raw) - 10], np.uint64), np.array([0, 100], np.uint64))
    assert d2 == [b"", b""] and len(e2) == 1 and e2[0][0] == 1 and "past the end" in e2[0][1]
    # a tile that is not JPEG
    d3, e3 = reader.read(np.array([0], np.uint64), np.array([16], np.uint64))
    assert "SOI" in e3[0][1]


@needs_data
def test_stream_is_ordered_and_bounded():
    from proalign.slides.tile_engine import stream_batches

    p = read_tiff_pages(CMU)[0]
    for native in ([True, False] if native_available() else [False]):
        reader = open_reader(CMU, b"", False, threads=2, native=native)
        batches = [(p.offsets[i:i + 7], p.bytecounts[i:i + 7]) for i in range(0, len(p.offsets), 7)]
        got = [d for d, e in stream_batches(reader, batches, max_ahead=2)]
        raw = CMU.read_bytes()
        flat = [t for b in got for t in b]
        assert flat == [raw[int(o):int(o + c)] for o, c in zip(p.offsets, p.bytecounts)]


@pytest.mark.optional
@needs_data
def test_decoders_agree_on_real_tiles():
    dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    del dali
    from proalign.decode.dali_decode import DaliDecoder

    for path in (CMU, TCGA):
        s = open_slide(path)
        p = s.pages[0]
        data, _ = s.readers[0].read(p.offsets[:12], p.bytecounts[:12])
        cpu = CpuDecoder(threads=2).decode(data, s.formats[0])
        dc = DaliDecoder(device="cpu", max_batch=8).decode(data, s.formats[0])
        for a, b in zip(cpu, dc):
            np.testing.assert_array_equal(a, b)


def test_uncompressed_and_predictor_tiles():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fmt = TileFormat("none", 1, 2, 16, 16)
    np.testing.assert_array_equal(decode_tile(img.tobytes(), fmt), img)
    diff = img.copy()
    diff[:, 1:] = img[:, 1:] - img[:, :-1]  # TIFF predictor 2 (uint8 wraps)
    import zlib
    fmt2 = TileFormat("deflate", 8, 2, 16, 16, predictor=2)
    np.testing.assert_array_equal(decode_tile(zlib.compress(diff.tobytes()), fmt2), img)
    assert (decode_tile(b"", fmt) == 255).all()


@needs_data
def test_corrupt_tile_names_slide_and_tile(tmp_path):
    bad = tmp_path / "corrupt.svs"
    shutil.copy(CMU, bad)
    p = read_tiff_pages(bad)[0]
    with open(bad, "r+b") as f:  # keep the SOI, garble the scan data of tile (col 3, row 2)
        t = 2 * p.tiles_across + 3
        f.seek(int(p.offsets[t]) + 2)
        f.write(b"\x00" * int(p.bytecounts[t] - 2))
    s = open_slide(bad)
    with pytest.raises(SlideError, match=r"corrupt.svs: level 0 tile \(col 3, row 2\)"):
        read_patches(s, np.array([[0, 0], [3 * 240 + 5, 2 * 240 + 5]]), 64, 64)
    with pytest.raises(SlideError, match=r"tile \(col 3, row 2\)"):
        s.read_region((3 * 240, 2 * 240), 0, (10, 10))
    # the rest of the slide still reads
    assert s.read_region((0, 0), 0, (100, 100)).shape == (100, 100, 3)


@needs_data
def test_truncated_slide_is_a_clear_error(tmp_path):
    bad = tmp_path / "truncated.svs"
    bad.write_bytes(CMU.read_bytes()[:1_000_000])  # a download cut short: later directories are gone
    with pytest.raises(SlideError, match=r"truncated.svs: truncated TIFF"):
        open_slide(bad)


# Generated pyramids: odd sizes, partial edge tiles, non-power-of-two downsamples, every codec.
GENERATED = [
    ("svs", dict(width=2001, height=1499, tile=256, levels=(1, 3, 9), compression="jpeg")),
    ("svs", dict(width=1100, height=700, tile=240, levels=(1, 2.5), compression="jpeg", photometric="ycbcr")),
    ("svs", dict(width=900, height=650, tile=256, levels=(1, 4), compression="jpeg2000")),
    ("tiff", dict(width=1027, height=771, tile=256, levels=(1, 2, 6), compression="jpeg")),
    ("tiff", dict(width=777, height=555, tile=128, levels=(1, 3), compression="deflate")),
    ("tiff", dict(width=640, height=480, tile=128, levels=(1, 2), compression="lzw")),
]


@pytest.mark.parametrize("kind, kw", GENERATED, ids=[f"{k}-{kw['compression']}-{kw['width']}x{kw['height']}"
                                                      for k, kw in GENERATED])
def test_generated_pyramids_equal_openslide(tmp_path, kind, kw):
    from proalign.testing.synthetic_slides import write_aperio_svs, write_pyramidal_tiff

    path = tmp_path / ("s.svs" if kind == "svs" else "s.tif")
    writer = write_aperio_svs if kind == "svs" else write_pyramidal_tiff
    info = writer(path, seed=3, mpp=0.5, **kw)
    ours, ref = open_slide(path), OpenSlideSlide(path)
    assert isinstance(ours, TiffSlide)
    assert ours.levels == ref.levels == [tuple(x) for x in info["level_dimensions"]]
    np.testing.assert_allclose(ours.downsamples, ref.downsamples, rtol=1e-12)
    assert ours.mpp == pytest.approx(ref.mpp)
    for level, (w, h) in enumerate(ours.levels):
        np.testing.assert_array_equal(ours.read_region((0, 0), level, (w + 3, h + 2)),
                                      ref.read_region((0, 0), level, (w + 3, h + 2)))


def test_generated_patches_at_level1_equal_openslide(tmp_path, rng):
    """An exact downsample of 4, so level-1 corners are level pixels: engine == OpenSlide exactly."""
    from proalign.testing.synthetic_slides import write_aperio_svs

    path = tmp_path / "p.svs"
    write_aperio_svs(path, 4096, 3072, tile=256, levels=(1, 4), seed=5, tissue="dense")
    s, ref = open_slide(path), OpenSlideSlide(path)
    assert s.downsamples[1] == 4.0
    coords = 4 * np.stack([rng.integers(-20, 1024, 200), rng.integers(-20, 768, 200)], 1)
    stats = PatchStats()
    ours = read_patches(s, coords, 1024, 224, stats=stats)  # 1024 level-0 px -> 256 at level 1 -> 224
    assert stats.level == 1 and stats.read_size == 256
    np.testing.assert_array_equal(ours, read_patches_openslide(ref, coords, 1024, 224))


needs_libjpeg = pytest.mark.skipif(not __import__("proalign.decode.cpu", fromlist=["x"]).native_jpeg_available(),
                                   reason="proalign._C built without libjpeg: no engine JPEG decoder")


@needs_data
@needs_libjpeg
def test_engine_jpeg_decoder_equals_imagecodecs():
    from proalign.decode.cpu import NativeJpegDecoder

    s = open_slide(CMU)
    p = s.pages[0]
    data, _ = s.readers[0].read(p.offsets, p.bytecounts)
    ours = NativeJpegDecoder(scale=1, threads=2).decode(data, s.formats[0])
    for a, b in zip(ours, CpuDecoder(threads=2).decode(data, s.formats[0])):
        np.testing.assert_array_equal(a, b)
    half = NativeJpegDecoder(scale=2).decode(data[:3], s.formats[0])
    assert half[0].shape == (120, 120, 3)
    from proalign.decode.cpu import TileDecodeError
    with pytest.raises(TileDecodeError) as e:
        NativeJpegDecoder().decode([data[0], data[1][:40] + b"\x00" * 50], s.formats[0])
    assert e.value.position == 1


@needs_libjpeg
def test_shrink_on_load_close_to_exact(tmp_path, rng):
    """DCT-domain 1/2 decoding vs the exact path: within another JPEG decoder's rounding (mean
    |diff| < 0.6, max <= 16); not used when it would leave fewer than 1.1 x out_size pixels; each
    tile still decoded once."""
    from proalign.testing.synthetic_slides import write_aperio_svs

    path = tmp_path / "s.svs"
    write_aperio_svs(path, 3000, 2500, tile=256, levels=(1, 16), seed=2, tissue="dense")
    s = open_slide(path)
    coords = np.stack([rng.integers(0, 2400, 150), rng.integers(0, 1900, 150)], 1) // 2 * 2
    for patch, out, want_shrink, tol_max in ((512, 224, 2, 16), (512, 128, 2, 16), (512, 256, 1, 0)):
        exact = read_patches(s, coords, patch, out)
        stats = PatchStats()
        fast = read_patches(s, coords, patch, out, shrink_on_load=True, stats=stats)
        assert stats.extra["shrink"] == want_shrink and stats.tiles_decoded == stats.tiles_needed
        d = np.abs(fast.astype(int) - exact)
        assert d.mean() < 0.6 and d.max() <= tol_max, (d.mean(), d.max())
