"""Synthetic SVS / pyramidal TIFF writers, checked with OpenSlide 4, tifffile and imagecodecs.

Tolerances: JPEG at quality 90 must come back within a mean absolute error of 2 (per channel,
0..255) at level 0 and 3 on the lower levels (measured: 0.3 to 1.2); JPEG 2000 at 45 dB within 2;
Deflate/LZW/uncompressed exactly.
"""
import struct
import time

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
imagecodecs = pytest.importorskip("imagecodecs")
pytestmark = pytest.mark.optional

from proalign.testing import synthetic_slides as ss  # noqa: E402


def _rgb(img):
    return np.asarray(img.convert("RGB")).astype(np.int16)


def _mae(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _level_page_indices(tf):
    return [i for i, p in enumerate(tf.pages) if p.is_tiled]


def _raw_tile(tf, page, index):
    fh = tf.filehandle
    fh.seek(page.dataoffsets[index])
    return fh.read(page.databytecounts[index])


def _first_tissue_tile(info, page):
    blank = len(info["blank_tile"])
    offsets = np.asarray(page.dataoffsets)
    shared = np.bincount(np.unique(offsets, return_inverse=True)[1]).argmax()
    shared_offset = np.unique(offsets)[shared]
    for i, (o, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        if o != shared_offset or n != blank:
            return i
    raise AssertionError("no tissue tile")


# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svs_odd(tmp_path_factory):
    """2001 x 1499 (partial edge tiles everywhere), JPEG q90, pen marks, all associated images."""
    path = tmp_path_factory.mktemp("svs") / "odd.svs"
    info = ss.write_aperio_svs(path, 2001, 1499, quality=90, levels=(1, 4, 16), pen_marks=True, seed=3)
    return path, info


def test_aperio_jpeg_opens_with_metadata(svs_odd):
    path, info = svs_odd
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert o.level_count == 3
        assert o.level_dimensions == ((2001, 1499), (500, 374), (125, 93))  # floor, as Aperio
        assert tuple(info["level_dimensions"]) == o.level_dimensions
        np.testing.assert_allclose(o.level_downsamples, info["level_downsamples"], rtol=1e-9)
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(o.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert o.properties["openslide.objective-power"] == "40"
        assert o.properties["aperio.AppMag"] == "40"
        assert o.properties["aperio.ScanScope ID"] == "SYNTHETIC"
        assert set(o.associated_images) == {"thumbnail", "label", "macro"}
        assert o.associated_images["thumbnail"].size == info["thumbnail_size"]
    assert info["description"].startswith("Aperio Image Library")
    assert "|AppMag = 40|" in info["description"] and "|MPP = 0.2500" in info["description"]


def test_aperio_jpeg_pixels_match_source(svs_odd):
    path, info = svs_odd
    slide = info["slide"]
    with openslide.OpenSlide(str(path)) as o:
        for level in range(o.level_count):
            got = _rgb(o.read_region((0, 0), level, o.level_dimensions[level]))
            want = ss.level_image(info, level)
            assert got.shape == want.shape
            assert _mae(got, want) < (2.0 if level == 0 else 3.0), level
        # the bottom-right corner lies in a partial edge tile (2001 = 7*256 + 209)
        corner = o.read_region((1900, 1400), 0, (101, 99))
        assert _mae(_rgb(corner), slide.level0()[1400:, 1900:]) < 2.0
        # past the right/bottom edge OpenSlide returns transparent pixels: the padding is clipped
        beyond = np.asarray(o.read_region((1990, 1490), 0, (20, 20)))
        assert (beyond[:9, :11, 3] == 255).all() and (beyond[9:, :, 3] == 0).all() and (beyond[:, 11:, 3] == 0).all()
        thumb = _rgb(o.associated_images["thumbnail"])
        assert _mae(thumb, slide.render(info["thumbnail_downsample"], info["thumbnail_size"])) < 2.0
        label = _rgb(o.associated_images["label"])  # LZW + predictor: lossless
        assert label.shape == (460, 400, 3) and label.min() < 50 and label.max() > 240
    # tifffile decodes the same pixels as OpenSlide
    with tifffile.TiffFile(path) as tf:
        assert tf.is_svs
        assert _mae(tf.pages[0].asarray(), slide.level0()) < 2.0


def test_aperio_jpeg_tiles_are_abbreviated_rgb(svs_odd):
    path, info = svs_odd
    with tifffile.TiffFile(path) as tf:
        pages = tf.pages
        levels = _level_page_indices(tf)
        assert levels == [0, 2, 3]  # the stripped thumbnail is the second page, as Aperio writes it
        assert not pages[1].is_tiled and pages[1].compression == 7
        assert [p.tags["NewSubfileType"].value for p in pages] == [0, 0, 0, 0, 1, 9]
        tables = pages[0].tags[347].value
        assert tables == info["jpeg_tables"]
        assert tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"
        assert tables.count(b"\xff\xdb") == 1 and tables.count(b"\xff\xc4") == 2  # one DQT, DC+AC DHT
        for i in levels:
            p = pages[i]
            assert p.compression == 7 and p.photometric == 2  # JPEG, RGB (Aperio)
            assert p.tags[347].value == tables
            assert p.tags["YCbCrSubSampling"].value == (2, 2)  # written as Aperio does; ignored for RGB
        page = pages[0]
        k = _first_tissue_tile(info, page)
        raw = _raw_tile(tf, page, k)
        head = raw[: raw.index(b"\xff\xda")]
        assert raw[:4] == b"\xff\xd8\xff\xc0"  # SOI then SOF0: no APPn, no tables in the tile
        assert b"\xff\xdb" not in head and b"\xff\xc4" not in head and b"\xff\xe0" not in head
        assert raw[-2:] == b"\xff\xd9"
        # SOF0: 3 components with ids 0, 1, 2, all 1x1 sampled, one quantisation table
        nf = raw[11]  # SOI(2) SOF0 marker(2) length(2) precision(1) height(2) width(2) Nf(1)
        comps = [tuple(raw[12 + 3 * c:15 + 3 * c]) for c in range(nf)]
        assert comps == [(0, 0x11, 0), (1, 0x11, 0), (2, 0x11, 0)]
        ty, tx = divmod(k, -(-2001 // 256))
        want = info["slide"].level0()[ty * 256:(ty + 1) * 256, tx * 256:(tx + 1) * 256]
        h, w = want.shape[:2]
        right = imagecodecs.jpeg8_decode(raw, tables=tables, colorspace="RGB", outcolorspace="RGB")
        assert _mae(right[:h, :w], want) < 2.0
        # like a real Aperio tile, a decoder that is not told "RGB" guesses YCbCr: wrong colours
        wrong = imagecodecs.jpeg8_decode(raw, tables=tables)
        assert _mae(wrong[:h, :w], want) > 20


def test_background_tiles_share_one_encoding(svs_odd):
    path, info = svs_odd
    with tifffile.TiffFile(path) as tf:
        offs = np.concatenate([np.asarray(tf.pages[i].dataoffsets) for i in _level_page_indices(tf)])
        counts = np.concatenate([np.asarray(tf.pages[i].databytecounts) for i in _level_page_indices(tf)])
    n_blank = sum(lv["background_tiles"] for lv in info["levels"])
    assert n_blank > 0
    blank_offsets = offs[counts == len(info["blank_tile"])]
    values, freq = np.unique(blank_offsets, return_counts=True)
    assert freq.max() == n_blank  # every background tile of every level points at the same bytes


def test_aperio_ycbcr(tmp_path):
    path = tmp_path / "ycc.svs"
    info = ss.write_aperio_svs(path, 1000, 760, quality=90, photometric="ycbcr", levels=(1, 4), label=False,
                               macro=False)
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[0]
        assert p.photometric == 6 and p.tags["YCbCrSubSampling"].value == (2, 2)
        raw = _raw_tile(tf, p, _first_tissue_tile(info, p))
        assert raw[11] == 3 and [raw[12 + 3 * c] for c in range(3)] == [1, 2, 3]
        assert raw[13] == 0x22 and raw[16] == raw[19] == 0x11  # 4:2:0
        assert p.tags[347].value.count(b"\xff\xdb") == 2
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert set(o.associated_images) == {"thumbnail"}
        for level in range(o.level_count):
            got = _rgb(o.read_region((0, 0), level, o.level_dimensions[level]))
            assert _mae(got, ss.level_image(info, level)) < 3.0
        thumb = _rgb(o.associated_images["thumbnail"])
        assert _mae(thumb, info["slide"].render(info["thumbnail_downsample"], info["thumbnail_size"])) < 3.0


def test_aperio_jpeg2000_without_mpp_or_magnification(tmp_path):
    path = tmp_path / "j2k.svs"
    info = ss.write_aperio_svs(path, 1100, 700, compression="jpeg2000", quality=45, levels=(1, 2), mpp=None,
                               app_mag=None, label=False, macro=False)
    assert "MPP" not in info["description"] and "AppMag" not in info["description"]
    assert "J2K/KDU Q=45" in info["description"]
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[0]
        assert p.compression == 33005 and p.photometric == 2 and 347 not in p.tags
        raw = _raw_tile(tf, p, 0)
        assert raw[:4] == b"\xff\x4f\xff\x51"  # a bare J2K codestream (SOC, SIZ), full tile size
        assert imagecodecs.jpeg2k_decode(raw).shape == (256, 256, 3)
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert o.level_dimensions == ((1100, 700), (550, 350))
        assert "openslide.mpp-x" not in o.properties and "aperio.MPP" not in o.properties
        assert "openslide.objective-power" not in o.properties
        for level in range(2):
            got = _rgb(o.read_region((0, 0), level, o.level_dimensions[level]))
            assert _mae(got, ss.level_image(info, level)) < 2.0


def test_aperio_jpeg2000_lossless(tmp_path):
    info = ss.write_aperio_svs(tmp_path / "lossless.svs", 600, 500, compression="jpeg2000", quality=100,
                               levels=(1, 2), thumbnail=False, label=False, macro=False)
    with openslide.OpenSlide(info["path"]) as o:
        np.testing.assert_array_equal(_rgb(o.read_region((0, 0), 0, (600, 500))), info["slide"].level0())
        np.testing.assert_array_equal(_rgb(o.read_region((0, 0), 1, (300, 250))), ss.level_image(info, 1))


@pytest.mark.parametrize("levels, dims, ceil_dims", [
    ((1, 3, 9), [(1001, 749), (333, 249), (111, 83)], [(1001, 749), (334, 250), (112, 84)]),
    ((1, 2.5), [(1001, 749), (400, 299)], [(1001, 749), (401, 300)]),
])
def test_non_power_of_two_downsamples(tmp_path, levels, dims, ceil_dims):
    path = tmp_path / "np2.svs"
    info = ss.write_aperio_svs(path, 1001, 749, quality=90, levels=levels, thumbnail=False, label=False,
                               macro=False)
    assert info["level_dimensions"] == dims
    with openslide.OpenSlide(str(path)) as o:
        assert list(o.level_dimensions) == dims
        assert list(o.associated_images) == []
        np.testing.assert_allclose(o.level_downsamples, info["level_downsamples"], rtol=1e-9)
        got = _rgb(o.read_region((0, 0), 1, dims[1]))
        assert _mae(got, ss.level_image(info, 1)) < 3.0
    ceil = ss.write_aperio_svs(tmp_path / "ceil.svs", 1001, 749, levels=levels, level_rounding="ceil",
                               thumbnail=False, label=False, macro=False)
    assert ceil["level_dimensions"] == ceil_dims
    with openslide.OpenSlide(ceil["path"]) as o:
        assert list(o.level_dimensions) == ceil_dims


@pytest.mark.parametrize("compression", ["jpeg", "deflate", "lzw"])
def test_generic_pyramidal_tiff(tmp_path, compression):
    path = tmp_path / f"g_{compression}.tif"
    info = ss.write_pyramidal_tiff(path, 1001, 749, compression=compression, quality=90, levels=(1, 2, 4),
                                   mpp=0.5)
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "generic-tiff"
        assert o.level_dimensions == ((1001, 749), (500, 374), (250, 187))
        np.testing.assert_allclose(o.level_downsamples, info["level_downsamples"], rtol=1e-9)
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(o.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert o.properties["tiff.ResolutionUnit"] == "centimeter"
        assert "openslide.objective-power" not in o.properties
        assert not any(k.startswith("aperio.") for k in o.properties)
        for level in range(o.level_count):
            got = _rgb(o.read_region((0, 0), level, o.level_dimensions[level]))
            want = ss.level_image(info, level)
            if compression == "jpeg":
                assert _mae(got, want) < (2.0 if level == 0 else 3.0)
            else:
                np.testing.assert_array_equal(got, want)  # lossless
    with tifffile.TiffFile(path) as tf:
        assert [p.tags["NewSubfileType"].value for p in tf.pages] == [0, 1, 1]
        assert all(p.is_tiled for p in tf.pages)
        p = tf.pages[0]
        if compression == "jpeg":
            assert p.photometric == 6 and 347 in p.tags
            raw = _raw_tile(tf, p, _first_tissue_tile(info, p))
            assert b"\xff\xdb" not in raw[: raw.index(b"\xff\xda")]
        else:
            assert p.predictor == 2
            np.testing.assert_array_equal(p.asarray(), info["slide"].level0())


def test_generic_tiff_without_mpp(tmp_path):
    path = tmp_path / "nompp.tif"
    info = ss.write_pyramidal_tiff(path, 700, 500, compression="none", mpp=None, levels=(1, 2))
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in o.properties
        np.testing.assert_array_equal(_rgb(o.read_region((0, 0), 0, (700, 500))), info["slide"].level0())


def test_sparse_100k_slide_is_fast_and_small(tmp_path):
    path = tmp_path / "big.svs"
    t0 = time.perf_counter()
    info = ss.write_aperio_svs(path, 100_000, 100_000, tissue="sparse", n_regions=3, region_size=1024,
                               levels=(1, 4, 16), pen_marks=["green"])
    elapsed = time.perf_counter() - t0
    assert elapsed < 15, elapsed
    size = path.stat().st_size
    assert size < 8 << 20, size  # the tile index (150k level-0 tiles) is most of it
    assert not info["bigtiff"]
    lv0 = info["levels"][0]
    assert lv0["tiles"] == 391 * 391 and 0 < lv0["encoded_tiles"] <= 3 * 16
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert o.level_dimensions == ((100_000, 100_000), (25_000, 25_000), (6_250, 6_250))
        slide = info["slide"]
        assert len(slide.tissue_boxes) == 3
        x0, y0, x1, y1 = slide.tissue_boxes[1]
        got = _rgb(o.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
        assert _mae(got, slide.render_region(1)) < 3.0
        bg = _rgb(o.read_region((99_000, 99_000), 0, (300, 300)))
        assert np.abs(bg - np.array(ss.BACKGROUND)).max() <= 2
        lx, ly = x0 // 4, y0 // 4  # level 1 (downsample 4) around the same fragment
        got1 = _rgb(o.read_region((lx * 4, ly * 4), 1, (300, 300)))
        assert _mae(got1, slide.render(4, (25_000, 25_000), window=(lx, ly, 300, 300))) < 3.0
        low = _rgb(o.read_region((0, 0), 2, (6250, 6250)))
        assert low.shape == (6250, 6250, 3) and low.min() < 200  # the tissue shows at level 2


def test_bigtiff_forced(tmp_path):
    path = tmp_path / "big.svs"
    info = ss.write_aperio_svs(path, 900, 700, tile=240, bigtiff=True, levels=(1, 4))
    assert info["bigtiff"]
    with open(path, "rb") as f:
        assert f.read(8) == b"II+\x00\x08\x00\x00\x00"
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == "aperio"
        assert o.level_dimensions == ((900, 700), (225, 175))
        assert int(o.properties["openslide.level[0].tile-width"]) == 240
        assert _mae(_rgb(o.read_region((0, 0), 0, (900, 700))), info["slide"].level0()) < 3.0


def test_tiff_writer_switches_to_bigtiff_past_4gib(tmp_path):
    """The IFDs land past 4 GiB (a sparse hole), so close(None) must pick BigTIFF."""
    path = tmp_path / "huge.tif"
    w = ss._TiffWriter(path)
    codec = ss._PlainCodec("none", predictor=False)
    strip = np.full((16, 16, 3), 7, np.uint8)
    w.fh.seek(2**32)
    w.pos = 2**32
    off = w.write(codec.encode(strip))
    w.pages = [ss._image_tags(width=16, height=16, codec=codec, subfiletype=0, description=None,
                              offsets=np.array([off], np.uint64), counts=np.array([16 * 16 * 3]),
                              rows_per_strip=16)]
    assert w.close(None) is True
    if path.stat().st_blocks * 512 > 1 << 30:
        pytest.skip("the filesystem does not keep sparse files")
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
        np.testing.assert_array_equal(tf.pages[0].asarray(), strip)
    path.unlink()


def test_deterministic_in_seed(tmp_path):
    kw = dict(levels=(1, 4), pen_marks=True)
    paths = [tmp_path / d / "s.svs" for d in ("a", "b", "c")]
    for p in paths:
        p.parent.mkdir()
    a = ss.write_aperio_svs(paths[0], 800, 600, seed=5, **kw)
    ss.write_aperio_svs(paths[1], 800, 600, seed=5, **kw)
    c = ss.write_aperio_svs(paths[2], 800, 600, seed=6, **kw)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # byte-identical
    assert paths[0].read_bytes() != paths[2].read_bytes()
    assert not np.array_equal(a["slide"].level0(), c["slide"].level0())


def test_tissue_kinds_and_pen_marks():
    plain = ss.synthetic_slide(1200, 900, seed=1)
    pens = ss.synthetic_slide(1200, 900, seed=1, pen_marks=("green", "blue", "red"))
    assert [p.colour for p in pens.pen_strokes] == ["green", "blue", "red"]
    img, ref = pens.level0(), plain.level0()
    bg = np.array(ss.BACKGROUND)
    assert (ref == bg).all(axis=-1).mean() > 0.3  # mostly glass
    tissue = ~(ref == bg).all(axis=-1)
    r, g, b = (ref[..., i].astype(int) for i in range(3))
    assert (r[tissue] > g[tissue]).mean() > 0.95  # pink/purple: green channel lowest (eosin)
    for stroke in pens.pen_strokes:
        x0, y0, x1, y1 = stroke.box
        crop = img[y0:y1, x0:x1].astype(int)
        R, G, B = crop[..., 0], crop[..., 1], crop[..., 2]
        ink = {"green": (G > R + 40) & (G > B + 20), "blue": (B > R + 60) & (B > G + 40),
               "red": (R > G + 90) & (R > B + 80)}[stroke.colour]
        assert ink.mean() > 0.05, stroke
    for colour_test in ((lambda R, G, B: (G > R + 40) & (G > B + 20)),):
        R, G, B = (ref[..., i].astype(int) for i in range(3))
        assert not colour_test(R, G, B).any()  # no green pen without pen marks
    dense = ss.synthetic_slide(600, 500, tissue="dense", seed=2).level0()
    assert not (dense == bg).all(axis=-1).any()
    none = ss.synthetic_slide(600, 500, tissue="none")
    assert none.regions == () and (none.level0() == bg).all()
    pen_only = ss.synthetic_slide(1200, 900, tissue="none", pen_marks=["green"])
    assert pen_only.tissue_boxes == [] and len(pen_only.pen_strokes) == 1
    sparse = ss.synthetic_slide(4000, 3000, tissue="sparse", n_regions=2)
    assert len(sparse.tissue_boxes) == 2


def test_given_image_round_trips_losslessly(tmp_path, rng):
    img = rng.integers(0, 256, (300, 520, 3), dtype=np.uint8)
    info = ss.write_pyramidal_tiff(tmp_path / "img.tif", 520, 300, compression="deflate", image=img,
                                   levels=(1, 2), tile=128)
    with openslide.OpenSlide(info["path"]) as o:
        np.testing.assert_array_equal(_rgb(o.read_region((0, 0), 0, (520, 300))), img)
        np.testing.assert_array_equal(_rgb(o.read_region((0, 0), 1, (260, 150))), ss.level_image(info, 1))


def test_bad_arguments(tmp_path):
    p = tmp_path / "x.svs"
    with pytest.raises(ValueError, match="start with 1"):
        ss.write_aperio_svs(p, 500, 500, levels=(2, 4))
    with pytest.raises(ValueError, match="increase"):
        ss.write_aperio_svs(p, 500, 500, levels=(1, 4, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        ss.write_aperio_svs(p, 500, 500, tile=100)
    with pytest.raises(ValueError, match="RGB"):
        ss.write_aperio_svs(p, 500, 500, compression="jpeg2000", photometric="ycbcr")
    with pytest.raises(ValueError, match="compression"):
        ss.write_aperio_svs(p, 500, 500, compression="lzw")
    with pytest.raises(ValueError, match="tissue"):
        ss.write_aperio_svs(p, 500, 500, tissue="forest")
    with pytest.raises(ValueError, match="both be"):
        ss.write_pyramidal_tiff(p, 3, 3, levels=(1, 4, 8))
    assert not p.exists()


def test_split_jpeg_round_trip():
    img = np.full((32, 48, 3), 100, np.uint8)
    img[8:20, 10:30] = (200, 40, 90)
    stream = imagecodecs.jpeg8_encode(img, level=95)
    tables, frame, data = ss.split_jpeg(bytes(stream))
    assert struct.unpack(">H", frame[:2])[0] == 0xFFC0
    out = imagecodecs.jpeg8_decode(b"\xff\xd8" + frame + data, tables=tables)
    assert _mae(out, img) < 2
