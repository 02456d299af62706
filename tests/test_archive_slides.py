"""Archive scale on the slides path: the slide manifest (built once, reused by `embed --manifest`),
`--gpus` checks and worker environment, and the local slide cache (prefetch, bounded, cleaned,
fallback). Tiny generated slides and a random CONCH; the cache's mechanics on feature files."""
from __future__ import annotations

import csv
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

from proalign import open_store
from proalign.features import list_feature_files
from proalign.features.io import FeatureFileEntry
from proalign.pipeline import run_archive
from proalign.pipeline.scheduler import gpu_env, parse_gpus
from proalign.pipeline.slide_cache import SlideCache, cache_path
from proalign.pipeline.worker import EmbedOptions, FeatureFileSpec
from proalign.prototypes.io import save_prototypes
from proalign.slides.manifest import COLUMNS, build_manifest, is_slide_manifest, read_slide_manifest
from proalign.testing.synthetic_slides import write_aperio_svs
from proalign.testing.synthetic_features import write_cohort


W, H = 1024, 768  # 16-24 tissue patches of 128 px a slide: what is tested is the listing, not the size


def _slide(path: Path, seed: int, mpp: float | None = 0.5) -> Path:
    write_aperio_svs(path, W, H, tile=256, levels=(1, 4), seed=seed, mpp=mpp, app_mag=20 if mpp else None)
    return path



def _embed(conch, out, *src, extra=()):
    weights, args, protos, _ = conch
    return run_cli("embed", *src, "--encoder", "conch_v1", "--weights", weights, *args, "--patch-size", "128",
                   "--mag", "20", "--prototypes", protos, "--out", out, "--dtype", "float32", "--retries", "0",
                   "--no-progress", *extra)


def _report(stdout: str) -> dict:
    return json.loads(Path(stdout.split("report: ")[1].strip()).read_text())


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _tree(folder: Path) -> list[Path]:
    """Everything under `folder`, folders included (an empty per-slide folder counts)."""
    return sorted(folder.rglob("*"))


