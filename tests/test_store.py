"""The LMDB store: records, map growth, one writer, verify, exports, a full disk."""
import json
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
from proalign.store import lmdb_store, open_store
from proalign.store.export import export_store, verify_store


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
    path = tmp_path / "s.lmdb"
    _fill(path, rng, n=1)
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
        with open_store(path) as reader:  # readers are never blocked
            assert len(reader) == 1
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


def test_full_disk_keeps_stored_records(tmp_path, rng):
    """A write that the file system refuses (file size limit, like a full disk) fails that slide
    with a clear error; every record stored before stays readable."""
    path = tmp_path / "s.lmdb"
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np, proalign
        from proalign.errors import StoreWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        s = proalign.open_store({str(path)!r}, write=True)
        s.put("small", np.ones(4, np.float32), 1, {{}})
        s.env.sync(True)
        size = __import__("os").path.getsize({str(path / "data.mdb")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        try:
            s.put("big", np.ones(2_000_000, np.float32), 1, {{}})
        except StoreWriteError as e:
            print("REFUSED", e)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "REFUSED" in p.stdout and "big" in p.stdout and "intact" in p.stdout, p.stdout + p.stderr
    with open_store(path) as s:
        assert list(s) == ["small"]
        np.testing.assert_array_equal(s["small"], np.ones(4, np.float32))
        assert verify_store(s) == {}
