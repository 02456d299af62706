"""Archive scale (issue 6): kills and resumes, shards and merge, the local pool and Ray, faults.

Every check compares against one uninterrupted in-process run of the same cohort, bit for bit.
Slides have N <= 4000 rows so the numba backend splits them the same way whatever the thread
count of a worker (see worker.set_threads).
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import proalign
import proalign.defaults
from proalign.features import list_feature_files
from proalign.pipeline import FeatureFileSpec, embed_features, run_archive, select_shard, shard_of
from proalign.pipeline.executors import ProcessExecutor, WorkerStartError
from proalign.prototypes.io import read_prototype_file, save_prototypes
from proalign.store import merge_stores, open_store
from proalign.store.export import verify_store
from proalign.store.merge import StoreMergeError
from proalign.testing.synthetic_features import write_cohort

from conftest import run_cli

EXE = str(Path(sys.executable).parent / "proalign-engine")
TESTS = str(Path(__file__).parent)  # _crash_probe.FaultySpec: worker processes and Ray actors import it
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
N_SLIDES = 48


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """48 TRIDENT-style slides (N 200..4000, d 64), 4 prototypes, and a clean reference store."""
    root = tmp_path_factory.mktemp("archive")
    feats = root / "features"
    write_cohort(feats, n_slides=N_SLIDES, d=64, n_range=(200, 4000), g=4, seed=6)
    ppath = root / "p.safetensors"
    save_prototypes(ppath, np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32), {})
    clean = root / "clean.lmdb"
    rep = embed_features(list_feature_files(features=feats), ppath, clean, progress=False)
    assert rep.ok and len(rep.done) == N_SLIDES
    with open_store(clean) as s:
        ref = {sid: (s.record(sid).embedding.copy(), s.record(sid).n_patches) for sid in s}
    return feats, ppath, ref


def _embed_cmd(feats, ppath, out, *extra):
    return [EXE, "embed", "--features", str(feats), "--prototypes", str(ppath), "--out", str(out), "--no-progress",
            *map(str, extra)]


def _count(store) -> int:
    try:
        with open_store(store) as s:
            return len(s)
    except proalign.errors.StoreError:  # not created yet
        return 0


def _wait_for(store, n, proc, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _count(store) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {n} slides were stored")
        time.sleep(0.005)
    raise AssertionError(f"fewer than {n} slides stored after {timeout} s")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _workers_of(pid: int) -> list[int]:
    """The worker processes of a run: the children of its forkserver."""
    for c in _descendants(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in cmd:
            return _descendants(c)
    return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_equal_to_clean(store, ref, ids=None):
    ids = sorted(ref) if ids is None else sorted(ids)
    with open_store(store) as s:
        assert list(s) == ids
        assert verify_store(s) == {}
        for sid in ids:
            rec = s.record(sid)
            assert rec.n_patches == ref[sid][1]
            assert rec.embedding.dtype == ref[sid][0].dtype and rec.embedding.tobytes() == ref[sid][0].tobytes(), sid


def _report(stdout: str) -> dict:
    return json.loads(Path(stdout.split("report: ")[1].strip()).read_text())


def _faulty(ppath, **faults):
    """The features worker with faults (tests/_crash_probe.py: crash, load_s, broken, mislabel)."""
    from _crash_probe import FaultySpec

    return FaultySpec(FeatureFileSpec(read_prototype_file(ppath)[0], str(ppath)), **faults)


def _events(executor, n: int, timeout: float = 60.0) -> list:
    events, deadline = [], time.time() + timeout
    while len(events) < n:
        assert time.time() < deadline, f"{len(events)} of {n} events after {timeout} s"
        events += executor.wait(0.2)
    return events


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, cohort):
    """SIGKILL the writer three times at seeded random points (2 worker processes, in-process, 2
    workers); rerun: every slide stored exactly once, bit-identical to the uninterrupted run; no
    worker outlives its writer."""
    feats, ppath, ref = cohort
    out = tmp_path / "s.lmdb"
    rng = np.random.default_rng(20261126)
    stored = 0
    for kill in range(3):
        n_workers = 1 if kill == 1 else 2
        proc = subprocess.Popen(_embed_cmd(feats, ppath, out, "--workers", n_workers), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _wait_for(out, stored + int(rng.integers(1, 8)), proc)
            time.sleep(float(rng.uniform(0, 0.03)))
            workers = _workers_of(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.kill()
            proc.wait()
        assert bool(workers) == (n_workers > 1)
        deadline = time.time() + 15
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "workers outlived their killed writer"
        n = _count(out)
        assert stored <= n < N_SLIDES, f"kill {kill}: the run must be killed mid-way ({n} stored)"
        with open_store(out) as s:
            assert verify_store(s) == {}
        stored = n
    p = subprocess.run(_embed_cmd(feats, ppath, out), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"{N_SLIDES - stored} embedded, {stored} already stored, 0 failed" in p.stdout
    rep = _report(p.stdout)
    assert not set(rep["done"]) & set(rep["skipped"]) and len(rep["done"]) + len(rep["skipped"]) == N_SLIDES
    _assert_equal_to_clean(out, ref)


@pytest.mark.slow
def test_sigkill_workers_loses_only_their_slides(tmp_path, cohort):
    """SIGKILL both workers mid-run: their slides are retried (or requeued untried), nothing else is
    lost or redone."""
    feats, ppath, ref = cohort
    out = tmp_path / "s.lmdb"
    proc = subprocess.Popen(_embed_cmd(feats, ppath, out, "--workers", 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out, 3, proc)
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr
    rep = _report(stdout)
    assert rep["timing"]["worker_restarts"] >= 2 and not rep["failed"]
    # a worker is idle for well under 1% of the time; a slide whose worker died before starting it
    # (a loaded machine) is requeued untried instead of retried
    assert 1 <= len(rep["retried"]) + len(rep["requeued"]) <= 2, (rep["retried"], rep["requeued"])
    for reasons in rep["retried"].values():
        assert "worker process died (signal SIGKILL)" in reasons[0]
    assert sorted(rep["done"]) == sorted(ref)
    _assert_equal_to_clean(out, ref)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_and_exits_3(tmp_path, cohort):
    feats, ppath, ref = cohort
    out = tmp_path / "s.lmdb"
    proc = subprocess.Popen(_embed_cmd(feats, ppath, out, "--workers", 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out, 4, proc)
        workers = _workers_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, stderr
    assert time.time() - t0 < 15
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    rep = _report(stdout)
    assert rep["interrupted"] == "SIGTERM" and not rep["ok"] and rep["exit_code"] == 3
    assert 4 <= len(rep["done"]) < N_SLIDES and not rep["failed"]
    assert sorted(rep["done"] + rep["pending"]) == sorted(ref)
    # the slides in flight at the signal were finished and stored, and no other was started
    assert 1 <= len(rep["in_flight_at_stop"]) <= 2
    assert set(rep["in_flight_at_stop"]) <= set(rep["done"])
    assert set(rep["stored_after_stop"]) <= set(rep["in_flight_at_stop"])
    assert _count(out) == len(rep["done"])
    assert not any(_alive(w) for w in workers)
    p = subprocess.run(_embed_cmd(feats, ppath, out), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"{len(rep['pending'])} embedded, {len(rep['done'])} already stored" in p.stdout
    _assert_equal_to_clean(out, ref)


@pytest.mark.slow
def test_second_sigint_drops_the_slide_in_process(tmp_path, cohort):
    """In-process (--workers 1): SIGINT twice stops at once; whatever is stored is whole."""
    feats, ppath, ref = cohort
    out = tmp_path / "s.lmdb"
    proc = subprocess.Popen(_embed_cmd(feats, ppath, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out, 2, proc)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, stderr
    rep = _report(stdout)
    assert rep["interrupted"] == "SIGINT" and len(rep["done"]) < N_SLIDES
    assert sorted(rep["done"] + rep["pending"]) == sorted(ref)
    _assert_equal_to_clean(out, ref, rep["done"])


@pytest.mark.slow
def test_two_writers_on_one_store(tmp_path, cohort):
    """A second run on a store being written gets a clear error (exit 2) and writes nothing;
    readers go on; the first run completes and the store is whole."""
    feats, ppath, ref = cohort
    out = tmp_path / "s.lmdb"
    first = subprocess.Popen(_embed_cmd(feats, ppath, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for(out, 1, first)
        first.send_signal(signal.SIGSTOP)  # a slow writer: holds the store
        n = _count(out)
        second = subprocess.run(_embed_cmd(feats, ppath, out, "--workers", 2), capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"open for writing by another process (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        # (a merge into it and a salvage of it are refused the same way: test_store.py
        # test_second_writer_gets_a_clear_error)
        with open_store(out) as s:  # readers (this process) never block
            assert len(s) == n and verify_store(s) == {}
        assert _count(out) == n
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr
    assert f"{N_SLIDES} embedded" in stdout
    _assert_equal_to_clean(out, ref)


def test_corrupt_and_unreadable_slides_are_quarantined(tmp_path, cohort):
    """Every kind of bad feature file, in worker processes: each is tried twice, quarantined with its
    reason and named on stderr; every good slide is stored as in a clean run; a rerun (in-process)
    redoes nothing. (test_embed.py: a bad file among slides already stored, with --report.)"""
    feats, ppath, ref = cohort
    good = sorted(feats.iterdir())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.h5").write_bytes(good[0].read_bytes()[:700])
    (bad / "garbage.pt").write_bytes(np.random.default_rng(1).bytes(3000))
    (bad / "garbage2.pt").write_bytes(np.random.default_rng(17).bytes(3000))  # torch.load: IndexError
    with h5py.File(bad / "nan.h5", "w") as f:
        f["features"] = np.full((5, 64), np.nan, np.float32)
    with h5py.File(bad / "empty.h5", "w") as f:
        f["features"] = np.zeros((0, 64), np.float32)
    with h5py.File(bad / "wrongdim.h5", "w") as f:
        f["features"] = np.zeros((5, 48), np.float32)
    with h5py.File(bad / "nofeatures.h5", "w") as f:
        f["coords"] = np.zeros((5, 2))
    (bad / "folder.h5").mkdir()
    man = tmp_path / "m.csv"
    kinds = [("truncated", ".h5"), ("garbage", ".pt"), ("garbage2", ".pt"), ("nan", ".h5"), ("empty", ".h5"),
             ("wrongdim", ".h5"), ("nofeatures", ".h5"), ("folder", ".h5"), ("missing", ".h5")]
    rows = [f"{p.stem},{p}" for p in good] + [f"{n},{bad / (n + ext)}" for n, ext in kinds]
    man.write_text("slide_id,path\n" + "\n".join(rows) + "\n")
    out = tmp_path / "s.lmdb"
    cmd = ["embed", "--manifest", man, "--prototypes", ppath, "--out", out, "--workers", 2, "--no-progress"]
    p = run_cli(*cmd)
    assert p.returncode == 1, p.stderr
    rep = _report(p.stdout)
    assert sorted(rep["done"]) == sorted(ref) and not rep["retried"]
    q = rep["quarantine"]
    assert sorted(q) == sorted(n for n, _ in kinds)
    for sid, entry in q.items():
        assert entry["tries"] == 2 and len(entry["reasons"]) == 2 and Path(entry["path"]).stem == sid
        assert f"FAILED {sid}: " in p.stderr
    for sid in ("truncated", "garbage", "garbage2"):
        assert "unreadable" in q[sid]["reasons"][0] and "unreadable" in q[sid]["reasons"][1]
    assert "NaN or inf" in q["nan"]["reasons"][0] and "zero patches" in q["empty"]["reasons"][0]
    assert "feature dim 48 does not match the prototypes' dim 64" in q["wrongdim"]["reasons"][0]
    assert "no 'features' dataset" in q["nofeatures"]["reasons"][0]
    assert "file not found" in q["missing"]["reasons"][0] and "file not found" in q["folder"]["reasons"][0]
    _assert_equal_to_clean(out, ref)
    p = run_cli(*cmd[:-3], cmd[-1])  # in-process this time (one worker)
    assert p.returncode == 1 and f"0 embedded, {N_SLIDES} already stored, {len(kinds)} failed" in p.stdout


def test_shards_are_disjoint_complete_and_merge_to_a_single_run(tmp_path, cohort):
    feats, ppath, ref = cohort
    entries = list_feature_files(features=feats)
    parts = [{e.slide_id for e in select_shard(entries, i, 3)} for i in range(3)]
    assert all(parts) and set().union(*parts) == set(ref) and sum(map(len, parts)) == N_SLIDES
    # a stable hash: these values must never change, or running job arrays would split differently
    assert [shard_of(f"slide-{i}", 7) for i in range(8)] == [0, 4, 1, 1, 4, 3, 0, 0]
    assert [shard_of(s, 4) for s in ("TCGA-05-4244-01Z-00-DX1", "a")] == [1, 3]
    shards = []
    for i in range(3):
        s = tmp_path / f"shard{i}.lmdb"
        rep = embed_features(entries, ppath, s, progress=False, shard=f"{i}/3")
        assert set(rep.done) == parts[i] and rep.shard == f"{i}/3"
        shards.append(s)
    out = tmp_path / "merged.lmdb"
    p = subprocess.run([EXE, "store", "merge", out, *shards, shards[0]], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"{N_SLIDES} records added from 3 shard(s)" in p.stdout
    _assert_equal_to_clean(out, ref)
    # identical duplicates (a slide embedded on two nodes) are stored once
    again = tmp_path / "again.lmdb"
    embed_features(entries[:5], ppath, again, progress=False)
    rep = merge_stores(out, [again])
    assert rep.added == 0 and len(rep.duplicates) == 5 and rep.already_in_out == N_SLIDES
    _assert_equal_to_clean(out, ref)
    # other options or another prototype set: refused, naming what differs; OUT untouched
    other_tau = tmp_path / "tau.lmdb"
    embed_features(entries[:2], ppath, other_tau, proalign.pipeline.EmbedOptions(taus=(0.5,)), progress=False)
    p = subprocess.run([EXE, "store", "merge", tmp_path / "m2.lmdb", shards[0], other_tau], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "different options or prototype sets" in p.stderr
    taus = json.dumps(list(proalign.defaults.default_taus()))
    assert f"taus: {taus} vs [0.5]" in p.stderr
    other_protos = tmp_path / "p2.safetensors"
    save_prototypes(other_protos, np.ones((4, 64), np.float32), {})
    op = tmp_path / "protos.lmdb"
    embed_features(entries[:2], other_protos, op, progress=False)
    with pytest.raises(StoreMergeError, match="prototype set"):
        merge_stores(out, [op])
    # the same slide with a different embedding: refused, naming the slide
    bad = tmp_path / "conflict.lmdb"
    sid = sorted(ref)[7]
    with open_store(shards[shard_of(sid, 3)]) as s:
        rec = s.record(sid)
    with open_store(bad, write=True) as s:
        s.put(sid, rec.embedding + np.float16(1), rec.n_patches, rec.meta)
    with pytest.raises(StoreMergeError, match=f"slide '{sid}' is in .* with different embedding values"):
        merge_stores(tmp_path / "m3.lmdb", [*shards, bad])
    _assert_equal_to_clean(out, ref)


def test_one_worker_per_gpu(tmp_path, cohort):
    """gpus=[...]: one worker process per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES)."""
    feats, ppath, ref = cohort
    entries = list_feature_files(features=feats)[:8]
    rep = embed_features(entries, ppath, tmp_path / "s.lmdb", progress=False, gpus=["3", "5"])
    assert rep.ok and rep.workers == 2 and rep.scheduler == "processes"
    with open_store(tmp_path / "s.lmdb") as s:
        by_pid: dict[int, set[str]] = {}
        for sid in s:
            w = s.meta(sid)["worker"]
            by_pid.setdefault(w["pid"], set()).add(w["cuda_visible_devices"])
    # both GPUs' workers embedded slides (the first slide goes to each worker before any result is
    # read), and each worker process saw one GPU only, its own
    assert len(by_pid) == 2 and all(len(g) == 1 for g in by_pid.values()), by_pid
    assert sorted(g for gs in by_pid.values() for g in gs) == ["3", "5"], by_pid
    _assert_equal_to_clean(tmp_path / "s.lmdb", ref, [e.slide_id for e in entries])


@pytest.mark.slow
@pytest.mark.optional
def test_ray_backend_equals_local(tmp_path, cohort):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'proalign-engine[ray]')")
    feats, ppath, ref = cohort
    out = tmp_path / "ray.lmdb"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
    try:
        p = subprocess.run(_embed_cmd(feats, ppath, out, "--backend", "ray", "--workers", 2, "--ray-cpus", 0.5),
                           capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the Ray run did not finish in 150 s")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _report(p.stdout)
    assert rep["scheduler"] == "ray" and rep["workers"] == 2 and sorted(rep["done"]) == sorted(ref)
    with open_store(out) as s:
        assert len({s.meta(sid)["worker"]["pid"] for sid in s}) == 2  # both actors took slides
    _assert_equal_to_clean(out, ref)


def test_gpus_flag_is_checked(tmp_path):
    """--gpus names GPUs this machine has (none here): a clear usage error, exit 2, nothing written."""
    from conftest import run_cli

    r = run_cli("embed", "--features", str(tmp_path), "--prototypes", str(tmp_path / "p.safetensors"),
                "--out", str(tmp_path / "s"), "--gpus", "0,1")
    assert r.returncode == 2 and "--gpus 0,1: this machine has" in r.stderr
    r = run_cli("embed", "--features", str(tmp_path), "--prototypes", str(tmp_path / "p.safetensors"),
                "--out", str(tmp_path / "s"), "--gpus", "x")
    assert r.returncode == 2 and "comma-separated" in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_slide_timeout_runs_from_the_start_of_the_slide(tmp_path, cohort):
    """--slide-timeout counts from when a worker starts the slide, not from the submit: workers
    whose setup (4 s, a model being loaded) outlasts the timeout (3 s), at the start and after a
    crash replaced one, time out no slide; the crashing slide alone is quarantined."""
    feats, ppath, ref = cohort
    entries = list_feature_files(features=feats)[:6]
    crash = entries[0].slide_id
    out = tmp_path / "s.lmdb"
    rep = run_archive(entries, _faulty(ppath, load_s=4.0, crash=(crash,)), out, workers=2, slide_timeout=3.0,
                      progress=False)
    assert list(rep.failed) == [crash], rep.failed
    assert rep.quarantine[crash]["tries"] == 2
    assert all("worker process died (signal SIGKILL)" in r for r in rep.quarantine[crash]["reasons"])
    assert sorted(rep.done) == sorted(e.slide_id for e in entries[1:]) and not rep.retried
    assert rep.timing["worker_restarts"] == 2
    _assert_equal_to_clean(out, ref, rep.done)


def test_worker_start_error_delivers_the_results_already_read(tmp_path, cohort):
    """A replacement worker whose setup fails: the wait() that reads its error still returns the
    other worker's result read in the same call (stored, not embedded again); the next wait()
    raises WorkerStartError with the setup error."""
    feats, ppath, _ = cohort
    e = list_feature_files(features=feats)[:3]
    ex = ProcessExecutor(_faulty(ppath, crash=(e[0].slide_id,), broken=str(tmp_path / "broken")), 2)
    try:
        ex.submit(1, e[1])  # worker 1 is set up and warm
        assert [ev.result.slide_id for ev in _events(ex, 1)] == [e[1].slide_id]
        ex.submit(0, e[0])  # kills worker 0; its replacement cannot start
        (died,) = _events(ex, 1)
        assert died.slot == 0 and died.died and "signal SIGKILL" in died.error
        deadline = time.time() + 60
        while ex.procs[0].is_alive() and time.time() < deadline:  # the replacement's setup failed
            time.sleep(0.05)
        ex.submit(1, e[2])
        while not ex.conns[1].poll() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # worker 1's result is in the pipe, next to worker 0's setup error
        events = ex.wait(0)
        assert [(ev.slot, ev.result.slide_id) for ev in events] == [(1, e[2].slide_id)]
        with pytest.raises(WorkerStartError, match="a worker could not start: RuntimeError: model weights unreadable"):
            ex.wait(0)
    finally:
        ex.close(drop=True)


def test_a_record_naming_another_slide_is_not_stored(tmp_path, cohort):
    feats, ppath, ref = cohort
    entries = list_feature_files(features=feats)[:4]
    bad = entries[1].slide_id
    out = tmp_path / "s.lmdb"
    rep = run_archive(entries, _faulty(ppath, mislabel=(bad,)), out, progress=False)
    assert list(rep.failed) == [bad] and rep.quarantine[bad]["tries"] == 2
    assert rep.failed[bad] == f"the worker returned a record for slide '{bad}-other' instead of '{bad}'; not stored"
    _assert_equal_to_clean(out, ref, [e.slide_id for e in entries if e.slide_id != bad])


@pytest.mark.slow
def test_full_disk_stops_the_run_and_a_rerun_finishes(tmp_path, cohort):
    """The writer may not grow the store (ulimit -f, as a full disk): each refused write names the
    slide and the cause; after 3 slides in a row
    could not be stored the run stops (exit 3) naming the store and the error, instead of
    embedding and quarantining every remaining slide; what is stored stays; a rerun finishes."""
    feats, ppath, ref = cohort
    out = tmp_path / "s.lmdb"
    embed_features(list_feature_files(features=feats)[:10], ppath, out, progress=False)
    limit_kib = (out / "data.mdb").stat().st_size // 1024
    cmd = shlex.join(_embed_cmd(feats, ppath, out, "--workers", 2))
    p = subprocess.run(["bash", "-c", f"ulimit -f {limit_kib} && exec {cmd}"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    rep = _report(p.stdout)
    why = rep["aborted"]
    assert why.startswith(f"3 slides in a row could not be stored in {out} (the disk may be full): store {out}: "), why
    assert why.endswith("; records already stored are intact; rerun the same command to finish"), why
    # the store's own error names the cause and the slide it could not write (one not stored)
    refused = re.search(r"(the disk is full or the file size limit was reached|write failed) while writing slide "
                        r"'([^']+)' \(", why)
    assert refused and refused.group(2) in rep["pending"], why
    assert why in p.stderr and why in p.stdout and rep["exit_code"] == 3 and not rep["ok"]
    assert not rep["failed"] and len(rep["done"]) < N_SLIDES - 10 and len(rep["pending"]) >= 3
    assert sorted(rep["done"] + rep["pending"]) == sorted(set(ref) - set(rep["skipped"]))
    assert _count(out) == 10 + len(rep["done"])
    with open_store(out) as s:
        assert verify_store(s) == {}
    p = subprocess.run(_embed_cmd(feats, ppath, out), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{len(rep['pending'])} embedded, {10 + len(rep['done'])} already stored, 0 failed" in p.stdout
    _assert_equal_to_clean(out, ref)


RAY_FAULTS = """
import json, sys
from pathlib import Path

