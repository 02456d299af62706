"""The LMDB store: records, map growth, one writer, verify, exports (a full disk mid-run: test_archive.py)."""
import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import h5py
import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest

import proalign
from proalign.errors import StoreError, StoreLockedError
from proalign.store import lmdb_store, merge_stores, open_store
from proalign.store.export import export_store, verify_store
from proalign.store.merge import StoreMergeError


def _fill(path, rng, n=5, shape=(20,)):
    want = {}
    with open_store(path, write=True) as s:
        for i in range(n):
            e = rng.standard_normal(shape).astype(np.float16)
            s.put(f"slide-{i}", e, n_patches=10 + i, meta={"method": "proalign", "i": i})
            want[f"slide-{i}"] = e
    return want


def test_records_round_trip(tmp_path, rng):
    want = _fill(tmp_path / "s.lmdb", rng)
    s = proalign.open_store(tmp_path / "s.lmdb")
    assert len(s) == 5 and "slide-3" in s and "nope" not in s and list(s) == sorted(want)
    for sid, e in want.items():
        np.testing.assert_array_equal(s[sid], e)
    assert s.meta("slide-2") == {"method": "proalign", "i": 2, "n_patches": 12}
    with pytest.raises(KeyError):
        s["nope"]
    s.close()


def test_map_grows_when_full(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(lmdb_store, "INITIAL_MAP_SIZE", 1 << 20)
    want = _fill(tmp_path / "s.lmdb", rng, n=40, shape=(8208,))  # 40 x 16 KiB > 1 MiB
    with open_store(tmp_path / "s.lmdb") as s:
        assert len(s) == 40
        np.testing.assert_array_equal(s["slide-39"], want["slide-39"])


def test_second_writer_gets_a_clear_error(tmp_path, rng):
    """A store held by a writer in another process: a second writer, a merge into it and a salvage
    of it are refused naming that process; readers are never blocked; the lock dies with its process.
    (The CLI's side, exit 2 and the first run finishing, is test_archive's test_two_writers_on_one_store.)"""
    from proalign.store.salvage import salvage_store

    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=1)
    with open_store(tmp_path / "x.lmdb", write=True) as x:
        x.put("zz", np.zeros(3, np.float16), 1, {})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, proalign
        s = proalign.open_store({str(path)!r}, write=True)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            open_store(path, write=True)
        with pytest.raises(StoreLockedError, match="open for writing by another process"):
            merge_stores(path, [tmp_path / "x.lmdb"])  # a merge into it gets the same error
        with pytest.raises(StoreError, match=rf"is being written by a run \(pid {holder.pid}\)"):
            salvage_store(path, tmp_path / "new")
        assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.salvage-*"))
        with open_store(path) as reader:  # readers are never blocked
            assert len(reader) == 1 and verify_store(reader) == {}
    finally:
        holder.kill()
        holder.wait()
    open_store(path, write=True).close()  # the lock dies with its process


def test_verify_finds_damaged_records(tmp_path, rng):
    path = tmp_path / "s.lmdb"
    want = _fill(path, rng, n=3)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        good = bytearray(txn.get(b"slide-1"))
        good[-1] ^= 0xFF  # flip a bit of the embedding
        txn.put(b"slide-1", bytes(good))
        txn.put(b"slide-2", b"garbage")
    env.close()
    with open_store(path) as s:
        problems = verify_store(s)
        np.testing.assert_array_equal(s["slide-0"], want["slide-0"])
    assert set(problems) == {"slide-1", "slide-2"}
    assert "checksum" in problems["slide-1"] and "bad magic" in problems["slide-2"]


def test_exports(tmp_path, rng):
    path = tmp_path / "s.lmdb"
    want = _fill(path, rng, n=4, shape=(2, 6))
    with open_store(path) as s:
        export_store(s, "npy", tmp_path / "e.npy")
        export_store(s, "parquet", tmp_path / "e.parquet")
        export_store(s, "h5", tmp_path / "slide_features")
    arr = np.load(tmp_path / "e.npy")
    ids = (tmp_path / "e.ids.txt").read_text().split()
    assert arr.shape == (4, 2, 6) and ids == sorted(want)
    for i, sid in enumerate(ids):
        np.testing.assert_array_equal(arr[i], want[sid].astype(np.float32))
    t = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert t["slide_id"] == ids and t["n_patches"] == [10, 11, 12, 13]
    np.testing.assert_array_equal(np.array(t["embedding"][2]).reshape(t["shape"][2]), want["slide-2"])
    assert json.loads(t["meta"][0])["method"] == "proalign"
    with h5py.File(tmp_path / "slide_features" / "slide-3.h5") as f:
        np.testing.assert_array_equal(f["features"][()], want["slide-3"].astype(np.float32))
        assert f["features"].attrs["n_patches"] == 13


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        open_store(tmp_path / "absent.lmdb")


