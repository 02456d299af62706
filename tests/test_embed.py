"""The main job `embed --features`: values, provenance, resume, idempotence, bad input.

Kill-and-resume and a second writer on a store are tested once, in test_archive.py
(test_sigkill_at_random_points_then_resume, test_two_writers_on_one_store)."""
import json
import time

import h5py
import numpy as np
import pytest

import float64_reference as ref
import proalign
from proalign.aggregate import live_backends
from proalign.defaults import DEFAULT_PROALIGN, ROW_PRIOR, default_taus
from proalign.features import read_features
from proalign.prototypes.io import prototype_hash, save_prototypes
from proalign.testing.synthetic_features import write_cohort


@pytest.fixture
def cohort(tmp_path, rng):
    feats = tmp_path / "features"
    write_cohort(feats, n_slides=5, d=32, n_range=(20, 200), g=4, seed=int(rng.integers(1000)))
    protos = rng.standard_normal((4, 32)).astype(np.float32)
    ppath = tmp_path / "p.safetensors"
    save_prototypes(ppath, protos, {"init": "test"})
    return feats, ppath, protos


def test_embed_stores_reference_values_with_provenance(tmp_path, cli, cohort):
    feats, ppath, protos = cohort
    out = tmp_path / "s.lmdb"
    # end to end: the installed console script in its own process (most other CLI tests run in-process)
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--dtype", "float32", check=0,
            process=True)
    assert "5 embedded, 0 already stored, 0 failed" in r.stdout
    taus = list(default_taus())
    with proalign.open_store(out) as s:
        assert len(s) == 5
        for sid in s:
            x = read_features(feats / f"{sid}.h5").features
            e = s[sid]
            assert e.shape == (len(taus), 4 + 4 * 32) and e.dtype == np.float32
            np.testing.assert_allclose(e, ref.default_reading(x, protos), rtol=1e-5, atol=1e-6)
            m = s.meta(sid)
            assert m["n_patches"] == len(x) and m["prototypes"]["hash"] == prototype_hash(protos)
            assert m["taus"] == taus and m["encoder"] == "conch_v1" and m["engine_version"] == proalign.__version__
            assert {k: m["options"][k] for k in ("over", "moments")} == {k: DEFAULT_PROALIGN[k] for k in ("over", "moments")}
            assert m["options"]["prior"] == list(DEFAULT_PROALIGN["prior"])  # one per row
            assert m["feature_source"]["path"] == str((feats / f"{sid}.h5").resolve()) and m["backend"] in live_backends()
    # an explicit reading: two temperatures of attention over patches
    out2 = tmp_path / "s2.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out2, "--tau", 0.1, "--tau", 0.5,
        "--over", "patches", "--dtype", "float32", check=0)
    with proalign.open_store(out2) as s:
        for sid in s:
            x = read_features(feats / f"{sid}.h5").features
            np.testing.assert_allclose(s[sid][0], ref.proalign(x, protos, 0.1), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(s[sid][1], ref.proalign(x, protos, 0.5), rtol=1e-5, atol=1e-6)
    report = json.loads(open(r.stdout.split("report: ")[1].strip()).read())
    assert report["ok"] and len(report["done"]) == 5 and report["timing"]["total_s"] > 0


@pytest.mark.parametrize("method", ["panther", "h2t", "protocount", "mean"])
def test_embed_baselines(tmp_path, cli, cohort, method):
    feats, ppath, protos = cohort
    out = tmp_path / "s.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--method", method, check=0)
    with proalign.open_store(out) as s:
        for sid in s:
            x = read_features(feats / f"{sid}.h5").features
            want = getattr(ref, method)(x, protos)
            np.testing.assert_allclose(s[sid].astype(np.float64), want, rtol=2e-3, atol=2e-3)  # float16 store


def _records(out) -> dict:
    """Every record's stored bytes (embedding and provenance) and decoded meta, by slide id."""
    with proalign.open_store(out) as s:
        return {sid: (s._get(sid), s.meta(sid)) for sid in s}


