"""Quality control: the QC picture, tissue contours as QuPath GeoJSON, reusing (edited) contours
with --tissue-geojson, and patch --dump-patches (slides/contours.py, slides/qc.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from test_encoders import conch_folder, conch_tokenizer_file  # noqa: F401 (pytest fixtures)

from proalign.cli import main
from proalign.slides.contours import TissueGeoJSONError, mask_polygons, read_tissue_geojson, write_tissue_geojson
from proalign.slides.coords_io import read_coords_h5
from proalign.testing.synthetic_slides import write_aperio_svs

W, H = 4000, 3000


@pytest.fixture(scope="module")
def qc_run(tmp_path_factory):
    """The demo's first slide (pen strokes) through `patch --qc --dump-patches 5`."""
    d = tmp_path_factory.mktemp("qc")
    slide = d / "DEMO-00.svs"
    write_aperio_svs(slide, W, H, tile=256, levels=(1, 4), seed=0, mpp=0.5, app_mag=20, pen_marks=True)
    res = CliRunner().invoke(main, ["patch", str(slide), "--out", str(d / "job"), "--patch-size", "128",
                                    "--qc", str(d / "qc"), "--dump-patches", "5"])
    assert res.exit_code == 0, res.output
    return d, slide, read_coords_h5(d / "job" / "20x_128px_0px_overlap" / "patches" / "DEMO-00_patches.h5")


def rerun(d, slide, geojson_dir, out):
    res = CliRunner().invoke(main, ["patch", str(slide), "--out", str(d / out), "--patch-size", "128",
                                    "--tissue-geojson", str(geojson_dir)])
    return res, (read_coords_h5(d / out) if res.exit_code == 0 else None)


def centres(grid):
    return grid.coords + grid.patch_size_level0 / 2