# A write the file system refuses (a full disk) mid-run: test_archive.py
# test_full_disk_stops_the_run_and_a_rerun_finishes (the store's error, the records kept, the rerun).


# -- review fixes ------------------------------------------------------------------------------

def test_open_reader_follows_map_growth_by_another_process(tmp_path, monkeypatch):
    """A reader opened before another process's writer grows the map keeps reading (LMDB says
    MapResizedError until the reader adopts the new size)."""
    monkeypatch.setattr(lmdb_store, "INITIAL_MAP_SIZE", 1 << 20)
    path = tmp_path / "s.lmdb"
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, numpy as np, proalign
        from proalign.store import lmdb_store
        lmdb_store.INITIAL_MAP_SIZE = 1 << 20
        s = proalign.open_store({str(path)!r}, write=True)
        s.put("first", np.zeros(4, np.float32), 1, {{}})
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(48):  # 48 x 64 KiB: the 1 MiB map doubles twice
            s.put(f"slide-{{i:02d}}", np.full(16384, i, np.float32), i, {{}})
        print("grown", s.env.info()["map_size"], flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        with open_store(path) as reader:
            assert list(reader) == ["first"]
            writer.stdin.write("go\n")
            writer.stdin.flush()
            grown = writer.stdout.readline().split()
            assert grown[0] == "grown" and int(grown[1]) > 1 << 20
            np.testing.assert_array_equal(reader["slide-47"], np.full(16384, 47, np.float32))
            assert len(reader) == 49 and "slide-00" in reader and len(list(reader)) == 49
            assert [sid for sid, _ in reader.items()][-1] == "slide-47"
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)


