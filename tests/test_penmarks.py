"""Pen marks and blank/blurred tissue out of the patch grid (slides/tissue.py step 8, the grid's
max_excluded rule), on generated slides whose writer knows where it drew the ink."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from click.testing import CliRunner

from proalign.cli import main
from proalign.slides.coords_io import read_coords_h5
from proalign.slides.patching import patch_slide
from proalign.testing.synthetic_slides import synthetic_slide, write_aperio_svs


def ink_fractions(pen: np.ndarray, grid) -> np.ndarray:
    s = grid.patch_size_level0
    return np.array([pen[y:y + s, x:x + s].mean() for x, y in grid.coords.tolist()])


def coord_set(grid) -> set:
    return {tuple(c) for c in grid.coords.tolist()}


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory):
    """The demo's first slide (demo.py: 4000 x 3000, 20x, seed 0, green/blue/red strokes)."""
    p = tmp_path_factory.mktemp("pen") / "DEMO-00.svs"
    info = write_aperio_svs(p, 4000, 3000, tile=256, levels=(1, 4), seed=0, mpp=0.5, app_mag=20, pen_marks=True)
    return p, info["slide"].pen_mask()


@pytest.mark.parametrize("patch_size", [128, 256])
def test_demo_slide_ink_leaves_the_grid_tissue_stays(demo_slide, patch_size):
    path, pen = demo_slide
    assert 0.01 < pen.mean() < 0.1
    _, kept = patch_slide(path, patch_size=patch_size, target_magnification=20, keep_penmarks=True)
    _, grid = patch_slide(path, patch_size=patch_size, target_magnification=20)
    before, after = ink_fractions(pen, kept), ink_fractions(pen, grid)
    # before: the tissue beside a stroke thinner than a patch keeps the patches under the ink
    # (measured: 21% of 128 px patches and 30% of 256 px patches have more than 1% ink)
    assert (before > 0.01).mean() > 0.15
    assert (after > 0.01).mean() < 0.05, (after > 0.01).mean()
    assert after.max() <= 0.08  # the grid's 5% rule, on a mask at thumbnail resolution
    # the tissue away from the ink stays: every clean patch of the old grid but a few at a stroke's fringe
    clean = {tuple(c) for c, f in zip(kept.coords.tolist(), before) if f == 0}
    assert len(clean - coord_set(grid)) <= 0.03 * len(clean)
    assert coord_set(grid) <= coord_set(kept)


def test_black_and_green_ink(tmp_path):
    p = tmp_path / "pens.svs"
    info = write_aperio_svs(p, 3000, 2200, tile=256, levels=(1, 4), seed=7, mpp=0.5, app_mag=20,
                            pen_marks=["black", "green"])
    pen = info["slide"].pen_mask()
    _, kept = patch_slide(p, patch_size=128, target_magnification=20, keep_penmarks=True)
    _, grid = patch_slide(p, patch_size=128, target_magnification=20)
    assert (ink_fractions(pen, kept) > 0.01).mean() > 0.1
    assert (ink_fractions(pen, grid) > 0.01).mean() < 0.05


@pytest.mark.parametrize("kw", [dict(seed=1), dict(seed=3), dict(seed=4, tissue="dense"),
                                dict(seed=5, tissue="sparse"), dict(seed=6, compression="jpeg2000")])
def test_clean_he_slides_lose_nothing(tmp_path, kw):
    p = tmp_path / "clean.svs"
    write_aperio_svs(p, 3000, 2200, tile=256, levels=(1, 4), mpp=0.5, app_mag=20, **kw)
    _, kept = patch_slide(p, patch_size=128, target_magnification=20, keep_penmarks=True)
    _, grid = patch_slide(p, patch_size=128, target_magnification=20)
    assert len(kept) > 20
    assert coord_set(grid) == coord_set(kept)


def test_blurred_region_is_excluded(tmp_path):
    # a generated slide with one of its tissue pieces out of focus (a strong blur)
    s = synthetic_slide(3000, 2200, tile=256, seed=2, mpp=0.5)
    img = s.level0().copy()
    boxes = s.tissue_boxes
    assert len(boxes) >= 2
    x0, y0, x1, y1 = boxes[0]
    img[y0:y1, x0:x1] = ndi.gaussian_filter(img[y0:y1, x0:x1], sigma=(12, 12, 0), mode="nearest")
    p = tmp_path / "blur.svs"
    write_aperio_svs(p, 3000, 2200, tile=256, levels=(1, 4), mpp=0.5, app_mag=20, image=img)
    _, kept = patch_slide(p, patch_size=128, target_magnification=20, keep_penmarks=True)
    _, grid = patch_slide(p, patch_size=128, target_magnification=20)

    def inside(g, box):
        bx0, by0, bx1, by1 = box
        c = g.coords + g.patch_size_level0 // 2
        return int(((c[:, 0] >= bx0) & (c[:, 0] < bx1) & (c[:, 1] >= by0) & (c[:, 1] < by1)).sum())

    assert inside(kept, boxes[0]) > 5
    assert inside(grid, boxes[0]) <= 0.2 * inside(kept, boxes[0])
    for b in boxes[1:]:  # the pieces in focus keep every patch
        assert inside(grid, b) == inside(kept, b)


def test_cli_keep_penmarks(demo_slide, tmp_path):
    path, _ = demo_slide
    r = CliRunner()
    for flag, out in (([], "a.h5"), (["--keep-penmarks"], "b.h5")):
        res = r.invoke(main, ["patch", str(path), "--out", str(tmp_path / out), "--patch-size", "128", *flag])
        assert res.exit_code == 0, res.output
    assert len(read_coords_h5(tmp_path / "a.h5")) < len(read_coords_h5(tmp_path / "b.h5"))