import ray

from _crash_probe import FaultySpec
from proalign.features import list_feature_files
from proalign.pipeline import FeatureFileSpec, run_archive
from proalign.pipeline.executors import WorkerStartError
from proalign.prototypes.io import read_prototype_file

feats, ppath, tmp = map(Path, sys.argv[1:])
base = FeatureFileSpec(read_prototype_file(ppath)[0], str(ppath))
entries = sorted(list_feature_files(features=feats), key=lambda e: -Path(e.path).stat().st_size)[:4]  # queue order
crash = entries[0].slide_id
ray.init(include_dashboard=False, log_to_driver=False)
kw = dict(scheduler="ray", workers=2, ray_cpus=0.5, progress=False)
out = {"order": [e.slide_id for e in entries]}
out["a"] = run_archive(entries, FaultySpec(base, crash=(crash,)), tmp / "a.lmdb", **kw).__dict__
try:
    run_archive(entries, FaultySpec(base, crash=(crash,), broken=str(tmp / "broken")), tmp / "b.lmdb",
                report_path=tmp / "b.json", **kw)
except WorkerStartError as e:
    out["b_error"] = str(e)
out["b"] = json.loads((tmp / "b.json").read_text())
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.optional
def test_ray_actor_death_costs_only_its_current_slide(tmp_path, cohort):
    """2 Ray actors, 2 slides each in flight. The largest slide kills its actor: it loses a try
    each time and is quarantined; the slide queued behind it on that actor never started, so it
    is put back untried (requeued) and stored, no try lost. Then a replacement actor that cannot
    set up: the run stops with WorkerStartError naming the setup error, and no healthy slide
    used up a try on it."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'proalign-engine[ray]')")
    feats, ppath, ref = cohort
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([sys.executable, "-c", RAY_FAULTS, str(feats), str(ppath), str(tmp_path)],
                           capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the Ray runs did not finish in 240 s")
    assert p.returncode == 0 and "RESULT " in p.stdout, p.stderr[-3000:]
    out = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    q = out["order"]  # actor 0 gets q[0] then q[2]; actor 1 gets q[1] then q[3]
    a = out["a"]
    assert list(a["failed"]) == [q[0]] and a["quarantine"][q[0]]["tries"] == 2
    assert all(r.startswith("Ray actor died while embedding this slide") for r in a["quarantine"][q[0]]["reasons"])
    assert sorted(a["done"]) == sorted(q[1:]) and not a["retried"]
    assert q[2] in a["requeued"] and q[0] not in a["requeued"]
    _assert_equal_to_clean(tmp_path / "a.lmdb", ref, q[1:])
    assert out.get("b_error", "").startswith("a Ray actor could not start: RuntimeError: model weights unreadable")
    b = out["b"]
    assert not b["failed"] and not b["retried"] and q[0] in b["pending"]
    assert sorted(b["done"] + b["pending"]) == sorted(q)
