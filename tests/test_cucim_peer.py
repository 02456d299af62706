"""cuCIM's CPU reader (the patch benchmark's second peer) gives our reader's pixels on generated
slides. Skips with the reason when cucim does not import (CI installs it with --no-deps: .ci/run)."""
from __future__ import annotations

import numpy as np
import pytest

from proalign.bench.cucim_peer import cucim_missing

pytestmark = pytest.mark.skipif(cucim_missing() is not None, reason=str(cucim_missing()))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from proalign.testing.synthetic_slides import write_aperio_svs, write_pyramidal_tiff

    d = tmp_path_factory.mktemp("cucim")
    svs, tif = d / "a.svs", d / "g.tif"
    write_aperio_svs(svs, 1061, 811, levels=(1, 4), seed=3)  # odd sides: partial edge tiles
    write_pyramidal_tiff(tif, 1061, 811, levels=(1, 4), seed=3)  # JPEG YCbCr 4:2:0, tables in JPEGTables
    return {"svs": svs, "tif": tif}


@pytest.mark.parametrize("kind", ["svs", "tif"])
def test_cucim_level0_pixels_equal_ours(slides, kind):
    from cucim import CuImage

    from proalign.bench.cucim_peer import iter_regions, read_region
    from proalign.slides.slide import open_slide

    path = slides[kind]
    ours, img = open_slide(path), CuImage(str(path))
    w, h = ours.levels[0]
    coords = np.array([(x, y) for y in range(0, h - 256, 200) for x in range(0, w - 256, 200)])
    theirs = np.concatenate(list(iter_regions(img, coords, 0, 256, workers=2, batch_size=8)))
    mine = np.stack([ours.read_region(tuple(xy), 0, (256, 256)) for xy in coords])
    assert theirs.shape == mine.shape and theirs.dtype == np.uint8
    assert np.array_equal(theirs, mine)
    one = read_region(img, (w - 100, h - 90), 0, (100, 90))  # the last partial tile
    assert np.array_equal(one, ours.read_region((w - 100, h - 90), 0, (100, 90)))


def test_cucim_agreement_report(slides):
    """The benchmark's check: decoded pixels equal ours on every level once aligned; at a level
    whose downsample is fractional (1061 / 265) cuCIM's origin may sit one level pixel off."""
    from proalign.bench.cucim_peer import agreement
    from proalign.slides.slide import open_slide

    slide = open_slide(slides["svs"])

    class Grid:  # a grid of 3 patches at level 0, read 256 -> 224 as the benchmark does
        coords = np.array([[0, 0], [256, 256], [512, 300]])
        level, read_size, patch_size_level0 = 0, 256, 256

    a = agreement(str(slides["svs"]), slide, Grid(), 224, n=16)
    assert a["grid_region"]["max"] == 0 and a["grid_patch"]["max"] == 0
    for lv in a["levels"].values():
        assert lv["aligned_max"] == 0, lv
        assert lv["edge"] == "white (as ours)"