def test_rerun_skips_and_overwrite_redoes(tmp_path, cli, cohort):
    feats, ppath, protos = cohort
    out = tmp_path / "s.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, check=0)
    first = _records(out)
    assert len(first) == 5
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, check=0)
    assert "0 embedded, 5 already stored, 0 failed" in r.stdout
    assert _records(out) == first  # skipped: not one byte rewritten
    # other options into the same store: refused (one store, one option set), nothing touched
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--tau", 0.2, check=2)
    assert "5 records of" in r.stderr and "other options" in r.stderr and '"taus": [0.2]' in r.stderr
    assert _records(out) == first
    # the records' time has whole seconds: let one pass, so a rewrite shows a later time
    latest = max(meta["time"] for _, meta in first.values())
    while time.strftime("%Y-%m-%dT%H:%M:%S%z") <= latest:  # the format the records use
        time.sleep(0.05)
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--tau", 0.2, "--overwrite", check=0)
    assert "5 embedded, 0 already stored, 0 failed" in r.stdout
    report = json.loads(open(r.stdout.split("report: ")[1].strip()).read())
    assert report["ok"] and sorted(report["done"]) == sorted(first) and not report["skipped"]
    now = _records(out)
    assert sorted(now) == sorted(first)  # the same slides, none added or lost
    with proalign.open_store(out) as s:
        for sid, (raw, meta) in now.items():
            old_raw, old_meta = first[sid]
            assert raw != old_raw, f"{sid} was not rewritten"
            # rewritten now (a second after the first write), with the new options
            assert meta["time"] > old_meta["time"], (sid, meta["time"], old_meta["time"])
            assert meta["taus"] == [0.2] and meta["options"]["taus"] == [0.2]
            x = read_features(feats / f"{sid}.h5").features
            np.testing.assert_allclose(s[sid].astype(np.float64), ref.proalign(x, protos, 0.2, prior=ROW_PRIOR, **{
                k: DEFAULT_PROALIGN[k] for k in ("over", "moments")}), rtol=2e-3, atol=2e-3)  # float16 store
            # nothing else changed: same source, prototypes, patch count, method and the other options
            same = ("method", "prototypes", "feature_source", "encoder", "n_patches", "engine_version")
            assert {k: meta[k] for k in same} == {k: old_meta[k] for k in same}, sid
            # (own temperatures, no --prior: ROW_PRIOR on every row instead of the default's per-row priors)
            assert meta["options"]["prior"] == ROW_PRIOR
            assert ({k: v for k, v in meta["options"].items() if k not in ("taus", "prior")}
                    == {k: v for k, v in old_meta["options"].items() if k not in ("taus", "prior")}), sid


def test_records_name_their_variant_and_old_records_stay_resumable(tmp_path, cli, cohort):
    """Stored records carry every ProAlign option; records of versions that did not record
    moments/prior count as moments=1, prior=0 (and are refused by a run of another variant)."""
    from proalign.defaults import DEFAULT_PROALIGN

    feats, ppath, _ = cohort
    out = tmp_path / "s.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--over", "prototypes", "--moments", 2,
        "--prior", 1, "--tau", 0.05, check=0)
    with proalign.open_store(out) as s:
        opts = {json.dumps(s.meta(sid)["options"], sort_keys=True) for sid in s}
        assert len(opts) == 1
        o = json.loads(opts.pop())
        assert (o["over"], o["moments"], o["prior"], o["taus"]) == ("prototypes", 2, 1.0, [0.05])
        assert s[next(iter(s))].shape == (4 + 2 * 4 * 32,)
    # a store written before moments/prior were recorded: the same records without those keys
    old = tmp_path / "old.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", old, "--over", "patches", "--tau", 0.1,
        check=0)
    with proalign.open_store(old, write=True) as s:
        for sid in list(s):
            rec = s.record(sid)
            meta = dict(rec.meta, options={k: v for k, v in rec.meta["options"].items() if k not in ("moments", "prior")})
            s.put(sid, rec.embedding, rec.n_patches, meta)
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", old, "--over", "patches", "--tau", 0.1,
            check=0)
    assert "0 embedded, 5 already stored" in r.stdout
    if DEFAULT_PROALIGN != {"tau": 0.1, "over": "patches", "moments": 1, "prior": 0.0}:
        r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", old, check=2)
        assert "other options" in r.stderr and '"over": "patches"' in r.stderr


def test_manifest_input(tmp_path, cli, cohort):
    feats, ppath, _ = cohort
    files = sorted(feats.iterdir())
    man = tmp_path / "m.csv"
    man.write_text("slide_id,path\n" + "".join(f"patient{i},{p}\n" for i, p in enumerate(files[:3])))
    out = tmp_path / "s.lmdb"
    cli("embed", "--manifest", man, "--prototypes", ppath, "--out", out, check=0)
    assert list(proalign.open_store(out)) == ["patient0", "patient1", "patient2"]


def test_bad_slides_are_reported_and_the_rest_go_on(tmp_path, cli, cohort, rng):
    """A bad feature file among slides already stored: it is reported (--report, stderr), the new
    good slide is stored and the stored records are untouched. Every kind of bad file, each with its
    reason: test_archive.py test_corrupt_and_unreadable_slides_are_quarantined."""
    feats, ppath, protos = cohort
    out = tmp_path / "s.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, check=0)
    before = {sid: proalign.open_store(out)[sid].copy() for sid in proalign.open_store(out)}
    with h5py.File(feats / "nan.h5", "w") as f:
        f["features"] = np.full((3, 32), np.nan, np.float32)
    (feats / "truncated.h5").write_bytes((feats / f"{next(iter(before))}.h5").read_bytes()[:500])
    with h5py.File(feats / "good-new.h5", "w") as f:
        f["features"] = rng.standard_normal((9, 32)).astype(np.float32)
    report_path = tmp_path / "report.json"
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--report", report_path, check=1)
    rep = json.loads(report_path.read_text())
    assert not rep["ok"] and rep["done"] == ["good-new"] and len(rep["skipped"]) == 5
    failed = rep["failed"]
    assert sorted(failed) == ["nan", "truncated"]
    assert "NaN or inf" in failed["nan"] and "unreadable" in failed["truncated"]
    for name in failed:
        assert f"FAILED {name}: " in r.stderr and f"{name}.h5" in failed[name]
    with proalign.open_store(out) as s:
        assert len(s) == 6
        for sid, e in before.items():
            np.testing.assert_array_equal(s[sid], e)