# -- manifest ------------------------------------------------------------------------------------
def test_manifest_lists_every_slide_with_metadata_and_reasons(tmp_path):
    """A process pool reads metadata; broken and duplicate slides are listed with their reason,
    the mpp comes from metadata, --mpp-csv or nowhere, as `mpp_source` says."""
    arch = tmp_path / "archive"
    (arch / "sub").mkdir(parents=True)
    _slide(arch / "a.svs", 1)
    write_aperio_svs(arch / "sub" / "b.svs", 2400, 1200, tile=256, levels=(1, 4, 16), seed=2, mpp=None, app_mag=None)
    _slide(arch / "c.svs", 3, mpp=None)
    (arch / "broken.svs").write_bytes(b"II*\x00garbage")
    (arch / "sub" / "a.tif").write_bytes((arch / "a.svs").read_bytes())  # same slide id as a.svs
    (tmp_path / "mpp.csv").write_text("wsi,mpp\nb.svs,0.25\n")
    out = tmp_path / "m.csv"
    r = run_cli("manifest", "--archive", arch, "--out", out, "--mpp-csv", tmp_path / "mpp.csv", "--workers", "2",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "[4/4] slides probed" in r.stderr  # the duplicate is not probed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "m.csv", "mpp.csv"]  # no temporary file
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = {(r["slide_id"], Path(r["path"]).name): r for r in reader}
    assert len(rows) == 5 and "5 slides, 3 readable, 2 not" in r.stdout
    a, b, c = rows["a", "a.svs"], rows["b", "b.svs"], rows["c", "c.svs"]
    assert (a["status"], a["format"], a["width"], a["height"], a["levels"]) == ("ok", "aperio-svs", str(W), str(H), "2")
    assert (a["mpp"], a["mpp_source"], a["objective_power"]) == ("0.5", "metadata", "20.0")
    assert int(a["size_bytes"]) == (arch / "a.svs").stat().st_size and Path(a["path"]).is_absolute()
    assert (b["levels"], b["mpp"], b["mpp_source"]) == ("3", "0.25", "user")
    assert (c["status"], c["mpp"], c["mpp_source"]) == ("ok", "", "none")
    assert "no mpp" in r.stderr
    bad = rows["broken", "broken.svs"]
    assert bad["status"] == "error" and bad["error"] and "broken.svs" in r.stderr
    dup = rows["a", "a.tif"]
    assert dup["status"] == "duplicate" and "a.svs" in dup["error"]
    assert is_slide_manifest(out)
    # in-process build gives the same rows (the pool changes nothing)
    rows1 = build_manifest(arch, workers=1, mpp_table={"b.svs": 0.25})
    assert [(x["slide_id"], x["status"], str(x["mpp"]), str(x["width"])) for x in rows1] == \
        [(x["slide_id"], x["status"], x["mpp"], x["width"]) for x in csv.DictReader(out.read_text().splitlines())]


def test_embed_manifest_reuses_recorded_mpp_and_listing(tmp_path, conch):
    """`embed --manifest`: slides come from the manifest (a slide added later is not listed), the
    user mpp recorded at manifest time is used (no --slide-mpp needed), an unreadable slide is
    quarantined with its reason; records equal `embed --archive`'s."""
    arch = tmp_path / "archive"
    arch.mkdir()
    _slide(arch / "s0.svs", 11)
    _slide(arch / "s1.svs", 12, mpp=None)  # needs an mpp from the user
    (arch / "broken.svs").write_bytes(b"II*\x00garbage")
    m = tmp_path / "m.csv"
    build_manifest(arch, m, slide_mpp=0.5, workers=1)  # the CLI's manifest command: the test above
    _slide(arch / "late.svs", 13)  # not in the manifest
    man = read_slide_manifest(m)
    assert [e.slide_id for e in man.entries] == ["broken", "s0", "s1"] and man.errors.keys() == {"broken"}
    assert all(e.mpp == 0.5 for e in man.entries if e.slide_id != "broken")  # --slide-mpp: user for all
    assert man.entries[1].size_bytes == (arch / "s0.svs").stat().st_size

    r = _embed(conch, tmp_path / "m.lmdb", "--manifest", m)
    assert r.returncode == 1, r.stderr
    rep = _report(r.stdout)
    assert sorted(rep["done"]) == ["s0", "s1"] and list(rep["quarantine"]) == ["broken"]
    # the same slides through --archive (with the mpp given again) store the same embeddings
    (arch / "late.svs").unlink()
    r2 = _embed(conch, tmp_path / "a.lmdb", "--archive", arch, "--slide-mpp", "0.5")
    assert r2.returncode == 1, r2.stderr
    with open_store(tmp_path / "m.lmdb") as s, open_store(tmp_path / "a.lmdb") as t:
        assert sorted(s) == sorted(t) == ["s0", "s1"]
        for sid in s:
            assert s[sid].tobytes() == t[sid].tobytes()
            assert s.meta(sid)["slide"]["mpp"] == 0.5
    # without the recorded mpp, s1 would fail: a manifest built without --slide-mpp
    m2 = tmp_path / "m2.csv"
    build_manifest(arch, m2, workers=1)
    r3 = _embed(conch, tmp_path / "m2.lmdb", "--manifest", m2)
    assert r3.returncode == 1 and "s1" in _report(r3.stdout)["quarantine"]


def test_embed_mpp_flags_fill_only_slides_without_an_mpp(tmp_path, conch):
    """With a slide manifest, --mpp-csv and --slide-mpp never override a slide's own mpp (0.5 here,
    different from both); --mpp-csv comes first for slides without one, --slide-mpp for the rest."""
    arch = tmp_path / "archive"
    arch.mkdir()
    _slide(arch / "s0.svs", 41)  # metadata mpp 0.5
    _slide(arch / "s1.svs", 42, mpp=None)
    _slide(arch / "s2.svs", 43, mpp=None)
    m = tmp_path / "m.csv"
    build_manifest(arch, m, workers=1)
    (tmp_path / "mpp.csv").write_text("wsi,mpp\ns0.svs,0.3\ns1.svs,0.3\n")
    r = _embed(conch, tmp_path / "s.lmdb", "--manifest", m, "--mpp-csv", tmp_path / "mpp.csv", "--slide-mpp", "0.25")
    assert r.returncode == 0, r.stderr
    with open_store(tmp_path / "s.lmdb") as s:
        assert {sid: s.meta(sid)["slide"]["mpp"] for sid in s} == {"s0": 0.5, "s1": 0.3, "s2": 0.25}


def test_read_slide_manifest_relative_paths_and_duplicate_ids(tmp_path):
    """Relative paths are taken from the manifest's folder; a slide id listed twice keeps the first
    file in sorted path order (as build_manifest decides), whatever the row order; rows marked
    duplicate stay out. Both are returned as slide id -> paths."""
    m = tmp_path / "sub" / "m.csv"
    m.parent.mkdir()
    elsewhere = tmp_path / "z.svs"
    m.write_text("slide_id,path,size_bytes,format,mpp,mpp_source,status,error\n"
                 "x,slides/b/x.svs,10,aperio-svs,0.5,metadata,ok,\n"
                 "x,slides/a/x.tif,11,aperio-svs,0.5,metadata,ok,\n"
                 "y,slides/y.svs,12,,,,duplicate,slide id 'y' is already taken by /n/y.svs\n"
                 f"z,{elsewhere},13,aperio-svs,,none,ok,\n")
    man = read_slide_manifest(m, slide_mpp=0.25)
    assert [(e.slide_id, e.path, e.size_bytes, e.mpp) for e in man.entries] == [
        ("x", m.parent / "slides" / "a" / "x.tif", 11, None), ("z", elsewhere, 13, 0.25)]
    assert man.duplicates == {"x": [str(m.parent / "slides" / "b" / "x.svs")],
                              "y": [str(m.parent / "slides" / "y.svs")]}


def test_manifest_row_for_a_slide_whose_metadata_cannot_be_read(tmp_path, monkeypatch):
    """A slide that opens but whose metadata then raises gets an error row (the build goes on) and
    is closed."""
    import proalign.slides.slide as slide_module

    closed = []

    class Unreadable:
        @property
        def info(self):
            raise KeyError("level 0")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(slide_module, "open_slide", lambda *a, **k: Unreadable())
    rows = build_manifest(paths=[_slide(tmp_path / "a.svs", 1)], workers=1)
    assert [(r["slide_id"], r["status"], r["error"]) for r in rows] == [("a", "error", "KeyError: 'level 0'")]
    assert closed == [True]


def test_embed_archive_embeds_one_file_per_slide_id(tmp_path, conch):
    """`embed --archive` with a.svs and sub/a.tif (both slide id `a`, different slides): a.svs (first
    in sorted path order) is embedded, sub/a.tif is listed in the report with a warning; the same
    with --cache-dir and two workers (the cache is keyed by slide id) and from a slide manifest."""
    arch = tmp_path / "archive"
    (arch / "sub").mkdir(parents=True)
    _slide(arch / "a.svs", 51)
    _slide(arch / "sub" / "a.tif", 52)
    _slide(arch / "b.svs", 53)
    build_manifest(arch, tmp_path / "m.csv", slide_mpp=0.5, workers=1)
    listing = ("--archive", arch, "--slide-mpp", "0.5")
    runs = {"manifest": ("--manifest", tmp_path / "m.csv"), "plain": listing,
            "cache": (*listing, "--cache-dir", tmp_path / "cache", "--workers", "2")}
    embedded = {}
    for name, args in runs.items():
        r = _embed(conch, tmp_path / f"{name}.lmdb", *args)
        assert r.returncode == 0, r.stderr
        rep = _report(r.stdout)
        assert sorted(rep["done"]) == ["a", "b"] and rep["duplicates"] == {"a": [str(arch / "sub" / "a.tif")]}
        assert "not embedded" in r.stderr and "a.tif" in r.stderr and "1 file(s) not embedded" in r.stdout
        with open_store(tmp_path / f"{name}.lmdb") as s:
            assert s.meta("a")["slide"]["path"] == str((arch / "a.svs").resolve())
            embedded[name] = s["a"].tobytes()
    assert embedded["manifest"] == embedded["plain"] == embedded["cache"]
    assert rep["cache"]["copied"] == 2 and rep["cache"]["fallback"] == {}
    assert _tree(tmp_path / "cache") == []


# -- --gpus --------------------------------------------------------------------------------------
def test_parse_gpus_and_worker_env():
    assert parse_gpus("0,1,2,3", 4) == [0, 1, 2, 3] and parse_gpus(" 2, 0 ", 4) == [2, 0]
    for text, msg in [("4", "no such GPU 4"), ("0,0", "listed twice"), ("-1", "no such GPU -1"),
                      ("a,b", "comma-separated"), (",", "no GPU listed")]:
        with pytest.raises(ValueError, match=msg):
            parse_gpus(text, 4)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        parse_gpus("0", 0)
    assert gpu_env([0, 1]) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    # this process sees GPUs 4 and 6 only: torch's GPU 1 is the machine's 6
    assert gpu_env([1, 0], "4,6") == [{"CUDA_VISIBLE_DEVICES": "6"}, {"CUDA_VISIBLE_DEVICES": "4"}]


def test_gpus_flag_on_the_slides_path(tmp_path, conch):
    import torch

    arch = tmp_path / "archive"
    arch.mkdir()
    _slide(arch / "s0.svs", 21)
    if not torch.cuda.is_available():
        r = _embed(conch, tmp_path / "s", "--archive", arch, extra=("--gpus", "0"))
        assert r.returncode == 2 and "--gpus 0: this machine has no CUDA GPU" in r.stderr
        assert not (tmp_path / "s").exists()
    r = _embed(conch, tmp_path / "s", "--archive", arch, extra=("--gpus", "0", "--device", "cpu"))
    assert r.returncode == 2 and "--device cpu" in r.stderr
    # the slides worker runs in its GPU's process with CUDA_VISIBLE_DEVICES, recorded per slide
    from proalign.pipeline.embed_slides import SlideOptions
    from proalign.pipeline.slide_worker import embed_archive

    weights, _, protos, over = conch
    rep = embed_archive(arch, "conch_v1", weights, protos, tmp_path / "g.lmdb", encoder_kwargs=over, device="cpu",
                        slide_options=SlideOptions(magnification=20, patch_size=128), gpus=["7"], progress=False)
    assert rep.ok and rep.scheduler == "processes" and rep.workers == 1
    with open_store(tmp_path / "g.lmdb") as s:
        assert s.meta("s0")["worker"]["cuda_visible_devices"] == "7"


# -- the local slide cache -----------------------------------------------------------------------
@dataclass(frozen=True)
class SpySpec(FeatureFileSpec):
    """The features worker, noting at each call what it was given and what the cache held."""
    spy: list | None = None
    cache: str = ""
    delay: float = 0.0

    def build(self):
        inner = FeatureFileSpec.build(self)

        def work(entry):
            time.sleep(self.delay)  # the copier gets ahead meanwhile
            held = [p for p in _files(Path(self.cache)) if ".part-" not in p.name]
            self.spy.append((entry.slide_id, Path(entry.path), getattr(entry, "source", None), held))
            return inner(entry)
        return work


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """Feature files in a folder standing in for network storage, a reference store without cache."""
    root = tmp_path_factory.mktemp("net")
    write_cohort(root / "nfs", n_slides=10, d=32, n_range=(200, 2000), g=4, seed=9)
    p = root / "p.safetensors"
    save_prototypes(p, np.random.default_rng(9).standard_normal((4, 32)).astype(np.float32), {})
    entries = list_feature_files(features=root / "nfs")
    spec = FeatureFileSpec(np.random.default_rng(9).standard_normal((4, 32)).astype(np.float32), str(p), EmbedOptions())
    rep = run_archive(entries, spec, root / "ref.lmdb", progress=False)
    assert rep.ok
    with open_store(root / "ref.lmdb") as s:
        ref = {sid: s[sid].tobytes() for sid in s}
    return entries, spec, ref


def _spy(spec, cache, delay=0.05):
    return SpySpec(spec.prototypes, spec.prototypes_path, spec.options, spy=[], cache=str(cache), delay=delay)


def _same(store, ref):
    with open_store(store) as s:
        assert {sid: s[sid].tobytes() for sid in s} == ref


@pytest.mark.parametrize("ahead", [0, 2])
def test_cache_reads_local_copies_bounded_ahead_and_removes_them(tmp_path, network, ahead):
    entries, spec, ref = network
    cache = tmp_path / "cache"
    spy = _spy(spec, cache)
    rep = run_archive(entries, spy, tmp_path / "s.lmdb", progress=False, cache_dir=cache, cache_ahead=ahead)
    assert rep.ok and len(rep.done) == len(entries)
    _same(tmp_path / "s.lmdb", ref)
    by_id = {e.slide_id: Path(e.path) for e in entries}
    prev = None
    counts = []
    for sid, path, source, held in spy.spy:
        assert path == cache_path(cache, sid, by_id[sid].name) and source == by_id[sid]  # the local copy
        assert path in held
        assert prev is None or prev not in held  # the last slide's copy went once it was stored
        assert len(held) <= ahead + 1  # the slide in use plus at most `ahead` copies
        counts.append(len(held))
        prev = path
    assert max(counts) == ahead + 1  # and the copier did get ahead
    # queue order: largest first, and the copies followed it
    assert [s for s, *_ in spy.spy] == [e.slide_id for e in sorted(entries, key=lambda e: -e.path.stat().st_size)]
    assert _tree(cache) == []  # every copy removed, and its folder
    c = rep.cache
    assert c["copied"] == c["deleted"] == len(entries) and c["fallback"] == {} and c["in_place"] == 0
    assert (1 <= c["peak_ahead"] <= ahead) if ahead else c["peak_ahead"] == 0
    assert c["bytes"] == sum(e.path.stat().st_size for e in entries)
    # the records' provenance names the feature files, not the deleted copies
    with open_store(tmp_path / "s.lmdb") as s:
        for sid in s:
            assert s.meta(sid)["feature_source"]["path"] == str(by_id[sid].resolve())
            assert s.meta(sid)["feature_source"]["read_from"] == "cache"


def test_cache_copy_failure_falls_back_to_the_original(tmp_path, network):
    entries, spec, ref = network
    cache = tmp_path / "cache"
    victim = entries[3]
    cache_path(cache, victim.slide_id, victim.path.name).mkdir(parents=True)  # the copy cannot land there
    spy = _spy(spec, cache, delay=0)
    rep = run_archive(entries, spy, tmp_path / "s.lmdb", progress=False, cache_dir=cache, cache_ahead=3)
    assert rep.ok and list(rep.cache["fallback"]) == [victim.slide_id]
    assert "read from the original path" in rep.summary()
    used = {sid: (path, source) for sid, path, source, _ in spy.spy}
    assert used[victim.slide_id] == (victim.path, None)  # the original, as listed
    assert all(src is not None for sid, (_, src) in used.items() if sid != victim.slide_id)
    _same(tmp_path / "s.lmdb", ref)
    assert rep.cache["copied"] == len(entries) - 1
    # no room: every slide read in place, the reason says why
    rep = run_archive(entries, _spy(spec, tmp_path / "c2", delay=0), tmp_path / "s2.lmdb", progress=False,
                      cache_dir=tmp_path / "c2", cache_min_free=1 << 62)
    assert rep.ok and len(rep.cache["fallback"]) == len(entries) and rep.cache["copied"] == 0
    assert all("free" in why for why in rep.cache["fallback"].values())
    assert _tree(tmp_path / "c2") == []  # no empty per-slide folder left behind
    _same(tmp_path / "s2.lmdb", ref)


def test_keep_cache_is_reused_and_ray_is_refused(tmp_path, network):
    entries, spec, ref = network
    cache = tmp_path / "cache"
    rep = run_archive(entries, spec, tmp_path / "s.lmdb", progress=False, cache_dir=cache, keep_cache=True)
    assert rep.ok and rep.cache["copied"] == len(entries) and len(_files(cache)) == len(entries)
    rep = run_archive(entries, spec, tmp_path / "s.lmdb", progress=False, cache_dir=cache, overwrite=True)
    assert rep.ok and rep.cache["reused"] == len(entries) and rep.cache["copied"] == 0
    assert _tree(cache) == []  # not kept this time
    _same(tmp_path / "s.lmdb", ref)
    with pytest.raises(ValueError, match="local scheduler"):
        run_archive(entries, spec, tmp_path / "r.lmdb", scheduler="ray", cache_dir=cache)


def test_cache_on_the_slides_cli(tmp_path, conch):
    """`embed --manifest --cache-dir`: two worker processes read local copies; provenance names the
    original slide; the cache is empty afterwards; features paths refuse --cache-dir."""
    arch = tmp_path / "nfs"
    arch.mkdir()
    for i in range(3):
        _slide(arch / f"s{i}.svs", 30 + i)
    m = tmp_path / "m.csv"
    build_manifest(arch, m, workers=1)
    cache = tmp_path / "cache"
    r = _embed(conch, tmp_path / "c.lmdb", "--manifest", m, extra=("--cache-dir", cache, "--cache-ahead", "1",
                                                                     "--workers", "2"))
    assert r.returncode == 0, r.stderr
    rep = _report(r.stdout)
    # the first copy is made while the workers start: it waits ahead
    assert rep["cache"]["copied"] == 3 and rep["cache"]["fallback"] == {} and rep["cache"]["peak_ahead"] == 1
    assert _tree(cache) == []
    with open_store(tmp_path / "c.lmdb") as s:
        for sid in ("s0", "s1", "s2"):
            assert s.meta(sid)["slide"]["path"] == str((arch / f"{sid}.svs").resolve())
            assert s.meta(sid)["slide"]["read_from"] == "cache"
    r = run_cli("embed", "--features", tmp_path, "--prototypes", conch[2], "--out", tmp_path / "f",
                "--cache-dir", cache)
    assert r.returncode == 2 and "--cache-dir is for slide files" in r.stderr


def test_manifest_pool_survives_a_crashing_reader(monkeypatch):
    """A reader that kills its pool process marks only its own slide; every other slide is probed,
    and only the slides in flight at a crash are probed alone: the rest go on in a fresh pool (not
    one new process per remaining slide)."""
    from _crash_probe import probe

    from proalign.slides import manifest

    started = []

    class CountingPool(manifest.ProcessPoolExecutor):
        def __init__(self, max_workers, **kw):
            started.append(max_workers)
            super().__init__(max_workers, **kw)

    monkeypatch.setattr(manifest, "ProcessPoolExecutor", CountingPool)
    crash = {2, 25}
    jobs = [(f"s{i}", f"/x/{'crash' if i in crash else 'ok'}{i}.svs", None) for i in range(40)]
    seen = []
    rows = manifest._probe_all(jobs, 2, probe, progress=lambda done, total: seen.append((done, total)))
    assert [r["slide_id"] for r in rows] == [j[0] for j in jobs]
    assert [i for i, r in enumerate(rows) if r["status"] != "ok"] == sorted(crash)
    assert all("crashed" in rows[i]["error"] for i in crash)
    # per crash: <= 4 slides in flight re-probed alone (a new process after the crasher), then a fresh pool
    assert sum(started) <= 2 + len(crash) * (1 + 1 + 2), started
    assert seen == [(n, len(jobs)) for n in range(1, len(jobs) + 1)]


def test_cache_hands_a_copy_only_to_its_own_file(tmp_path):
    """Two files under one slide id (defence in depth: the listing already drops duplicates): the
    other file reads its original, and its release leaves the first file's copy alone."""
    a, b = tmp_path / "nfs" / "s.svs", tmp_path / "nfs" / "sub" / "s.tif"
    b.parent.mkdir(parents=True)
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 2000)
    cache = SlideCache(tmp_path / "cache", ahead=1)
    try:
        cache.plan([FeatureFileEntry("s", a)])
        got_a = cache.take(FeatureFileEntry("s", a))
        assert got_a.path == cache_path(cache.dir, "s", "s.svs") and got_a.source == a
        got_b = cache.take(FeatureFileEntry("s", b))
        assert got_b == FeatureFileEntry("s", b) and str(a) in cache.fallback["s"]
        cache.release(FeatureFileEntry("s", b))
        assert got_a.path.read_bytes() == a.read_bytes()  # still there for a's worker
        cache.release(FeatureFileEntry("s", a))
        assert not got_a.path.exists()
    finally:
        cache.close()
    assert _tree(cache.dir) == []