def _pages(path):
    """(page number, flags) of each page of data.mdb: LMDB page header = pgno u64, pad u16, flags u16."""
    data = (path / "data.mdb").read_bytes()
    return [(i, int.from_bytes(data[i * 4096 + 10:i * 4096 + 12], "little")) for i in range(2, len(data) // 4096)]


def test_verify_reports_a_truncated_file(tmp_path, rng, cli):
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=200, shape=(200,))
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    p = cli("store", "verify", path, check=1)  # before the fix: killed by SIGBUS
    assert "truncated" in p.stderr and str(data) in p.stderr
    with open_store(path) as s:
        problems = verify_store(s)
    assert list(problems) == [str(data)] and "truncated" in problems[str(data)]


@pytest.mark.parametrize("which", ["branch", "middle leaf"])
def test_verify_reports_a_zeroed_page(tmp_path, rng, cli, which):
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=400, shape=(100,))
    pages = _pages(path)
    P_BRANCH, P_LEAF = 1, 2
    if which == "branch":
        page = next(i for i, flags in pages if flags == P_BRANCH)
    else:
        leaves = [i for i, flags in pages if flags == P_LEAF]
        page = leaves[len(leaves) // 2]
    with open(path / "data.mdb", "r+b") as f:
        f.seek(page * 4096)
        f.write(bytes(4096))
    data = str(path / "data.mdb")
    p = cli("store", "verify", path, check=1)  # before the fix: lmdb.CorruptedError, or LMDB aborts
    assert "damaged" in p.stderr and data in p.stderr
    with open_store(path) as s:
        problems = verify_store(s)
    assert data in problems and "damaged" in problems[data], problems
    if which == "branch":  # other reads: a StoreError naming the store, not a raw lmdb error
        with open_store(path) as s, pytest.raises(StoreError, match=re.escape(str(path))):
            s["slide-0"]


def _value(header, body=bytes(8)):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return lmdb_store.MAGIC + struct.pack("<I", len(h)) + h + body


GOOD = {"dtype": "<f4", "shape": [2], "n_patches": 3, "crc32": 0, "meta": {}}


@pytest.mark.parametrize("value, why", [
    (b"PAE1\x05", "too short"),
    (lmdb_store.MAGIC + struct.pack("<I", 999) + b"{}", "header length"),
    (_value(b"[]"), "not a JSON object"),
    (_value({"dtype": "<f4"}), "missing shape, n_patches, crc32, meta"),
    (_value({**GOOD, "dtype": "nonsense"}), "bad dtype"),
    (_value({**GOOD, "dtype": "|O"}), "bad dtype"),
    (_value({**GOOD, "shape": ["a"]}), "bad shape"),
    (_value({**GOOD, "shape": [-1]}), "bad shape"),
    (_value({**GOOD, "n_patches": "x"}), "bad n_patches"),
    (_value({**GOOD, "meta": 5}), "bad meta"),
    (_value(GOOD, bytes(5)), "5 bytes of data"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_malformed_record_is_a_store_error(tmp_path, rng, value, why):
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=1)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"bad", value)
    env.close()
    with open_store(path) as s:
        with pytest.raises(StoreError, match=f"{re.escape(str(path))}: record 'bad': .*{why}"):
            s.record("bad")
        assert set(verify_store(s)) == {"bad"}
    with pytest.raises(StoreMergeError, match=f"{re.escape(str(path))}: record 'bad'"):
        merge_stores(tmp_path / "out.lmdb", [path])
    assert not (tmp_path / "out.lmdb").exists()


def test_exports_name_the_real_file(tmp_path, rng):
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=2)
    with open_store(path) as s:
        written = export_store(s, "npy", tmp_path / "emb")
    assert written == [tmp_path / "emb.npy", tmp_path / "emb.ids.txt"]
    assert np.load(written[0]).shape == (2, 20) and written[1].read_text().split() == ["slide-0", "slide-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.ids.txt", "emb.npy", "s.lmdb"]


def test_failed_exports_leave_no_partial_files(tmp_path, rng):
    """A write the file system refuses (file size limit, like a full disk) leaves the earlier
    outputs as they were and no temp files."""
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=4, shape=(64, 1024))  # 256 KiB per slide as float32
    out = tmp_path / "out"
    out.mkdir()
    (out / "slide_features").mkdir()
    old = {"e.npy": "old", "e.ids.txt": "old", "e.parquet": "old", "slide_features/slide-0.h5": "old"}
    for name, text in old.items():
        (out / name).write_text(text)
    script = textwrap.dedent(f"""
        import resource, signal, proalign
        from pathlib import Path
        from proalign.store.export import export_store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        out = Path({str(out)!r})
        with proalign.open_store({str(path)!r}) as s:
            for fmt, name in (("npy", "e.npy"), ("parquet", "e.parquet"), ("h5", "slide_features")):
                try:
                    export_store(s, fmt, out / name)
                    print(fmt, "WROTE")
                except Exception as e:
                    print(fmt, "FAILED", type(e).__name__)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.stdout.count("FAILED") == 3, p.stdout + p.stderr
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert files == sorted(old), files  # no temp file left behind
    for name, text in old.items():
        assert (out / name).read_text() == text


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "..", ".", "back\\slash", "nul\0byte"])
def test_h5_export_refuses_unsafe_slide_ids(tmp_path, rng, bad_id):
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=2)
    with open_store(path, write=True) as s:
        s.put(bad_id, np.ones(3, np.float32), 1, {})
    with open_store(path) as s, pytest.raises(StoreError, match=re.escape(repr(bad_id))):
        export_store(s, "h5", tmp_path / "out" / "slide_features")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.h5"))
    assert not (tmp_path / "evil.h5").exists()


def test_failed_map_growth_is_a_store_error(tmp_path):
    """When the map cannot grow (here: the address-space limit makes the new mmap fail), the write
    fails with a StoreWriteError naming the store; earlier records stay readable."""
    path = tmp_path / "s.lmdb"
    script = textwrap.dedent(f"""
        import resource, numpy as np, proalign
        from proalign.errors import StoreWriteError
        from proalign.store import lmdb_store
        lmdb_store.INITIAL_MAP_SIZE = 4 << 20
        s = proalign.open_store({str(path)!r}, write=True)
        values = [np.full(16384, i, np.float32) for i in range(80)]  # 64 KiB each: 4 MiB is full at ~60
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        # room for the puts, not for the doubled map (+4 MiB once the old map is unmapped)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 20), resource.RLIM_INFINITY))
        try:
            for i, v in enumerate(values):
                s.put(f"slide-{{i:02d}}", v, 1, {{}})
            print("NO FAILURE")
        except StoreWriteError as e:
            print("REFUSED", i, e)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "REFUSED" in p.stdout and "disk may be full" in p.stdout and str(path) in p.stdout, p.stdout + p.stderr
    n = int(p.stdout.split()[1])
    with open_store(path) as s:
        assert len(s) == n and verify_store(s) == {}


def test_refused_merge_does_not_create_out(tmp_path, rng):
    a, b = tmp_path / "a.lmdb", tmp_path / "b.lmdb"
    with open_store(a, write=True) as s:
        s.put("x", np.ones(3, np.float32), 1, {"options": {"tau": 0.1}})
    with open_store(b, write=True) as s:
        s.put("y", np.ones(3, np.float32), 1, {"options": {"tau": 0.5}})
    with pytest.raises(StoreMergeError, match="different options"):
        merge_stores(tmp_path / "new.lmdb", [a, b])
    assert not (tmp_path / "new.lmdb").exists()
    (tmp_path / "empty").mkdir()  # an existing folder without a store stays empty
    with pytest.raises(StoreMergeError):
        merge_stores(tmp_path / "empty", [a, b])
    assert list((tmp_path / "empty").iterdir()) == []
    merge_stores(tmp_path / "ok.lmdb", [a])
    with open_store(tmp_path / "ok.lmdb") as s:
        assert list(s) == ["x"]


MOUNTINFO = textwrap.dedent(r"""
    22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
    40 22 0:35 / /data rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
    41 40 8:17 / /data/local rw,relatime - xfs /dev/sdb1 rw
    42 22 0:36 / /scratch rw,relatime shared:5 master:2 - lustre 10.0.0.1@o2ib:/fs rw
    43 22 0:37 / /mnt/my\040share rw - cifs //srv/share rw
    44 22 0:38 / /gpfs rw - gpfs gpfs0 rw
    45 22 0:39 / /beegfs rw - beegfs beegfs_nodev rw
    46 22 0:40 / /ceph rw - ceph 10.0.0.2:/ rw
    47 22 0:41 / /cephfuse rw - fuse.ceph-fuse ceph-fuse rw
    48 22 0:42 / /smb rw - smb3 //srv/x rw
    49 22 0:43 / /tmp rw - tmpfs tmpfs rw
""")


@pytest.mark.parametrize("path, fstype", [
    ("/data/run/s.lmdb", "nfs4"), ("/data", "nfs4"), ("/data/local/s.lmdb", None), ("/datax/s.lmdb", None),
    ("/scratch/a/b", "lustre"), ("/mnt/my share/s.lmdb", "cifs"), ("/gpfs/s", "gpfs"), ("/beegfs/s", "beegfs"),
    ("/ceph/s", "ceph"), ("/cephfuse/s", "fuse.ceph-fuse"), ("/smb/s", "smb3"), ("/tmp/s.lmdb", None),
    ("/home/u/s.lmdb", None),
])
def test_network_filesystem_detection(path, fstype):
    assert lmdb_store.network_fs_type(path, MOUNTINFO) == fstype


def test_writer_refused_on_network_filesystem(tmp_path, rng, monkeypatch):
    assert lmdb_store.network_filesystem(tmp_path) is None  # the real local tmp dir is accepted
    _fill(tmp_path / "local.lmdb", rng, n=1)
    monkeypatch.setattr(lmdb_store, "network_filesystem", lambda p: "nfs4")
    monkeypatch.delenv("PROALIGN_ALLOW_NETWORK_STORE", raising=False)
    with pytest.raises(StoreError, match=r"network file system \(nfs4\).*locks.*store merge.*"
                                         r"PROALIGN_ALLOW_NETWORK_STORE=1"):
        open_store(tmp_path / "s.lmdb", write=True)
    assert not (tmp_path / "s.lmdb").exists()
    with open_store(tmp_path / "local.lmdb") as s:  # readers are not refused
        assert len(s) == 1
    monkeypatch.setenv("PROALIGN_ALLOW_NETWORK_STORE", "1")
    open_store(tmp_path / "s.lmdb", write=True).close()
