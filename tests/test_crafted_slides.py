"""Crafted (corrupt or hostile) slide files: each gives a SlideError naming the file and the problem,
never a raw Python error, a process abort, a hang or a huge allocation; a bad slide in a `patch`
run is reported and the others are still written. Every file here is written byte by byte."""
from __future__ import annotations

import itertools
import struct
import subprocess
import sys
import textwrap
import threading
import zlib

import imagecodecs
import numpy as np
import pytest
from conftest import run_cli
from proalign.decode.cpu import (
    CpuDecoder,
    TileDecodeError,
    TileFormat,
    decode_tile,
    native_jpeg_available,
)
from proalign.errors import ProAlignError, SlideError
from proalign.slides import tile_engine
from proalign.slides.grid import GridError, patch_grid
from proalign.slides.patching import patch_slide
from proalign.slides.slide import TiffSlide, open_slide
from proalign.slides.tiff_index import read_tiff_pages

# TIFF field types: 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL, 7 UNDEFINED, 9 SLONG, 11 FLOAT, 12 DOUBLE
_CODES = {1: "B", 3: "H", 4: "I", 9: "i", 11: "f", 12: "d"}


def _encode(typ: int, vals) -> tuple[bytes, int]:
    if typ == 2:
        return vals.encode() + b"\0", len(vals) + 1
    if typ == 7:
        return bytes(vals), len(vals)
    if typ == 5:
        return b"".join(struct.pack("<II", a, b) for a, b in vals), len(vals)
    return struct.pack(f"<{len(vals)}{_CODES[typ]}", *vals), len(vals)


def write_tiff(path, pages: list[dict], data: bytes = b""):
    """A little-endian classic TIFF: `data` (the tiles) at offset 8, then one IFD per page, each a
    {tag: (type, values)} dict; values too long for the entry go right before their IFD."""
    out = bytearray(b"II*\0\0\0\0\0" + data)
    ifds = []
    for tags in pages:
        entries = []
        for tag in sorted(tags):
            payload, count = _encode(*tags[tag])
            if len(payload) > 4:
                out += b"\0" * (len(out) % 2)
                value = struct.pack("<I", len(out))
                out += payload
            else:
                value = payload.ljust(4, b"\0")
            entries.append(struct.pack("<HHI", tag, tags[tag][0], count) + value)
        out += b"\0" * (len(out) % 2)
        ifds.append(len(out))
        out += struct.pack("<H", len(entries)) + b"".join(entries) + b"\0\0\0\0"
    struct.pack_into("<I", out, 4, ifds[0])
    for here, nxt in itertools.pairwise(ifds):
        struct.pack_into("<I", out, here + 2 + 12 * struct.unpack_from("<H", out, here)[0], nxt)
    path.write_bytes(bytes(out))
    return path


def rgb_tags(w, h, tw, th, offsets, counts, compression=1, tiled=True, **extra) -> dict:
    tags = {256: (4, [w]), 257: (4, [h]), 258: (3, [8, 8, 8]), 259: (3, [compression]), 262: (3, [2]),
            277: (3, [3]), 284: (3, [1])}
    if tiled:
        tags.update({322: (4, [tw]), 323: (4, [th]), 324: (4, list(offsets)), 325: (4, list(counts))})
    else:
        tags.update({278: (4, [th]), 273: (4, list(offsets)), 279: (4, list(counts))})
    tags.update(extra)
    return tags