def test_slide_id_too_long_for_lmdb(tmp_path, cli, cohort):
    feats, ppath, _ = cohort
    files = sorted(feats.iterdir())
    man = tmp_path / "m.csv"
    long_id = "TCGA-" + "x" * 600
    man.write_text(f"slide_id,path\n{long_id},{files[0]}\nshort,{files[1]}\n")
    out = tmp_path / "s.lmdb"
    r = cli("embed", "--manifest", man, "--prototypes", ppath, "--out", out, check=1)
    assert "longer than LMDB's key limit of 511 bytes" in r.stderr and files[0].name in r.stderr
    assert list(proalign.open_store(out)) == ["short"]


def test_undefined_reading_is_refused_before_any_slide(cli, cohort, tmp_path):
    from proalign.pipeline import EmbedOptions

    with pytest.raises(ValueError, match="prior"):
        EmbedOptions(over="patches", prior=1.0)
    feats, ppath, _ = cohort
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", tmp_path / "s.lmdb", "--over", "patches",
            "--prior", 1, check=2)
    assert "option of over=prototypes" in r.stderr and not (tmp_path / "s.lmdb").exists()
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", tmp_path / "s.lmdb", "--tau", 0.1,
            "--prior", 1, "--prior", 0, check=2)
    assert "one prior per tau" in r.stderr and not (tmp_path / "s.lmdb").exists()


def test_per_row_priors_from_the_cli(cli, cohort, tmp_path):
    """--prior once per --tau (a tau may repeat): one row each, recorded as the list."""
    feats, ppath, protos = cohort
    out = tmp_path / "s.lmdb"
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--dtype", "float32", "--tau", 0.1,
        "--tau", 0.1, "--prior", 2, "--prior", 0, check=0)
    with proalign.open_store(out) as s:
        for sid in s:
            x = read_features(feats / f"{sid}.h5").features
            np.testing.assert_allclose(s[sid], ref.proalign_rows(x, protos, [0.1, 0.1], prior=[2.0, 0.0], over="prototypes"),
                                       rtol=1e-5, atol=1e-6)
            assert s.meta(sid)["options"]["prior"] == [2.0, 0.0]



def test_slide_file_options_are_refused_with_feature_files(cli, cohort, tmp_path):
    """Every option of the slides path, given with --features, is a usage error naming it (it would
    do nothing there); left unset they are not, nor is --device (which places the aggregation)."""
    feats, ppath, _ = cohort
    out = tmp_path / "s.lmdb"
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--mag", 20, "--encoder", "conch_v1",
            "--keep-penmarks", "--batch-size", 8, check=2)
    assert "--mag, --encoder, --keep-penmarks, --encoder-batch-size are for slide files" in r.stderr
    r = cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--cache-dir", tmp_path, check=2)
    assert "--cache-dir is for slide files" in r.stderr and not out.exists()
    cli("embed", "--features", feats, "--prototypes", ppath, "--out", out, "--device", "cpu", check=0)

def test_demo_runs(tmp_path, capsys):
    """`make demo`'s features path, small: it prints the first slide's embedding of the default reading."""
    from proalign.demo import main

    assert main(["--out", str(tmp_path / "demo"), "--slides", "4", "--slide-files", "0"]) == 0
    assert "4 slides stored" in capsys.readouterr().out


def test_error_inside_a_run_is_a_runtime_error_not_a_usage_error(cohort, tmp_path, monkeypatch):
    """Exit 2 is for the command line; an error from inside the run (here the RuntimeError torch
    raises on a failed CUDA kernel, from the run itself) is exit 4 with one line, no 'Usage:' text."""
    from click.testing import CliRunner

    import proalign.pipeline as pipeline
    from proalign.cli import RUNTIME_ERROR_EXIT, main

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(pipeline, "embed_features", broken)
    feats, ppath, _ = cohort
    r = CliRunner().invoke(main, ["embed", "--features", str(feats), "--prototypes", str(ppath),
                                  "--out", str(tmp_path / "s.lmdb")])
    assert r.exit_code == RUNTIME_ERROR_EXIT == 4, r.output
    assert "error: the run stopped: CUDA error" in r.output and "Usage:" not in r.output