def test_qc_files_and_geojson_structure(qc_run):
    d, _, grid = qc_run
    pic = Image.open(d / "qc" / "DEMO-00.png")
    assert pic.format == "PNG" and pic.mode == "RGB" and max(pic.size) == 2048
    a = np.asarray(pic)
    assert np.all(a == (0, 190, 0), axis=-1).sum() > 500  # tissue outlines
    assert np.all(a == (255, 200, 0), axis=-1).sum() > 500  # the patch grid
    assert np.all(a == (220, 0, 220), axis=-1).sum() > 200  # excluded (pen) outlines
    dumped = sorted((d / "qc" / "DEMO-00_patches").glob("*.png"))
    assert len(dumped) == 5
    for p in dumped:
        im = Image.open(p)
        assert im.size == (128, 128)
        i, xs, ys = p.stem.split("_")
        assert tuple(grid.coords[int(i)]) == (int(xs[1:]), int(ys[1:]))

    gj = json.loads((d / "qc" / "DEMO-00.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    names = set()
    for f in gj["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert f["properties"]["objectType"] == "annotation"
        names.add(f["properties"]["classification"]["name"])
        for ring in f["geometry"]["coordinates"]:
            r = np.asarray(ring, float)
            assert r.shape[0] >= 4 and r.shape[1] == 2 and np.array_equal(r[0], r[-1])
            assert r[:, 0].min() >= -1 and r[:, 0].max() <= W + 1  # level-0 pixels
            assert r[:, 1].min() >= -1 and r[:, 1].max() <= H + 1
    assert names == {"Tissue", "Artifact"}
    tissue = [f for f in gj["features"] if f["properties"]["classification"]["name"] == "Tissue"]
    # every patch (>= 10% tissue) overlaps a Tissue polygon's bounding box
    boxes = [np.r_[np.min(f["geometry"]["coordinates"][0], 0), np.max(f["geometry"]["coordinates"][0], 0)]
             for f in tissue]
    s = grid.patch_size_level0
    for x, y in grid.coords.tolist():
        assert any(b[0] < x + s and x < b[2] and b[1] < y + s and y < b[3] for b in boxes)


def test_unedited_geojson_gives_the_same_grid(qc_run):
    d, slide, grid = qc_run
    res, again = rerun(d, slide, d / "qc", "same.h5")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(again.coords, grid.coords)


def _largest_tissue(gj):
    tissue = [f for f in gj["features"] if f["properties"]["classification"]["name"] == "Tissue"]
    return max(tissue, key=lambda f: len(f["geometry"]["coordinates"][0]))


def test_removed_region_loses_its_patches(qc_run, tmp_path):
    d, slide, grid = qc_run
    gj = json.loads((d / "qc" / "DEMO-00.geojson").read_text())
    gone = _largest_tissue(gj)
    gj["features"] = [f for f in gj["features"] if f is not gone]
    (tmp_path / "DEMO-00.geojson").write_text(json.dumps(gj))
    res, edited = rerun(d, slide, tmp_path, "removed.h5")
    assert res.exit_code == 0, res.output
    x0, y0 = np.min(gone["geometry"]["coordinates"][0], 0)
    x1, y1 = np.max(gone["geometry"]["coordinates"][0], 0)
    s = grid.patch_size_level0
    c = grid.coords
    touches = (c[:, 0] < x1) & (c[:, 0] + s > x0) & (c[:, 1] < y1) & (c[:, 1] + s > y0)
    before, after = {tuple(v) for v in c.tolist()}, {tuple(v) for v in edited.coords.tolist()}
    assert after <= before
    assert {tuple(v) for v in c[~touches].tolist()} <= after  # the rest of the slide is untouched
    assert len(before - after) >= 10
    inside = (c[:, 0] >= x0) & (c[:, 0] + s <= x1) & (c[:, 1] >= y0) & (c[:, 1] + s <= y1)
    assert inside.sum() > 5 and not ({tuple(v) for v in c[inside].tolist()} & after)


def test_cut_hole_is_respected(qc_run, tmp_path):
    d, slide, grid = qc_run
    s = grid.patch_size_level0
    have = {tuple(c) for c in grid.coords.tolist()}
    # a patch whose 3 x 3 neighbourhood is all in the grid: cut a square hole of 2.6 patches around it
    x, y = next((x, y) for x, y in grid.coords.tolist()
                if all((x + i * s, y + j * s) in have for i in range(-1, 2) for j in range(-1, 2)))
    cx, cy, half = x + s / 2, y + s / 2, 1.3 * s
    hole = [[cx - half, cy - half], [cx - half, cy + half], [cx + half, cy + half], [cx + half, cy - half],
            [cx - half, cy - half]]
    gj = json.loads((d / "qc" / "DEMO-00.geojson").read_text())
    tissue = [f for f in gj["features"] if f["properties"]["classification"]["name"] == "Tissue"]
    host = next(f for f in tissue if _contains(f, cx, cy))
    host["geometry"]["coordinates"].append(hole)
    (tmp_path / "DEMO-00.geojson").write_text(json.dumps(gj))
    res, edited = rerun(d, slide, tmp_path, "hole.h5")
    assert res.exit_code == 0, res.output
    c = centres(edited)
    in_hole = (np.abs(c[:, 0] - cx) < half) & (np.abs(c[:, 1] - cy) < half)
    assert not in_hole.any()  # no patch centred in the hole (even where its tissue fraction passes)
    # patches clear of the hole are untouched; the 3 x 3 centred in it are gone
    near = (np.abs(centres(grid)[:, 0] - cx) < half + s) & (np.abs(centres(grid)[:, 1] - cy) < half + s)
    far = {tuple(v) for v in grid.coords[~near].tolist()}
    got = {tuple(v) for v in edited.coords.tolist()}
    assert far <= got
    assert len(grid) - len(edited) >= 9


def _contains(feature, x, y):
    """Even-odd test of (x, y) against a Polygon feature's rings."""
    inside = False
    for ring in feature["geometry"]["coordinates"]:
        r = np.asarray(ring, float)
        x1, y1, x2, y2 = r[:-1, 0], r[:-1, 1], r[1:, 0], r[1:, 1]
        cross = ((y1 > y) != (y2 > y)) & (x < x1 + (y - y1) * (x2 - x1) / np.where(y2 != y1, y2 - y1, 1))
        inside ^= bool(cross.sum() % 2)
    return inside


@pytest.mark.parametrize("text, what", [("{not json", "not valid JSON"),
                                        ('{"type": "FeatureCollection"}', "features"),
                                        ('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                                         '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}}]}',
                                         "feature 0"),
                                        ('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                                         '"geometry": {"type": "Circle", "coordinates": [1, 2]}}]}', "Circle")])
