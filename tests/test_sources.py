"""Resume checks each stored record's source file: size and a content fingerprint (a few rows of
`features`, or byte ranges of a slide / .pt file). A changed source is redone, kept or refused
(`--on-change`); `store verify --sources` lists changed and vanished sources; older records
without a fingerprint are compared by size and mtime."""
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import float64_reference as ref
import proalign
from proalign.features import read_features
from proalign.fingerprint import (bytes_fingerprint, feature_file_fingerprint, features_fingerprint, h5_fingerprint,
                                  sample_rows)
from proalign.prototypes.io import save_prototypes
from proalign.testing.synthetic_features import write_clam_h5, write_cohort, write_trident_h5


@pytest.fixture
def cohort(tmp_path, rng):
    feats = tmp_path / "features"
    write_cohort(feats, n_slides=5, d=32, n_range=(20, 200), g=4, seed=int(rng.integers(1000)))
    ppath = tmp_path / "p.safetensors"
    protos = rng.standard_normal((4, 32)).astype(np.float32)
    save_prototypes(ppath, protos, {})
    return feats, ppath, protos


def _embed(cli, feats, ppath, out, *extra, check=0):
    return cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--dtype", "float32", *extra,
               check=check)


def _report(r) -> dict:
    return json.loads(Path(r.stdout.split("report: ")[1].strip()).read_text())


def _replace_features(path: Path, x: np.ndarray, keep_mtime: bool = False) -> None:
    """Re-extract a TRIDENT file in place (as a lab would): new features and coords, same name."""
    st = path.stat()
    write_trident_h5(path, x, np.zeros((len(x), 2), np.int64))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _layouts(x: np.ndarray, tmp: Path):
    """The same features stored as the readers meet them."""
    coords = np.zeros((len(x), 2), np.int64)
    p = tmp / "trident.h5"
    write_trident_h5(p, x, coords)
    yield p
    p = tmp / "clam.h5"
    write_clam_h5(p, x, coords, batch=7)
    yield p
    for name, kw in (("contiguous", {}), ("gzip", {"compression": "gzip", "chunks": (min(16, len(x)), x.shape[1])})):
        p = tmp / f"{name}.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("features", data=x, **kw)
        yield p
    p = tmp / "batch-axis.h5"
    with h5py.File(p, "w") as f:
        f["features"] = x[None]
    yield p
    p = tmp / "big-endian.h5"
    with h5py.File(p, "w") as f:
        f["features"] = x.astype(x.dtype.newbyteorder(">"))
    yield p


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_fingerprint_of_the_array_read_equals_the_one_read_from_disk(tmp_path, rng, dtype):
    """The worker hashes rows of the array it embedded, a resume reads those rows from the file:
    the two must agree on every layout, and a change to a sampled row must show."""
    x = rng.standard_normal((int(rng.integers(1, 300)), 24)).astype(dtype)
    prints = set()
    for p in _layouts(x, tmp_path):
        ff = read_features(p)
        assert features_fingerprint(ff.features) == h5_fingerprint(p) == feature_file_fingerprint(p), p.name
        prints.add(h5_fingerprint(p))
    assert len(prints) == 1  # the values, not the layout or byte order
    y = x.copy()
    y[sample_rows(len(y))[-1], 0] += 1
    _replace_features(tmp_path / "trident.h5", y)
    assert h5_fingerprint(tmp_path / "trident.h5") not in prints
    assert f"{len(x)}x24" in prints.pop()


