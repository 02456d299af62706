"""Magnification and mpp the way labs meet them (issue 16 item 4), on generated slides through the
CLI: magnification from the mpp's standard bucket (the exact mpp kept in the metadata),
--custom-mpp-keys, nested archive folders with duplicate ids, and slides without an mpp reported
once per run with the fix."""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import pytest

from conftest import run_cli

from proalign.slides.grid import nominal_magnification
from proalign.slides.manifest import level0_magnification, read_slide_manifest
from proalign.slides.mpp import MPP_FIX, mpp_from_keys, mpp_rule, parse_mpp_keys
from proalign.slides.slide import open_slide
from proalign.testing.synthetic_slides import write_aperio_svs, write_pyramidal_tiff

FIX_MARK = "--custom-mpp-keys KEY when"  # a phrase of MPP_FIX


def _svs(path: Path, seed: int = 0, **kw) -> Path:
    kw = {"mpp": 0.5, "app_mag": 20, **kw}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_aperio_svs(path, 1800, 1500, tile=256, levels=(1, 4), seed=seed, **kw)
    return path


def _tif(path: Path, mpp: float | None, seed: int = 0, **kw) -> Path:
    write_pyramidal_tiff(path, 1800, 1500, tile=256, levels=(1, 4), seed=seed, mpp=mpp, **kw)
    return path


def _coords_attrs(job: Path, stem: str) -> dict:
    with h5py.File(job / "20x_128px_0px_overlap" / "patches" / f"{stem}_patches.h5", "r") as f:
        return dict(f["coords"].attrs)


def test_buckets_and_keys_units():
    assert [nominal_magnification(v) for v in (0.499, 0.2527, 0.25, 1.0, 0.12, 2.0)] == [20, 40, 40, 10, 80, 5]
    assert level0_magnification(0.499, None) == 20 and level0_magnification(0.25, 20.0) == 40
    assert level0_magnification(None, 40.0) == 40 and level0_magnification(None, None) is None
    assert parse_mpp_keys("a, b,a") == ("a", "b") and parse_mpp_keys(["x", "y,z"]) == ("x", "y", "z")
    assert parse_mpp_keys(None) == ()
    props = {"aperio.ScanMPP": "0.2501 um", "vendor.Resolution": "n/a", "Other": "3"}
    assert mpp_from_keys(props, ["scanmpp"]) == (0.2501, "aperio.ScanMPP")  # last part, any case
    assert mpp_from_keys(props, ["aperio.ScanMPP"])[0] == 0.2501
    v, note = mpp_from_keys(props, ["Resolution", "missing"])
    assert v is None and "not an mpp" in note and "no property 'missing'" in note
    rule = mpp_rule(slide_mpp=0.3, custom_mpp_keys="k1,k2")
    assert rule.user_mpp("/x/a.svs") == 0.3 and rule.keys == ("k1", "k2")