def test_malformed_geojson_is_a_clear_error(qc_run, tmp_path, text, what):
    d, slide, _ = qc_run
    bad = tmp_path / "DEMO-00.geojson"
    bad.write_text(text)
    res, _ = rerun(d, slide, tmp_path, "bad.h5")
    assert res.exit_code == 1
    assert str(bad) in res.output and what in res.output, res.output


def test_missing_geojson_names_the_file(qc_run, tmp_path):
    d, slide, _ = qc_run
    res, _ = rerun(d, slide, tmp_path, "none.h5")
    assert res.exit_code == 1 and "DEMO-00.geojson" in res.output


def test_mask_geojson_round_trip_is_exact(tmp_path, rng):
    import scipy.ndimage as ndi

    n_holes = 0
    for k in range(4):
        m = ndi.gaussian_filter(rng.random((61, 83)), 2.5) > 0.5
        n_holes += sum(len(rings) - 1 for rings in mask_polygons(m, (3.0, 2.5)))
        m[0, :] = True  # touching the border
        ex = ndi.gaussian_filter(rng.random((61, 83)), 2.5) > 0.6
        p = write_tissue_geojson(tmp_path / f"{k}.geojson", m, (3.0, 2.5), ex)
        t, e, holes = read_tissue_geojson(p, m.shape, (3.0, 2.5))
        np.testing.assert_array_equal(t, m)
        np.testing.assert_array_equal(e, ex)
        assert not (holes & m).any()
    assert n_holes > 0  # holes come out as interior rings and are read back as holes
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    (polygon,) = mask_polygons(ring, (1.0, 1.0))
    assert len(polygon) == 2  # exterior + one hole
    assert mask_polygons(np.zeros((5, 5), bool), (1.0, 1.0)) == []
    # QuPath's older export: a bare list of features; MultiPolygon; a point (no area) skipped
    sq = [[[0, 0], [30, 0], [30, 25], [0, 25], [0, 0]]]
    (tmp_path / "list.geojson").write_text(json.dumps([
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [sq]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}]))
    t, e, _ = read_tissue_geojson(tmp_path / "list.geojson", (20, 20), (3.0, 2.5))
    assert t[:10, :10].all() and t.sum() == 100 and not e.any()
    with pytest.raises(TissueGeoJSONError, match="list.geojson"):
        (tmp_path / "list.geojson").write_text("[1]")
        read_tissue_geojson(tmp_path / "list.geojson", (20, 20), (3.0, 2.5))


def test_embed_slide_writes_qc(qc_run, conch_folder, tmp_path, rng):
    from proalign.encoders import create_encoder
    from proalign.pipeline.embed_slides import SlideOptions, embed_slide

    d, slide, _ = qc_run
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    c = rng.normal(size=(4, enc.feature_dim)).astype(np.float32)
    opts = SlideOptions(magnification=20, patch_size=256, qc_dir=str(tmp_path / "qc"))
    res = embed_slide(slide, enc, c, method="mean", options=opts)
    assert (tmp_path / "qc" / "DEMO-00.png").is_file() and (tmp_path / "qc" / "DEMO-00.geojson").is_file()
    again = embed_slide(slide, enc, c, method="mean",
                        options=SlideOptions(magnification=20, patch_size=256, tissue_geojson=str(tmp_path / "qc")))
    np.testing.assert_array_equal(again.grid.coords, res.grid.coords)
    assert SlideOptions(keep_penmarks=True, tissue_geojson="x").key("e")["keep_penmarks"] is True
    assert SlideOptions().key("e")["keep_penmarks"] is False