def test_byte_range_fingerprint(tmp_path, rng):
    p = tmp_path / "f.bin"
    data = bytearray(rng.integers(0, 256, 500_000, dtype=np.uint8).tobytes())
    p.write_bytes(data)
    fp = bytes_fingerprint(p)
    for at in (0, len(data) // 2, len(data) - 1):  # head, middle, tail
        changed = bytearray(data)
        changed[at] ^= 1
        p.write_bytes(changed)
        assert bytes_fingerprint(p) != fp
    p.write_bytes(data + b"\0")
    assert bytes_fingerprint(p) != fp
    p.write_bytes(data)
    assert bytes_fingerprint(p) == fp


def test_reextracted_features_are_redone_and_reported(tmp_path, cli, cohort, rng):
    """The issue's case: a feature file replaced by rows of other values (another count); the rerun used to say
    '0 embedded, 5 already stored' and keep the old embedding."""
    feats, ppath, protos = cohort
    out = tmp_path / "s.lmdb"
    _embed(cli, feats, ppath, out)
    sid = sorted(p.stem for p in feats.iterdir())[2]
    with proalign.open_store(out) as s:
        before = {k: s[k].copy() for k in s}
        assert s.meta(sid)["feature_source"]["fingerprint"].startswith("rows-v1:")
        n = s.meta(sid)["n_patches"] + 3  # never the stored count: the messages below name the new shape
    x = rng.standard_normal((n, 32)).astype(np.float32)
    _replace_features(feats / f"{sid}.h5", x)
    r = cli("store", "verify", out, "--sources", check=1)
    assert f"CHANGED {sid}: {feats / sid}.h5" in r.stderr and f"{n} x 32" in r.stderr
    assert "sources: 1 changed, 0 missing" in r.stdout
    r = _embed(cli, feats, ppath, out)
    assert "1 embedded, 4 already stored" in r.stdout and "1 source file(s) changed since stored" in r.stdout
    assert f"SOURCE CHANGED {sid}" in r.stderr
    rep = _report(r)
    assert rep["done"] == [sid] and list(rep["changed_sources"]) == [sid] and rep["on_change"] == "redo"
    with proalign.open_store(out) as s:
        np.testing.assert_allclose(s[sid], ref.default_reading(x, protos), rtol=1e-5, atol=1e-6)
        assert s.meta(sid)["n_patches"] == n
        for k in before:
            if k != sid:
                np.testing.assert_array_equal(s[k], before[k])
    r = _embed(cli, feats, ppath, out)
    assert "0 embedded, 5 already stored" in r.stdout and not _report(r)["changed_sources"]
    cli("store", "verify", out, "--sources", check=0)


def test_on_change_keep_and_fail(tmp_path, cli, cohort, rng):
    feats, ppath, _ = cohort
    out = tmp_path / "s.lmdb"
    _embed(cli, feats, ppath, out)
    sid = sorted(p.stem for p in feats.iterdir())[0]
    with proalign.open_store(out) as s:
        old, old_meta = s[sid].copy(), s.meta(sid)
    n_old = old_meta["n_patches"]
    n_new = n_old + 1  # another shape, whatever the cohort drew
    _replace_features(feats / f"{sid}.h5", rng.standard_normal((n_new, 32)).astype(np.float32))
    r = _embed(cli, feats, ppath, out, "--on-change", "fail", check=2)
    # the slide, its file and what changed; the file's byte size may not (HDF5 allocates in blocks:
    # 181 and 182 rows gave one size), its fingerprint's shape always does
    assert f"{sid} ({feats / sid}.h5: " in r.stderr and f"features {n_old} x 32 -> {n_new} x 32" in r.stderr
    assert "--on-change redo" in r.stderr
    assert "Traceback" not in r.stderr
    r = _embed(cli, feats, ppath, out, "--on-change", "keep")
    assert "0 embedded, 5 already stored" in r.stdout and "records kept (--on-change keep)" in r.stdout
    assert list(_report(r)["changed_sources"]) == [sid]
    with proalign.open_store(out) as s:
        np.testing.assert_array_equal(s[sid], old)
        assert s.meta(sid) == old_meta
    cli("store", "verify", out, "--sources", check=1)  # still listed: keep does not make it current


def test_same_content_touched_is_not_redone_same_size_new_content_is(tmp_path, cli, cohort, rng):
    feats, ppath, _ = cohort
    out = tmp_path / "s.lmdb"
    _embed(cli, feats, ppath, out)
    a, b = sorted(feats.iterdir())[:2]
    os.utime(a, (1_000_000_000, 1_000_000_000))  # copied without keeping times, or touched: same content
    x = read_features(b).features.copy()
    x[sample_rows(len(x))[1]] += 1  # same shape and file size, same mtime: only the content tells
    size = b.stat().st_size
    _replace_features(b, x, keep_mtime=True)
    assert b.stat().st_size == size
    r = _embed(cli, feats, ppath, out)
    assert "1 embedded, 4 already stored" in r.stdout
    assert list(_report(r)["changed_sources"]) == [b.stem] and "content fingerprint differs" in r.stderr


def test_pt_feature_files(tmp_path, cli, rng):
    feats = tmp_path / "pt"
    write_cohort(feats, n_slides=3, d=32, n_range=(20, 60), g=4, seed=1, fmt="pt")
    ppath = tmp_path / "p.safetensors"
    save_prototypes(ppath, rng.standard_normal((4, 32)).astype(np.float32), {})
    out = tmp_path / "s.lmdb"
    _embed(cli, feats, ppath, out)
    with proalign.open_store(out) as s:
        assert all(s.meta(k)["feature_source"]["fingerprint"].startswith("bytes-v1:") for k in s)
    assert "0 embedded, 3 already stored" in _embed(cli, feats, ppath, out).stdout
    p = sorted(feats.iterdir())[1]
    torch.save(torch.from_numpy(rng.standard_normal((40, 32)).astype(np.float32)), p)
    r = _embed(cli, feats, ppath, out)
    assert "1 embedded, 2 already stored" in r.stdout and list(_report(r)["changed_sources"]) == [p.stem]


def test_vanished_source(tmp_path, cli, cohort):
    """A slide listed in the manifest whose file is gone: reported, its redo fails (exit 1), the
    stored record stays; `store verify --sources` lists it as missing."""
    feats, ppath, _ = cohort
    files = sorted(feats.iterdir())
    man = tmp_path / "m.csv"
    man.write_text("slide_id,path\n" + "".join(f"{p.stem},{p}\n" for p in files))
    out = tmp_path / "s.lmdb"
    cli("embed", "--manifest", man, "--prototypes", ppath, "--out", out, check=0)
    files[3].unlink()
    r = cli("store", "verify", out, "--sources", check=1)
    assert f"MISSING {files[3].stem}: {files[3]}" in r.stderr and "sources: 0 changed, 1 missing" in r.stdout
    r = cli("embed", "--manifest", man, "--prototypes", ppath, "--out", out, "--no-progress", check=1)
    rep = _report(r)
    assert list(rep["changed_sources"]) == [files[3].stem] and "file not found" in rep["failed"][files[3].stem]
    assert files[3].stem in proalign.open_store(out)


def test_records_without_a_fingerprint_are_compared_by_size_and_mtime(tmp_path, cli, cohort, rng):
    """Records of older versions hold path, size and mtime but no fingerprint: they stay readable and
    resumable, compared by what they have, and the run and verify say so."""
    feats, ppath, _ = cohort
    out = tmp_path / "s.lmdb"
    _embed(cli, feats, ppath, out)
    with proalign.open_store(out, write=True) as s:
        for sid in list(s):
            rec = s.record(sid)
            src = {k: v for k, v in rec.meta["feature_source"].items() if k != "fingerprint"}
            s.put(sid, rec.embedding, rec.n_patches, {**rec.meta, "feature_source": src})
    r = _embed(cli, feats, ppath, out)
    assert "0 embedded, 5 already stored" in r.stdout and len(_report(r)["unfingerprinted"]) == 5
    assert "compared by size and mtime only" in r.stderr
    r = cli("store", "verify", out, "--sources", check=0)
    assert "5 record(s) without a content fingerprint" in r.stdout
    a, b = sorted(feats.iterdir())[:2]
    os.utime(a, (1_000_000_000, 1_000_000_000))  # the mtime is all an old record can tell by
    _replace_features(b, rng.standard_normal((7, 32)).astype(np.float32))
    r = cli("store", "verify", out, "--sources", check=1)
    assert f"CHANGED {a.stem}" in r.stderr and f"CHANGED {b.stem}" in r.stderr
    assert "compared size and mtime only" in r.stderr
    r = _embed(cli, feats, ppath, out)
    assert "2 embedded, 3 already stored" in r.stdout
    with proalign.open_store(out) as s:  # the redone records carry a fingerprint now
        assert s.meta(b.stem)["feature_source"]["fingerprint"].startswith("rows-v1:7x32:")


def test_rescanned_slide_file_is_redone(tmp_path):
    """The slides path: a slide file rewritten under the same name (a rescan) is embedded again."""
    from conftest import run_cli
    from proalign.testing.random_weights import write_random_conch
    from proalign.testing.synthetic_slides import write_aperio_svs

    over = write_random_conch(tmp_path / "conch")
    save_prototypes(tmp_path / "p.safetensors",
                    np.random.default_rng(3).standard_normal((5, over["embed_dim"])).astype(np.float32), {})
    archive = tmp_path / "slides"
    archive.mkdir()
    for i, name in enumerate(["a", "b"]):
        write_aperio_svs(archive / f"{name}.svs", 900, 700, tile=256, levels=(1, 4), seed=i, mpp=0.5, app_mag=20)
    args = ["embed", "--archive", archive, "--encoder", "conch_v1", "--weights", tmp_path / "conch",
            *[a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")], "--patch-size", "128", "--mag", "20",
            "--prototypes", tmp_path / "p.safetensors", "--out", tmp_path / "s.lmdb", "--no-progress"]
    run_cli(*args, check=0)
    with proalign.open_store(tmp_path / "s.lmdb") as s:
        slide = s.meta("b")["slide"]
        assert slide["fingerprint"].startswith("bytes-v1:") and slide["bytes"] == (archive / "b.svs").stat().st_size
    assert "0 embedded, 2 already stored" in run_cli(*args, check=0).stdout
    write_aperio_svs(archive / "b.svs", 900, 700, tile=256, levels=(1, 4), seed=7, mpp=0.5, app_mag=20)
    r = run_cli("store", "verify", tmp_path / "s.lmdb", "--sources", check=1)
    assert "CHANGED b: " in r.stderr and "CHANGED a" not in r.stderr
    r = run_cli(*args, check=0)
    assert "1 embedded, 1 already stored" in r.stdout and list(_report(r)["changed_sources"]) == ["b"]