def test_patch_magnification_from_mpp_buckets(tmp_path):
    """0.499 um/px -> 20x, 0.25 -> 40x, 1.0 -> 10x; the exact mpp is in the coords attributes; an
    SVS whose AppMag (20) disagrees with its mpp (0.25) gets the mpp's bucket (40x) as TRIDENT does."""
    slides = [_tif(tmp_path / "s0499.tif", 0.499, 1), _tif(tmp_path / "s025.tif", 0.25, 2),
              _tif(tmp_path / "s100.tif", 1.0, 3), _svs(tmp_path / "appmag.svs", 4, mpp=0.25, app_mag=20)]
    job = tmp_path / "job"
    r = run_cli("patch", *slides, "--mag", "20", "--patch-size", "128", "--min-tissue", "0", "--out", job)
    assert r.returncode == 0, r.stderr
    want = {"s0499": (20, 0.499, 128), "s025": (40, 0.25, 256), "s100": (10, 1.0, 64), "appmag": (40, 0.25, 256)}
    for stem, (mag0, mpp0, size0) in want.items():
        a = _coords_attrs(job, stem)
        assert a["level0_magnification"] == mag0 and a["target_magnification"] == 20, (stem, a)
        assert a["level0_mpp"] == pytest.approx(mpp0) and a["patch_size_level0"] == size0, (stem, a)
    assert "s0499.tif:" in r.stdout and "0.499 um/px, 20x" in r.stdout
    # the manifest records the exact mpp and the bucket
    out = tmp_path / "m.csv"
    r = run_cli("manifest", "--archive", tmp_path, "--out", out, "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        rows = {row["slide_id"]: row for row in csv.DictReader(f)}
    assert (rows["s0499"]["mpp"], rows["s0499"]["magnification"]) == ("0.499", "20")
    assert rows["s025"]["magnification"] == "40" and rows["s100"]["magnification"] == "10"
    assert (rows["appmag"]["objective_power"], rows["appmag"]["magnification"]) == ("20.0", "40")


@pytest.mark.slow
def test_custom_mpp_keys_and_missing_mpp_reported_once(tmp_path):
    """Slides whose mpp sits under a non-standard key: found with --custom-mpp-keys (Aperio field or
    a generic TIFF's description, full or short key name); without it every such slide fails and
    the fix is said once for the run, naming them all."""
    a = _svs(tmp_path / "a.svs", 1, mpp=None, app_mag=None, extra_fields={"ScanMPP": "0.5"})
    b = _svs(tmp_path / "b.svs", 2, mpp=None, app_mag=None, extra_fields={"ScanMPP": "0.5"})
    t = _tif(tmp_path / "t.tif", None, 3, description="lab conversion|pixel_size_um=0.25|stain=HE")
    job = tmp_path / "job"
    r = run_cli("patch", a, b, t, "--patch-size", "128", "--out", job)
    assert r.returncode == 1
    assert r.stderr.count(FIX_MARK) == 1, r.stderr  # once, not once per slide
    assert "3 slide(s) have no mpp" in r.stderr and "a, b, t" in r.stderr
    assert r.stderr.count("FAILED") == 3 and "aperio.ScanMPP" in r.stderr  # the property that may hold it
    r = run_cli("patch", a, b, t, "--patch-size", "128", "--custom-mpp-keys", "aperio.ScanMPP",
                "--custom-mpp-keys", "pixel_size_um", "--out", job)
    assert r.returncode == 0, r.stderr
    assert _coords_attrs(job, "a")["level0_mpp"] == 0.5 and _coords_attrs(job, "a")["level0_magnification"] == 20
    assert _coords_attrs(job, "t")["level0_mpp"] == 0.25 and _coords_attrs(job, "t")["patch_size_level0"] == 256
    # the library: open_slide with keys; the standard metadata wins over a custom key
    s = open_slide(a, mpp_keys=("scanmpp",))
    assert (s.mpp, s.info.mpp_source) == (0.5, "key:aperio.ScanMPP")
    c = _svs(tmp_path / "c.svs", 4, mpp=0.25, app_mag=40, extra_fields={"ScanMPP": "0.5"})
    assert open_slide(c, mpp_keys=("ScanMPP",)).info.mpp_source == "metadata"
    # the manifest records where the mpp came from, and embed --manifest reuses it without the keys
    out = tmp_path / "m.csv"
    r = run_cli("manifest", "--archive", tmp_path, "--out", out, "--custom-mpp-keys", "ScanMPP,pixel_size_um",
                "--workers", "1", "--no-progress")
    assert r.returncode == 0 and "no mpp" not in r.stderr, r.stderr
    m = read_slide_manifest(out)
    src = {row["slide_id"]: (row["mpp"], row["mpp_source"], row["magnification"]) for row in m.rows}
    assert src["a"] == ("0.5", "key:aperio.ScanMPP", "20") and src["t"] == ("0.25", "key:pixel_size_um", "40")
    assert src["c"] == ("0.25", "metadata", "40")
    assert {e.slide_id: e.mpp for e in m.entries} == {"a": 0.5, "b": 0.5, "c": None, "t": 0.25}



@pytest.mark.slow
def test_embed_nested_archive_keys_duplicates_and_missing_mpp(tmp_path, conch):
    """embed --archive searches nested folders; a second file with a taken slide id is reported
    (not embedded); --custom-mpp-keys reaches the workers; slides without an mpp fail and the fix
    is said once."""
    weights, _, protos, _ = conch  # its folder records the architecture: no --encoder-arg needed
    arch = tmp_path / "archive"
    _svs(arch / "site1" / "2024" / "deep.svs", 1)
    _svs(arch / "site2" / "keyed.svs", 2, mpp=None, app_mag=None, extra_fields={"ScanMPP": "0.5"})
    _svs(arch / "site2" / "nompp1.svs", 3, mpp=None, app_mag=None)
    _svs(arch / "site3" / "nompp2.svs", 4, mpp=None, app_mag=None)
    _svs(arch / "site3" / "deep.svs", 5)  # same slide id as site1/2024/deep.svs
    r = run_cli("embed", "--archive", arch, "--encoder", "conch_v1", "--weights", weights, "--patch-size", "128",
                "--prototypes", protos, "--out", tmp_path / "s.lmdb", "--retries", "0", "--no-progress",
                "--custom-mpp-keys", "ScanMPP")
    assert r.returncode == 1, r.stderr  # the two slides without an mpp
    assert "2 embedded" in r.stdout, r.stdout
    assert r.stderr.count(FIX_MARK) == 1 and "2 slide(s) have no mpp" in r.stderr, r.stderr
    assert "FAILED nompp1" in r.stderr and "FAILED nompp2" in r.stderr
    for line in r.stderr.splitlines():
        if line.startswith("FAILED"):
            assert MPP_FIX not in line
    from proalign import open_store

    with open_store(tmp_path / "s.lmdb") as s:
        assert sorted(s) == ["deep", "keyed"]
        assert "site1" in s.meta("deep")["slide"]["path"]  # the first in path order
        assert s.meta("keyed")["slide"]["mpp"] == 0.5
    report = Path(r.stdout.split("report: ")[1].strip()).read_text()
    assert "site3/deep.svs" in report  # the duplicate, listed with its reason