def _take_within(cache, entry, seconds=20):
    """cache.take(entry) in a thread: what it returned, or a failure if it is still waiting."""
    out = []
    t = threading.Thread(target=lambda: out.append(cache.take(entry)), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"take() still waiting after {seconds} s"
    return out[0]


class _StatFailsCache(SlideCache):
    def _copy(self, entry):  # a "copy" that is not there: stat'ing it fails
        return self.dir / "missing" / Path(entry.path).name, False


class _DeadCopierCache(SlideCache):
    def _run(self):  # the copier thread ends at once, no copy made
        return


def test_cache_copier_failures_fall_back_to_the_original(tmp_path):
    """Whatever fails in the copier thread, take() does not wait for ever: an error after the copy
    fails that copy (reason recorded), a dead copier thread fails every copy."""
    src = tmp_path / "nfs" / "s.svs"
    src.parent.mkdir()
    src.write_bytes(b"x" * 1000)
    entry = FeatureFileEntry("s", src)
    for cls, why in [(_StatFailsCache, "FileNotFoundError"), (_DeadCopierCache, "copier thread stopped")]:
        cache = cls(tmp_path / cls.__name__, ahead=1)
        try:
            cache.plan([entry])
            assert _take_within(cache, entry) == entry
            assert why in cache.fallback["s"]
        finally:
            cache.close()


def test_cache_multi_file_slides_in_place_and_a_retry_clears_fallback(tmp_path, caplog):
    """MRXS (and DICOM, VMS, VMU) slides are read in place: counted, no warning, no fallback. A
    slide whose copy failed and whose retry's copy works is no longer listed as a fallback."""
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    mrxs, svs = nfs / "m.mrxs", nfs / "s.svs"
    mrxs.write_bytes(b"m" * 100)
    svs.write_bytes(b"s" * 1000)
    cache = SlideCache(tmp_path / "cache", ahead=2)
    blocker = cache_path(cache.dir, "s", "s.svs")
    blocker.mkdir(parents=True)  # the first copy cannot land
    try:
        cache.plan([FeatureFileEntry("m", mrxs), FeatureFileEntry("s", svs)])
        with caplog.at_level("WARNING", logger="proalign.embed"):
            assert cache.take(FeatureFileEntry("m", mrxs)) == FeatureFileEntry("m", mrxs)
        assert not caplog.records
        assert cache.take(FeatureFileEntry("s", svs)) == FeatureFileEntry("s", svs) and "s" in cache.fallback
        cache.release(FeatureFileEntry("s", svs))  # the try failed
        blocker.rmdir()
        retry = cache.take(FeatureFileEntry("s", svs))
        assert retry.path == blocker and retry.source == svs
        cache.release(FeatureFileEntry("s", svs))
    finally:
        cache.close()
    assert {k: cache.summary()[k] for k in ("in_place", "copied", "fallback")} == \
        {"in_place": 1, "copied": 1, "fallback": {}}
    assert _tree(cache.dir) == []


def test_results_are_stored_while_a_copy_is_made(tmp_path, network, monkeypatch):
    """Two worker processes, no copy ahead: the second slide's copy waits until the first slide's
    copy is deleted, which happens only once the first slide is stored: the run must store results
    (and check timeouts, in the same call) while it waits for a copy."""
    from proalign.pipeline import slide_cache

    entries, spec, ref = network
    cache = tmp_path / "cache"
    first, second = sorted(entries, key=lambda e: -e.path.stat().st_size)[:2]
    first_copy = cache_path(cache, first.slide_id, first.path.name)
    stored_meanwhile = []
    copy = slide_cache.SlideCache._copy

    def slow_copy(self, entry):
        if entry.slide_id == second.slide_id:
            end = time.monotonic() + 15
            while first_copy.exists() and time.monotonic() < end:
                time.sleep(0.02)
            stored_meanwhile.append(not first_copy.exists())
        return copy(self, entry)

    monkeypatch.setattr(slide_cache.SlideCache, "_copy", slow_copy)
    rep = run_archive(entries, spec, tmp_path / "s.lmdb", progress=False, cache_dir=cache, cache_ahead=0,
                      workers=2, slide_timeout=60)
    assert rep.ok and stored_meanwhile == [True]
    _same(tmp_path / "s.lmdb", ref)