def tiled_slide(path, w=32, h=32, t=16, color=(200, 120, 160), tiles: list[bytes] | None = None, compression=1,
                edit=None, pages=1):
    """A tiled RGB TIFF (uncompressed tiles of one colour unless `tiles` are given); `edit(tags)`
    changes the first page's tags before writing; `pages` > 1 repeats the page (a pyramid's shape)."""
    n = -(-w // t) * -(-h // t)
    tiles = tiles if tiles is not None else [np.full((t, t, 3), color, np.uint8).tobytes()] * n
    offsets = np.cumsum([8] + [len(b) for b in tiles])[:-1].tolist()
    first = rgb_tags(w, h, t, t, offsets, [len(b) for b in tiles], compression)
    if edit:
        edit(first)
    return write_tiff(path, [first] + [dict(first) for _ in range(pages - 1)], b"".join(tiles))


def set_tag(tag, typ, vals):
    return lambda tags: tags.__setitem__(tag, (typ, vals))


# --- item 3: header fields of the wrong type or out of range ---------------------------------------

BAD_FIELDS = [
    ("width0", set_tag(256, 4, [0]), "ImageWidth 0 is out of range"),
    ("height0", set_tag(257, 4, [0]), "ImageLength 0 is out of range"),
    ("negative", set_tag(256, 9, [-32]), "ImageWidth -32 is out of range"),
    ("huge", set_tag(256, 4, [2 ** 31]), "ImageWidth 2147483648 is out of range"),
    ("nan", set_tag(256, 11, [float("nan")]), "ImageWidth is not an integer"),
    ("inf", set_tag(256, 12, [float("inf")]), "ImageWidth is not an integer"),
    ("text", set_tag(256, 2, "abcdefg"), "ImageWidth is not an integer"),
    ("bytes", set_tag(256, 7, [1, 2, 3, 4]), "ImageWidth is not an integer"),
    ("compression-text", set_tag(259, 2, "abcdefg"), "Compression is not an integer"),
    ("tile0", set_tag(322, 4, [0]), "TileWidth 0 is out of range"),
    ("subifds-text", set_tag(330, 2, "abcdefg"), "SubIFDs is not a list of offsets"),
    ("subifds-fraction", set_tag(330, 5, [(1, 3)]), "SubIFDs is not a list of offsets"),
    ("offsets-signed", set_tag(324, 9, [-8, 8, 8, 8]), "TileOffsets are not unsigned integers"),
]


@pytest.mark.parametrize("name,edit,problem", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_bad_header_fields_raise_slide_error(tmp_path, name, edit, problem):
    path = tiled_slide(tmp_path / f"{name}.tif", edit=edit)
    with pytest.raises(SlideError, match=f"{name}.tif: TIFF directory 0: {problem}"):
        read_tiff_pages(path)
    try:  # the whole open: our error, or OpenSlide reading what it understands; never a raw one
        open_slide(path).read_region((0, 0), 0, (8, 8))
    except SlideError as e:
        assert f"{name}.tif" in str(e)


def test_zero_sized_pyramid_level(tmp_path):
    tile = np.full((16, 16, 3), 200, np.uint8).tobytes()
    level0 = rgb_tags(32, 32, 16, 16, [8] * 4, [len(tile)] * 4)
    level1 = {**level0, 256: (4, [0]), 257: (4, [0])}
    path = write_tiff(tmp_path / "l1.tif", [level0, level1], tile)
    with pytest.raises(SlideError, match="l1.tif: TIFF directory 1: ImageWidth 0 is out of range"):
        TiffSlide(path)


def test_xresolution_of_the_wrong_type_counts_as_missing(tmp_path):
    path = tiled_slide(tmp_path / "x.tif", edit=lambda t: t.update({282: (2, "abcdefg"), 296: (3, [3])}))
    s = open_slide(path)
    assert isinstance(s, TiffSlide) and s.mpp is None


@pytest.mark.parametrize("head,problem", [
    (b"II*\0\x08\0\0", "truncated TIFF header"),
    (b"II+\0\x08\0", "truncated BigTIFF header"),
    (b"II+\0\x04\0\0\0" + struct.pack("<Q", 16), "not a valid BigTIFF file"),
])
def test_short_headers(tmp_path, head, problem):
    path = tmp_path / "h.tif"
    path.write_bytes(head)
    with pytest.raises(SlideError, match=f"h.tif: {problem}"):
        read_tiff_pages(path)


# --- item 1: byte counts far beyond a tile's size; exceptions in the C++ threads ---------------------

def test_byte_counts_larger_than_any_tile_are_refused(tmp_path):
    # 64 tiles of 16 x 16 px (768 raw bytes), each claiming 100 MB: the engine would allocate 6.4 GB
    path = tiled_slide(tmp_path / "bc.tif", w=128, h=128, edit=set_tag(325, 4, [100_000_000] * 64))
    with pytest.raises(SlideError, match=r"bc.tif: TIFF directory 0: tile 0 claims 100000000 stored bytes for "
                                         r"768 uncompressed bytes"):
        read_tiff_pages(path)


ENGINE_OOM = textwrap.dedent("""
    import resource, sys
    import imagecodecs, numpy as np
    from proalign import _C
    path = sys.argv[1]
    reader = _C.TileReader(path, b"", False, 8)
    jpeg = bytearray(imagecodecs.jpeg8_encode(np.full((64, 64, 3), 180, np.uint8)))
    sof = jpeg.find(b"\\xff\\xc0")
    jpeg[sof + 5:sof + 9] = (9000).to_bytes(2, "big") * 2  # claims 9000 x 9000 px: 243 MB of RGB
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    limit = vm + (400 << 20)  # less than one 1 GiB tile or the JPEG's pixels plus 8 thread stacks
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    data, errors = reader.read(np.zeros(16, np.uint64), np.full(16, 1 << 30, np.uint64))
    print("read", len(errors), errors[0][1])
    for data, errors in _C.TileStream(reader, [(np.zeros(4, np.uint64), np.full(4, 1 << 30, np.uint64))], 2):
        print("stream", len(errors), errors[0][1])
    if getattr(_C, "HAS_LIBJPEG", False):
        arrays, errors = _C.decode_jpeg([bytes(jpeg)] * 8, 1, 8)
        print("jpeg", len(errors), errors[0][1])
""")


def test_engine_threads_survive_out_of_memory(tmp_path):
    """std::bad_alloc in a reader or decoder thread used to abort the process (exit 134)."""
    if not tile_engine.native_available():
        pytest.skip("proalign._C is not built")
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    p = subprocess.run([sys.executable, "-c", ENGINE_OOM, str(path)], capture_output=True, text=True, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("read 16 the tile reader failed: out of memory for 1073741824 bytes"), lines
    assert lines[1].startswith("stream 4 the tile reader failed"), lines
    if len(lines) > 2:
        assert lines[2].startswith("jpeg ") and "memory" in lines[2], lines


# --- item 2: the Python twin's reader thread dies ----------------------------------------------------

def test_python_stream_reports_a_dead_reader_thread(tmp_path, monkeypatch):
    path = tiled_slide(tmp_path / "s.tif")
    reader = tile_engine.PyTileReader(str(path), threads=1)

    def fail(offsets, sizes):
        raise MemoryError("no memory for the batch")
    monkeypatch.setattr(reader, "read", fail)
    outcome = []

    def consume():
        try:
            list(tile_engine.stream_batches(reader, [(np.array([8], np.uint64), np.array([768], np.uint64))] * 3))
            outcome.append("no error")
        except MemoryError as e:
            outcome.append(str(e))
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(10)
    assert outcome == ["no memory for the batch"], "the consumer hung"


def test_python_reader_turns_memory_errors_into_tile_errors(tmp_path, monkeypatch):
    path = tiled_slide(tmp_path / "s.tif")
    reader = tile_engine.PyTileReader(str(path), threads=2)

    def pread(fd, n, offset):
        raise MemoryError()
    monkeypatch.setattr(tile_engine.os, "pread", pread)
    data, errors = reader.read(np.array([8, 776], np.uint64), np.array([768, 768], np.uint64))
    assert data == [b"", b""] and [i for i, _ in errors] == [0, 1]
    assert errors[0][1].startswith("the tile reader failed: MemoryError")
    reader.close()


# --- item 4: tiny files that would need huge buffers -------------------------------------------------

def test_tiles_too_large_to_decode_are_refused(tmp_path):
    # a 100 x 100 image in one 16384 x 16384 tile left empty: its white fill alone would be 805 MB
    path = write_tiff(tmp_path / "big.tif", [rgb_tags(100, 100, 16384, 16384, [8], [0])])
    with pytest.raises(SlideError, match=r"big.tif: level 0: one tile of 16384x16384 px holds 805306368 bytes "
                                         r"uncompressed \(over 256 MiB\): this layout is not supported"):
        TiffSlide(path)


def test_one_big_strip_is_decoded_once_for_a_thumbnail(tmp_path, monkeypatch):
    from proalign.decode import cpu

    w, h = 64, 3000  # three thumbnail bands of 1024 rows, all in one strip
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = (np.arange(h) % 251)[:, None]
    strip = zlib.compress(rgb.tobytes())
    path = write_tiff(tmp_path / "strip.tif", [rgb_tags(w, h, w, h, [8], [len(strip)], compression=8, tiled=False)],
                      strip)
    calls = []
    decode = cpu.decode_tile
    monkeypatch.setattr(cpu, "decode_tile", lambda data, fmt: calls.append(1) or decode(data, fmt))
    s = open_slide(path)
    thumb = s.get_thumbnail(4096)
    assert len(calls) == 1
    np.testing.assert_array_equal(thumb, rgb)


def test_read_region_decodes_in_bounded_chunks_and_skips_empty_tiles(tmp_path, monkeypatch):
    import proalign.slides.slide as slide_mod

    rgb = np.random.default_rng(1).integers(0, 255, (16, 4096, 3), dtype=np.uint8)
    tiles = [zlib.compress(rgb[:, x:x + 16].tobytes()) for x in range(0, 4096, 16)]
    tiles[5] = b""  # left out by the writer: white
    path = tiled_slide(tmp_path / "wide.tif", w=4096, h=16, tiles=tiles, compression=8)
    monkeypatch.setattr(slide_mod, "_DECODE_CHUNK_BYTES", 10 * 16 * 16 * 3)
    s = open_slide(path)
    batches = []
    decode = s.decoder.decode
    monkeypatch.setattr(s.decoder, "decode", lambda data, fmt: batches.append(len(data)) or decode(data, fmt))
    got = s.read_region((0, 0), 0, (4096, 16))
    want = rgb.copy()
    want[:, 80:96] = 255
    np.testing.assert_array_equal(got, want)
    assert max(batches) == 10 and sum(batches) == 255  # 26 chunks, the empty tile never decoded


# --- item 5: decompression bombs ---------------------------------------------------------------------

@pytest.mark.parametrize("codec,compression,encode", [("deflate", 8, zlib.compress),
                                                      ("lzw", 5, imagecodecs.lzw_encode)])
def test_decompression_bombs_stop_at_the_tile_size(codec, compression, encode):
    fmt = TileFormat(codec, compression, 2, 64, 64)
    bomb = encode(b"\0" * (64 << 20))  # 64 MiB from a tile of 12,288 raw bytes
    with pytest.raises(TileDecodeError, match="expand|inflate"):
        decode_tile(bomb, fmt)
    exact = encode(bytes(range(256)) * 48)  # exactly one tile still decodes
    assert decode_tile(exact, fmt).shape == (64, 64, 3)


def test_truncated_deflate_is_still_an_error():
    fmt = TileFormat("deflate", 8, 2, 64, 64)
    with pytest.raises(TileDecodeError, match="truncated"):
        decode_tile(zlib.compress(np.random.default_rng(0).bytes(64 * 64 * 3))[:-100], fmt)


def test_deflate_bomb_in_a_slide(tmp_path):
    bomb = zlib.compress(b"\0" * (32 << 20))
    path = tiled_slide(tmp_path / "bomb.tif", w=16, h=16, tiles=[bomb], compression=8)
    with pytest.raises(SlideError, match=r"bomb.tif: level 0 tile \(col 0, row 0\) does not decode: Deflate data "
                                         r"inflate to more than the tile's 768 bytes"):
        open_slide(path).read_region((0, 0), 0, (16, 16))


# --- item 6: JPEG / JPEG 2000 frames of the wrong size -----------------------------------------------

def _jpeg(w, h, claim=None) -> bytes:
    j = bytearray(imagecodecs.jpeg8_encode(np.full((h, w, 3), 180, np.uint8)))
    if claim:
        sof = j.find(b"\xff\xc0")
        struct.pack_into(">HH", j, sof + 5, claim[1], claim[0])
    return bytes(j)


@pytest.mark.parametrize("jpeg,size", [(_jpeg(64, 64), "64x64"), (_jpeg(256, 256, claim=(30000, 30000)), "30000x30000")])
def test_jpeg_tiles_of_the_wrong_size(tmp_path, jpeg, size):
    path = tiled_slide(tmp_path / "j.tif", w=256, h=256, t=256, tiles=[jpeg], compression=7)
    message = rf"j.tif: level 0 tile \(col 0, row 0\) does not decode: JPEG frame is {size} px but the tile is 256x256"
    s = open_slide(path)
    with pytest.raises(SlideError, match=message):
        s.read_region((0, 0), 0, (256, 256))
    from proalign.slides.patches import read_patches
    with pytest.raises(SlideError, match=message):
        read_patches(s, np.array([[0, 0]]), 256, 224)
    with pytest.raises(SlideError, match=message):  # the engine's libjpeg, at half size (shrink on load)
        read_patches(s, np.array([[0, 0]]), 256, 64, shrink_on_load=True)


def test_jpeg_frame_size_rules_python_and_engine():
    tile = TileFormat("jpeg", 7, 6, 64, 16)
    strip = TileFormat("jpeg", 7, 6, 64, 16, tiled=False)
    short = _jpeg(64, 8)
    assert decode_tile(short, strip).shape == (8, 64, 3)  # the last strip of an image may be shorter
    with pytest.raises(TileDecodeError, match="JPEG frame is 64x8 px but the tile is 64x16 px"):
        decode_tile(short, tile)
    with pytest.raises(TileDecodeError, match="no JPEG frame header"):
        decode_tile(b"\xff\xd8\xff\xd9", tile)
    if native_jpeg_available():
        from proalign.decode.cpu import NativeJpegDecoder
        dec = NativeJpegDecoder(scale=2, threads=2)
        assert dec.decode([short], strip)[0].shape == (4, 32, 3)
        with pytest.raises(TileDecodeError, match="JPEG frame is 64x8 px but the tile is 64x16 px"):
            dec.decode([_jpeg(64, 16), short], tile)
        with pytest.raises(TileDecodeError, match="JPEG frame is 30000x30000 px"):
            dec.decode([_jpeg(64, 16, claim=(30000, 30000))], tile)
        dec.close()


def test_jpeg2000_frame_of_the_wrong_size():
    j2k = imagecodecs.jpeg2k_encode(np.full((64, 64, 3), 90, np.uint8), codecformat="J2K")
    assert decode_tile(j2k, TileFormat("jpeg2000", 33005, 2, 64, 64)).shape == (64, 64, 3)
    with pytest.raises(TileDecodeError, match="JPEG 2000 frame is 64x64 px but the tile is 128x128 px"):
        decode_tile(j2k, TileFormat("jpeg2000", 33005, 2, 128, 128))


def test_cpu_decoder_names_the_bad_tile_and_is_a_proalign_error():
    fmt = TileFormat("jpeg", 7, 6, 64, 64)
    with pytest.raises(TileDecodeError) as e:
        CpuDecoder(threads=2).decode([_jpeg(64, 64), _jpeg(32, 32)], fmt)
    assert e.value.position == 1 and isinstance(e.value, ProAlignError)


# --- item 7: implausible resolution metadata; absurd grids -------------------------------------------

def _svs(path, description):
    return tiled_slide(path, w=512, h=512, t=256, edit=set_tag(270, 2, "Aperio Image Library v1|" + description))


@pytest.mark.parametrize("description,mpp,mag", [
    ("AppMag = 20|MPP = 0.5", 0.5, 20.0),
    ("MPP = 1e-300", None, None),
    ("MPP = 5000", None, None),
    ("AppMag = 0.02|MPP = 0.25", 0.25, None),
    ("AppMag = 1e-300|MPP = 0.25", 0.25, None),
    ("AppMag = 40|MPP = 2.0", 2.0, None),  # they disagree 8-fold: the mpp wins
])
def test_implausible_resolution_metadata_counts_as_missing(tmp_path, description, mpp, mag):
    s = open_slide(_svs(tmp_path / "s.svs", description))
    assert (s.mpp, s.objective_power) == (mpp, mag)


def test_implausible_mpp_gives_the_usual_hint(tmp_path):
    path = _svs(tmp_path / "s.svs", "MPP = 1e-300")
    with pytest.raises(SlideError, match=r"s.svs: the slide has no mpp .*metadata mpp '1e-300' ignored.*--slide-mpp"):
        patch_slide(path, target_mpp=0.5, min_tissue=0.0)


def test_absurd_grids_are_refused():
    with pytest.raises(GridError, match="covers 4 level-0 px"):
        patch_grid(None, None, (1000, 1000), patch_size=4, target_mpp=0.25, slide_mpp=0.25)
    with pytest.raises(GridError, match="16000000 patch positions"):
        patch_grid(None, None, (40000, 40000), patch_size=10, target_mpp=0.25, slide_mpp=0.25)
    with pytest.raises(GridError, match="covers"):  # an mpp of 1e-300 used to overflow
        patch_grid(None, None, (1000, 1000), patch_size=256, target_mpp=0.5, slide_mpp=1e-300)


# --- a bad slide in a `patch` run ----------------------------------------------------------------------

def test_patch_cli_skips_a_corrupt_slide_and_writes_the_next(tmp_path):
    bad = tiled_slide(tmp_path / "bad.tif", edit=set_tag(256, 4, [0]))
    good = _svs(tmp_path / "good.svs", "AppMag = 20|MPP = 0.5")
    r = run_cli("patch", bad, good, "--mpp", "0.5", "--patch-size", "64", "--min-tissue", "0",
                "--out", tmp_path / "job")
    assert r.returncode == 1
    assert "FAILED: " in r.stderr and "bad.tif" in r.stderr and "ImageWidth 0 is out of range" in r.stderr
    assert "1 of 2 slides failed" in r.stderr
    assert (tmp_path / "job" / "20x_64px_0px_overlap" / "patches" / "good_patches.h5").is_file()


def test_patch_cli_survives_an_unexpected_error(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from proalign.cli import main
    from proalign.slides import patching

    good = _svs(tmp_path / "good.svs", "AppMag = 20|MPP = 0.5")
    real = patching.patch_slide

    def flaky(path, **kw):
        if path.name == "first.svs":
            raise RuntimeError("a reader bug")
        return real(path, **kw)
    monkeypatch.setattr(patching, "patch_slide", flaky)
    first = tmp_path / "first.svs"
    first.write_bytes(good.read_bytes())
    r = CliRunner().invoke(main, ["patch", str(first), str(good), "--mpp", "0.5", "--patch-size", "64",
                                  "--min-tissue", "0", "--out", str(tmp_path / "job")])
    assert r.exit_code == 1, r.output
    assert "first.svs: unexpected RuntimeError: a reader bug" in r.output
    assert (tmp_path / "job" / "20x_64px_0px_overlap" / "patches" / "good_patches.h5").is_file()


@pytest.mark.optional
def test_dali_refuses_a_jpeg_frame_of_the_wrong_size_before_decoding():
    """The DALI decoder (its CPU backend here; the GPU one shares the check) applies the same rule."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from proalign.decode.dali_decode import DaliDecoder

    tile = TileFormat("jpeg", 7, 6, 64, 16)
    dec = DaliDecoder(device="cpu", max_batch=4)
    try:
        good = dec.decode([_jpeg(64, 16)], tile)
        assert tuple(good[0].shape) == (16, 64, 3)
        with pytest.raises(TileDecodeError, match=r"tile 1 of the batch: JPEG frame is 30000x30000 px"):
            dec.decode([_jpeg(64, 16), _jpeg(64, 16, claim=(30000, 30000))], tile)
    finally:
        dec.close()