def test_max_excluded_is_checked():
    from proalign.slides.grid import patch_grid

    m = np.ones((10, 10), bool)
    with pytest.raises(ValueError, match="max_excluded"):
        patch_grid(m, (100.0, 100.0), (1000, 1000), patch_size=64, target_mpp=0.5, slide_mpp=0.5,
                   exclude=m, max_excluded=1.5)


def _strip_penmark_option(store_path) -> None:
    """Rewrite every record as a version before pen-mark exclusion wrote it: no keep_penmarks."""
    from proalign import open_store

    with open_store(store_path, write=True) as s:
        for sid in list(s):
            rec = s.record(sid)
            opts, slide_opts = ({k: v for k, v in rec.meta[name].items() if k != "keep_penmarks"}
                                for name in ("options", "slide_options"))
            s.put(sid, rec.embedding, rec.n_patches, dict(rec.meta, options=opts, slide_options=slide_opts))


def _options(store_path) -> dict:
    from proalign import open_store

    with open_store(store_path) as s:
        return {sid: s.meta(sid)["options"] for sid in s}


def test_records_state_penmark_exclusion_and_old_stores_count_as_kept(tmp_path, cli, conch):
    """Every slide record says whether pen marks were excluded; a record without it (made before
    the exclusion existed) counts as keep_penmarks=True; a run with the other setting is refused,
    naming the option, before anything is embedded; old stores stay readable and resumable."""
    folder, _, ppath, _ = conch
    archive = tmp_path / "archive"
    archive.mkdir()
    write_aperio_svs(archive / "s0.svs", 1024, 768, tile=256, levels=(1, 4), seed=0, mpp=0.5, app_mag=20,
                     pen_marks=True)

    def embed(out, *flags, check):
        return cli("embed", "--archive", archive, "--encoder", "conch_v1", "--weights", folder, "--patch-size", 128,
                   "--mag", 20, "--prototypes", ppath, "--out", out, "--retries", 0, *flags, check=check)

    new = tmp_path / "new.lmdb"
    embed(new, check=0)
    assert [o["keep_penmarks"] for o in _options(new).values()] == [False]
    before = _options(new)
    r = embed(new, "--keep-penmarks", check=2)
    assert "keep_penmarks: False vs True" in r.stderr and "drop --keep-penmarks" in r.stderr, r.stderr
    assert _options(new) == before

    old = tmp_path / "old.lmdb"
    embed(old, "--keep-penmarks", check=0)
    assert [o["keep_penmarks"] for o in _options(old).values()] == [True]
    _strip_penmark_option(old)
    r = cli("store", "show", old, "s0", check=0)  # readable as it is
    assert "keep_penmarks" not in r.stdout
    assert "0 embedded, 1 already stored" in embed(old, "--keep-penmarks", check=0).stdout
    # appending a slide with exclusion on (the default) to the old store: refused, nothing written
    write_aperio_svs(archive / "s1.svs", 1024, 768, tile=256, levels=(1, 4), seed=1, mpp=0.5, app_mag=20)
    r = embed(old, check=2)
    assert "keep_penmarks: True vs False" in r.stderr and "add --keep-penmarks" in r.stderr, r.stderr
    assert sorted(_options(old)) == ["s0"]
    r = embed(old, "--keep-penmarks", check=0)
    assert "1 embedded, 1 already stored" in r.stdout
    assert _options(old)["s1"]["keep_penmarks"] is True and "keep_penmarks" not in _options(old)["s0"]
    # and the two stores cannot be merged: the message names the option
    r = cli("store", "merge", tmp_path / "all.lmdb", new, old, check=None)
    assert r.returncode == 2 and "keep_penmarks: False vs True" in r.stderr, r.stderr


def test_slide_options_key_states_penmarks():
    from proalign.pipeline.embed_slides import SlideOptions
    from proalign.store import normalise_options

    assert SlideOptions().key("e")["keep_penmarks"] is False
    assert SlideOptions(keep_penmarks=True).key("e")["keep_penmarks"] is True
    assert SlideOptions(coords_dir="c").key("e")["keep_penmarks"] is True  # a given grid: nothing excluded
    legacy = {k: v for k, v in SlideOptions().key("e").items() if k != "keep_penmarks"}
    assert normalise_options(legacy)["keep_penmarks"] is True
    assert "keep_penmarks" not in normalise_options({"method": "mean", "dtype": "float16"})  # a features record


def test_records_of_the_first_penmark_version_read_from_their_slide_options():
    """The version that added pen-mark exclusion put keep_penmarks in `options` only when true, but
    its records' `slide_options` hold every field: those records read as what they were made with."""
    from dataclasses import asdict

    from proalign.pipeline.embed_slides import SlideOptions
    from proalign.store import normalise_options

    legacy = {k: v for k, v in SlideOptions().key("e").items() if k != "keep_penmarks"}
    assert normalise_options(legacy, asdict(SlideOptions()))["keep_penmarks"] is False
    assert normalise_options(legacy, asdict(SlideOptions(keep_penmarks=True)))["keep_penmarks"] is True
    before = {k: v for k, v in asdict(SlideOptions()).items() if k != "keep_penmarks"}  # before the rule
    assert normalise_options(legacy, before)["keep_penmarks"] is True
    assert normalise_options({**legacy, "coords": True}, asdict(SlideOptions()))["keep_penmarks"] is True
