"""TRIDENT-compatible outputs (issue 16, item 2): `patch --layout trident`, `embed --save-features
--layout trident`, `--edge-fill black|white`, `--grid-preset trident`.

The files are read back here the way TRIDENT's own code reads them, written from its conventions
(not from its code): folders `<job>/<mag>x_<patch>px_<overlap>px_overlap/patches/<slide>_patches.h5`
and `.../features_<encoder>/<slide>.h5`; `coords` (n, 2) int64 with attributes patch_size (int),
patch_size_level0 (float: its CLI's --mag is a float), level0_magnification (int),
target_magnification (float), overlap (int), name, savetodir (str), level0_width/height (int);
`features` (n, d) float32 with attributes encoder, name, savetodir, beside a copy of `coords` with
the coords file's attributes; the level-0 patch size recomputed as patch_size * level0_mag /
target_mag, as TRIDENT's readers do when they use the magnifications."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import run_cli

from proalign import open_store
from proalign.slides.patches import read_patches
from proalign.encoders import create_encoder
from proalign.features import list_feature_files
from proalign.features.io import read_features
from proalign.pipeline.embed_slides import SlideOptions, embed_slide, find_coords
from proalign.slides.coords_io import read_coords_h5, trident_job_name
from proalign.slides.slide import open_slide
from proalign.testing.synthetic_features import write_cohort
from proalign.testing.synthetic_slides import write_aperio_svs

W, H = 1000, 900  # not multiples of the 128 px patches: the pad grid has partial edge patches
JOB = "20x_128px_0px_overlap"


def _slide(path: Path, seed: int) -> Path:
    write_aperio_svs(path, W, H, tile=256, levels=(1, 4), seed=seed, tissue="dense", mpp=0.5, app_mag=20)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("archive")
    for i, sid in enumerate(("s0", "s1")):
        _slide(d / f"{sid}.svs", 20 + i)
    return d



def _attrs(ds: h5py.Dataset) -> dict:
    return {k: ds.attrs[k] for k in ds.attrs}


def check_trident_coords(ds: h5py.Dataset, name: str, savetodir: Path, width: int, height: int) -> None:
    """A `coords` dataset as TRIDENT writes it (names, dtypes) and its readers use it."""
    assert ds.dtype == np.int64 and ds.ndim == 2 and ds.shape[1] == 2 and ds.shape[0] > 0
    a = _attrs(ds)
    for k in ("patch_size", "overlap", "level0_width", "level0_height"):
        assert isinstance(a[k], np.integer) and a[k].dtype == np.int64, (k, type(a[k]))
    for k in ("patch_size_level0", "target_magnification"):
        assert isinstance(a[k], np.floating) and a[k].dtype == np.float64, (k, type(a[k]))
    assert isinstance(a["level0_magnification"], np.integer)
    assert isinstance(a["name"], str) and isinstance(a["savetodir"], str)
    assert a["patch_size"] == 128 and a["overlap"] == 0 and a["target_magnification"] == 20.0
    assert a["level0_magnification"] == 20 and a["name"] == name
    assert Path(a["savetodir"]) == savetodir
    assert (a["level0_width"], a["level0_height"]) == (width, height)
    # TRIDENT's readers: level-0 patch size from the magnifications, or the attribute cast to int
    assert int(a["patch_size_level0"]) == a["patch_size"] * a["level0_magnification"] // a["target_magnification"]
    c = ds[()]
    assert c.min() >= 0 and c[:, 0].max() < width and c[:, 1].max() < height


# --- patch -------------------------------------------------------------------------------------------

def test_patch_trident_layout_and_grid_preset(tmp_path, archive):
    slides = sorted(archive.glob("*.svs"))
    job = tmp_path / "job"
    r = run_cli("patch", *slides, "--mag", "20", "--patch-size", "128", "--grid-preset", "trident",
                "--out", job)  # --layout trident is the default
    assert r.returncode == 0, r.stderr
    assert not (job / "patches").exists()
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*.h5")) == \
        [f"{JOB}/patches/s0_patches.h5", f"{JOB}/patches/s1_patches.h5"]
    for s in slides:
        f = job / JOB / "patches" / f"{s.stem}_patches.h5"
        with h5py.File(f, "r") as h:
            assert list(h.keys()) == ["coords"]
            check_trident_coords(h["coords"], s.stem, job / JOB, W, H)
            c = h["coords"][()]
            assert h["coords"].attrs["edge"] == "pad" and h["coords"].attrs["min_tissue"] == 0.0
        # TRIDENT's grid keeps partial edge patches: corners inside, the patch reaching past the edge
        assert ((c[:, 0] + 128 > W) | (c[:, 1] + 128 > H)).any()
        assert ((c[:, 0] + 128 <= W) & (c[:, 1] + 128 <= H)).any()
        # and our own reader takes it back
        g = read_coords_h5(f, level_downsamples=[1.0, 4.0])
        assert np.array_equal(g.coords, c) and g.patch_size_level0 == 128 and g.edge == "pad"

    # --layout flat: OUT/patches/<slide>_patches.h5; the default grid: the inside rule, min tissue 0.1
    r = run_cli("patch", slides[0], "--mag", "20", "--patch-size", "128", "--layout", "flat",
                "--out", tmp_path / "flat")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "flat" / "patches" / "s0_patches.h5", "r") as h:
        check_trident_coords(h["coords"], "s0", tmp_path / "flat", W, H)
        a = _attrs(h["coords"])
        assert a["edge"] == "inside" and a["min_tissue"] == pytest.approx(0.1)
        c = h["coords"][()]
        assert ((c[:, 0] + 128 <= W) & (c[:, 1] + 128 <= H)).all()

    # an explicit option wins over the preset
    r = run_cli("patch", slides[0], "--mag", "20", "--patch-size", "128", "--grid-preset", "trident",
                "--min-tissue", "0.5", "--out", tmp_path / "m.h5")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "m.h5", "r") as h:
        assert h["coords"].attrs["edge"] == "pad" and h["coords"].attrs["min_tissue"] == 0.5

    # a single coords file has no job folders to lay out
    r = run_cli("patch", slides[0], "--layout", "trident", "--out", tmp_path / "one.h5")
    assert r.returncode == 2 and "--layout trident" in r.stderr


def test_trident_job_name():
    assert trident_job_name(20, 256, 0) == "20x_256px_0px_overlap"
    assert trident_job_name(20.0, 512, 32) == "20x_512px_32px_overlap"
    assert trident_job_name(2.5, 224, 0) == "2.5x_224px_0px_overlap"


# --- embed --save-features -----------------------------------------------------------------------------

def test_embed_save_features_trident_layout(tmp_path, archive, conch):
    weights, args, protos, over = conch
    job = tmp_path / "job"
    common = ("--encoder", "conch_v1", "--weights", weights, *args, "--patch-size", "128", "--mag", "20",
              "--prototypes", protos, "--dtype", "float32", "--retries", "0", "--no-progress")
    r = run_cli("embed", "--archive", archive, *common, "--out", tmp_path / "a.lmdb", "--save-features", job,
                "--grid-preset", "trident", "--edge-fill", "black")  # --layout trident is the default
    assert r.returncode == 0, r.stdout + r.stderr
    feats_dir = job / JOB / "features_conch_v1"
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*.h5")) == sorted(
        [f"{JOB}/features_conch_v1/s0.h5", f"{JOB}/features_conch_v1/s1.h5",
         f"{JOB}/patches/s0_patches.h5", f"{JOB}/patches/s1_patches.h5"])
    for sid in ("s0", "s1"):
        with h5py.File(feats_dir / f"{sid}.h5", "r") as f, \
                h5py.File(job / JOB / "patches" / f"{sid}_patches.h5", "r") as p:
            assert set(f.keys()) == {"features", "coords"}
            x = f["features"]
            assert x.dtype == np.float32 and x.ndim == 2 and x.shape[0] == f["coords"].shape[0]
            assert np.isfinite(x[()]).all() and x.shape[1] > 0
            fa = _attrs(x)
            assert fa["encoder"] == "conch_v1" and fa["name"] == sid and Path(fa["savetodir"]) == feats_dir
            assert all(isinstance(fa[k], str) for k in ("encoder", "name", "savetodir"))
            # the features file's coords: the coords file's, same rows, same attributes and dtypes
            check_trident_coords(f["coords"], sid, job / JOB, W, H)
            assert np.array_equal(f["coords"][()], p["coords"][()])
            ca, pa = _attrs(f["coords"]), _attrs(p["coords"])
            assert ca.keys() == pa.keys()
            for k in ca:
                assert ca[k] == pa[k] and type(ca[k]) is type(pa[k]), k
            assert pa["edge"] == "pad" and pa["min_tissue"] == 0.0
    # our reader records the encoder of our own files, and `embed --features` stores it; the job
    # folder itself is read through its one features folder (the coords files beside it are no features)
    ff = read_features(feats_dir / "s0.h5")
    assert ff.attrs["encoder"] == "conch_v1" and ff.source["encoder"] == "conch_v1"
    r = run_cli("embed", "--features", job, "--prototypes", protos, "--out", tmp_path / "f.lmdb",
                "--dtype", "float32", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count(f"reading the feature files in {feats_dir}") == 1, r.stderr
    with open_store(tmp_path / "f.lmdb") as s:
        assert sorted(s) == ["s0", "s1"] and s.meta("s0")["encoder"] == "conch_v1"
    with open_store(tmp_path / "a.lmdb") as s:
        assert s.meta("s0")["options"]["edge_fill"] == "black" and s.meta("s0")["options"]["edge"] == "pad"
    # `--coords JOB` finds the coords file inside TRIDENT's <mag>x_... folder
    assert find_coords(job, "s0") == job / JOB / "patches" / "s0_patches.h5"
    # the options belong to the slides path
    r = run_cli("embed", "--features", feats_dir, "--prototypes", protos, "--out", tmp_path / "g.lmdb",
                "--layout", "trident", "--no-progress")
    assert r.returncode == 2 and "--archive" in r.stderr
    # --layout flat: DIR/<slide>.h5, no coords files beside
    r = run_cli("embed", "--archive", archive, *common, "--out", tmp_path / "h.lmdb", "--save-features",
                tmp_path / "flat", "--layout", "flat")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "flat").rglob("*.h5")) == ["s0.h5", "s1.h5"]
    r = run_cli("embed", "--archive", archive, *common, "--out", tmp_path / "i.lmdb", "--layout", "flat")
    assert r.returncode == 2 and "give --save-features DIR" in r.stderr


def test_clam_coords_save_features_in_trident_folders(tmp_path, archive, conch):
    """CLAM coords record no magnification: the slide's mpp names the TRIDENT folder; a slide without
    one fails naming the fixes, and --layout flat needs none."""
    weights, args, protos, _ = conch
    clam = tmp_path / "clam" / "patches"
    clam.mkdir(parents=True)
    nompp = tmp_path / "nompp"
    nompp.mkdir()
    write_aperio_svs(nompp / "s2.svs", W, H, tile=256, levels=(1, 4), seed=3, tissue="dense", mpp=None, app_mag=None)
    for sid in ("s0", "s2"):
        with h5py.File(clam / f"{sid}.h5", "w") as f:
            c = f.create_dataset("coords", data=np.array([[0, 0], [128, 128], [256, 0]], np.int64))
            c.attrs.update(patch_level=0, patch_size=128)
    common = ("--encoder", "conch_v1", "--weights", weights, *args, "--coords", clam.parent, "--prototypes", protos,
              "--retries", "0", "--no-progress")
    r = run_cli("embed", "--archive", archive, *common, "--out", tmp_path / "a.lmdb", "--save-features",
                tmp_path / "feats")
    assert r.returncode == 1, r.stdout + r.stderr  # s1 has no coords file: that slide fails, s0 is written
    assert (tmp_path / "feats" / JOB / "features_conch_v1" / "s0.h5").is_file()
    r = run_cli("embed", "--archive", nompp, *common, "--out", tmp_path / "b.lmdb", "--save-features",
                tmp_path / "feats2")
    assert r.returncode == 1 and "--slide-mpp" in r.stderr and "--layout flat" in r.stderr, r.stdout + r.stderr
    r = run_cli("embed", "--archive", nompp, *common, "--out", tmp_path / "c.lmdb", "--save-features",
                tmp_path / "feats3", "--layout", "flat")
    assert r.returncode == 0 and (tmp_path / "feats3" / "s2.h5").is_file(), r.stdout + r.stderr


# --- embed --features on a TRIDENT job folder ----------------------------------------------------------

def _job_with_features(job: Path, *encoders: str, n_slides: int = 3) -> None:
    """A TRIDENT job folder: coords files in patches/, one features_<encoder>/ folder per encoder."""
    (job / JOB / "patches").mkdir(parents=True)
    for i in range(n_slides):
        with h5py.File(job / JOB / "patches" / f"SYN-00-{i:05d}_patches.h5", "w") as f:
            f.create_dataset("coords", data=np.zeros((4, 2), np.int64))
    for enc in encoders:
        write_cohort(job / JOB / f"features_{enc}", n_slides=n_slides, d=16, n_range=(10, 30), g=3)


@pytest.fixture
def protos16(tmp_path):
    from proalign.prototypes.io import save_prototypes

    p = tmp_path / "p16.safetensors"
    save_prototypes(p, np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32), {})
    return p


def test_features_job_folder_with_one_features_folder(tmp_path, protos16):
    job = tmp_path / "job"
    _job_with_features(job, "conch_v15")
    r = run_cli("embed", "--features", job, "--prototypes", protos16, "--out", tmp_path / "s.lmdb", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("is a TRIDENT job folder: reading the feature files in") == 1, r.stderr
    with open_store(tmp_path / "s.lmdb") as s:
        assert sorted(s) == [f"SYN-00-{i:05d}" for i in range(3)]
        assert all(f"{JOB}/features_conch_v15/" in s.meta(sid)["feature_source"]["path"] for sid in s)
    r = run_cli("prototypes", "build", "--features", job, "--init", "kmeans", "--k", 2, "--seed", 0,
                "--out", tmp_path / "k.safetensors")
    assert r.returncode == 0, r.stdout + r.stderr
    # the library call resolves it the same way
    assert [e.path.parent for e in list_feature_files(features=job)] == [job / JOB / "features_conch_v15"] * 3


def test_features_job_folder_with_several_features_folders(tmp_path, protos16):
    job = tmp_path / "job"
    _job_with_features(job, "conch_v15", "uni_v1")
    r = run_cli("embed", "--features", job, "--prototypes", protos16, "--out", tmp_path / "s.lmdb", "--no-progress")
    assert r.returncode == 2, r.stdout + r.stderr
    assert (f"{JOB}/features_conch_v15, {JOB}/features_uni_v1" in r.stderr
            and f"--features {job / JOB / 'features_conch_v15'}" in r.stderr), r.stderr
    assert not (tmp_path / "s.lmdb").exists()
    r = run_cli("embed", "--features", job / JOB / "features_uni_v1", "--prototypes", protos16,
                "--out", tmp_path / "s.lmdb", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr


def test_features_job_folder_without_features(tmp_path, protos16):
    job = tmp_path / "job"
    _job_with_features(job)  # coords only, as `patch` writes it
    r = run_cli("embed", "--features", job, "--prototypes", protos16, "--out", tmp_path / "s.lmdb", "--no-progress")
    assert r.returncode == 2 and "without a features_<encoder>/ folder" in r.stderr, r.stdout + r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("embed", "--features", empty, "--prototypes", protos16, "--out", tmp_path / "t.lmdb", "--no-progress")
    assert r.returncode == 2 and "no .h5 or .pt feature files found" in r.stderr, r.stdout + r.stderr


def test_flat_features_carry_trident_attributes(tmp_path, archive, conch):
    """SlideOptions' flat layout (the Python API's default) writes DIR/<slide>.h5, with the features attributes."""
    weights, _, _, over = conch
    enc = create_encoder("conch_v1", weights, **over)
    c = np.random.default_rng(0).standard_normal((3, enc.feature_dim)).astype(np.float32)
    opts = SlideOptions(magnification=20, patch_size=128, features_dir=str(tmp_path / "feats"))
    res = embed_slide(archive / "s0.svs", enc, c, method="mean", options=opts)
    with h5py.File(tmp_path / "feats" / "s0.h5", "r") as f:
        assert f["features"].attrs["encoder"] == "conch_v1" and f["features"].attrs["name"] == "s0"
        assert f["features"].shape == (res.n_patches, enc.feature_dim)
        assert f["coords"].attrs["patch_size_level0"].dtype == np.float64
        assert np.array_equal(f["coords"][()], res.grid.coords)  # rows in the grid's order
    assert read_features(tmp_path / "feats" / "s0.h5").attrs["encoder"] == "conch_v1"
    assert "edge_fill" not in opts.key("conch_v1")  # stores written before keep matching
    assert SlideOptions(edge_fill="black").key("conch_v1")["edge_fill"] == "black"
    with pytest.raises(ValueError, match="layout"):
        SlideOptions(layout="nested")


# --- edge fill -----------------------------------------------------------------------------------------

def _edge_coords() -> np.ndarray:
    # interior patches, then patches reaching past the right edge, the bottom edge, and both
    return np.array([[0, 0], [256, 384], [W - 64, 100], [300, H - 50], [W - 30, H - 20]], np.int64)


def test_edge_fill_changes_only_outside_pixels(tmp_path):
    path = _slide(tmp_path / "e.svs", 7)
    coords = _edge_coords()
    slide = open_slide(path)
    try:
        white = read_patches(slide, coords, 128, 128)
        black = read_patches(slide, coords, 128, 128, edge_fill="black")
        assert np.array_equal(read_patches(slide, coords, 128, 128, edge_fill="white"), white)  # the default
    finally:
        slide.close()
    np.testing.assert_array_equal(white[:2], black[:2])  # interior patches: identical
    for (x, y), w, b in zip(coords[2:], white[2:], black[2:]):
        inside = np.zeros((128, 128), bool)
        inside[:max(0, H - y), :max(0, W - x)] = True
        assert not inside.all()
        np.testing.assert_array_equal(w[inside], b[inside])  # slide pixels: identical
        assert (w[~inside] == 255).all() and (b[~inside] == 0).all()  # outside: white vs black


@pytest.mark.optional
def test_black_edge_fill_is_what_openslide_rgba_to_rgb_gives(tmp_path):
    """TRIDENT reads OpenSlide's RGBA region and converts it to RGB: the outside is black. Our
    engine with edge_fill="black", and our OpenSlide path, give those pixels."""
    openslide = pytest.importorskip("openslide")
    from proalign.slides.patches import read_patches_openslide
    from proalign.slides.slide import OpenSlideSlide

    path = _slide(tmp_path / "o.svs", 8)
    coords = _edge_coords()
    osr = openslide.OpenSlide(str(path))
    try:
        want = np.stack([np.asarray(osr.read_region((int(x), int(y)), 0, (128, 128)).convert("RGB"))
                         for x, y in coords])
    finally:
        osr.close()
    outside = np.zeros(want.shape[:3], bool)
    for i, (x, y) in enumerate(coords):
        outside[i] = True
        outside[i, :max(0, H - y), :max(0, W - x)] = False
    assert (want[outside] == 0).all()
    s = open_slide(path)
    try:
        ours = read_patches(s, coords, 128, 128, edge_fill="black")
    finally:
        s.close()
    assert (ours[outside] == 0).all()
    assert np.abs(ours.astype(int) - want.astype(int))[~outside].mean() < 1.0  # two JPEG decoders
    o = OpenSlideSlide(path)
    try:
        np.testing.assert_array_equal(read_patches_openslide(o, coords, 128, 128, edge_fill="black"), want)
        white = read_patches_openslide(o, coords, 128, 128)
    finally:
        o.close()
    assert (white[outside] == 255).all() and np.array_equal(white[~outside], want[~outside])


def test_edge_fill_reaches_the_features(tmp_path, conch):
    """Through embed_slide: edge patches' features change with the fill, interior ones do not."""
    weights, _, _, over = conch
    enc = create_encoder("conch_v1", weights, **over)
    path = _slide(tmp_path / "f.svs", 9)
    c = np.random.default_rng(1).standard_normal((3, enc.feature_dim)).astype(np.float32)
    out = {}
    for fill in ("white", "black"):
        opts = SlideOptions(magnification=20, patch_size=128, edge="pad", min_tissue=0.0, edge_fill=fill,
                            features_dir=str(tmp_path / fill))
        embed_slide(path, enc, c, method="mean", options=opts)
        with h5py.File(tmp_path / fill / "f.h5", "r") as f:
            out[fill] = (f["coords"][()], f["features"][()])
    (cw, xw), (cb, xb) = out["white"], out["black"]
    assert np.array_equal(cw, cb)
    edge = (cw[:, 0] + 128 > W) | (cw[:, 1] + 128 > H)
    assert edge.any() and (~edge).any()
    np.testing.assert_allclose(xw[~edge], xb[~edge], rtol=0, atol=1e-5)
    diff = np.abs(xw[edge] - xb[edge]).max(axis=1)
    assert (diff > 1e-3).all()
    with torch.inference_mode():  # and the black rows are the encoder on the black-filled pixels
        s = open_slide(path)
        try:
            px = torch.from_numpy(read_patches(s, cb[edge], 128, 128, edge_fill="black"))
        finally:
            s.close()
        want = enc.encode_image(enc.preprocess(px)).float().numpy()
    np.testing.assert_allclose(xb[edge], want, rtol=1e-4, atol=1e-4)
