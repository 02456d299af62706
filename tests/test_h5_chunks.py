"""The fast reader of row-chunked HDF5 datasets (features/h5_chunks.py) against h5py's own reader,
on fresh random files of every layout; both implementations (numba, numpy) and every chunk lister."""
from __future__ import annotations

import ctypes
import os

import h5py
import numpy as np
import pytest

from proalign.errors import FeatureFileError
from proalign.features import h5_chunks
from proalign.features.h5_chunks import MAX_GAP_BYTES, chunk_index, compiled_unavailable, read_row_chunked
from proalign.features.io import read_features
from proalign.testing.synthetic_features import write_clam_h5, write_trident_h5

ENGINES = [pytest.param(True, id="numba", marks=pytest.mark.skipif(
               compiled_unavailable() is not None, reason=f"numba path unavailable: {compiled_unavailable()}")),
           pytest.param(False, id="numpy")]


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy  # fresh files each run; the seed is in any failure
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _grown(path, n, d, dtype, batch, rng, **file_kw):
    """Features and coords grown batch by batch with one-row chunks, as CLAM writes them (and
    TRIDENT's batch writer): the two datasets' chunks interleave in the file."""
    with h5py.File(path, "w", **file_kw) as f:
        feats = f.create_dataset("features", shape=(0, d), maxshape=(None, d), chunks=(1, d), dtype=dtype)
        coords = f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), chunks=(1, 2), dtype=np.int64)
        for s in range(0, n, batch):
            m = min(batch, n - s)
            feats.resize(s + m, axis=0)
            feats[s:] = rng.standard_normal((m, d)).astype(dtype)
            coords.resize(s + m, axis=0)
            coords[s:] = rng.integers(0, 100_000, (m, 2))


def _same(ds, compiled, index="auto", source=None):
    fast = read_row_chunked(ds, compiled=compiled, index=index)
    ref = ds[()]
    assert fast is not None, (ds.name, index)
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    assert np.array_equal(fast, ref), (ds.name, index)
    if source is not None:
        assert chunk_index(ds, index, compiled=compiled).source == source


@pytest.mark.parametrize("compiled", ENGINES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, ">f4", np.float64])
def test_interleaved_layout_equals_h5py(tmp_path, rng, dtype, compiled):
    n, d = int(rng.integers(300, 900)), int(rng.integers(300, 600))
    batch = int(rng.integers(128, 328))
    assert batch * d * np.dtype(dtype).itemsize > MAX_GAP_BYTES  # coords come back in several reads
    path = tmp_path / "slide.h5"
    _grown(path, n, d, dtype, batch, rng)
    with h5py.File(path, "r") as f:
        for name in ("features", "coords"):
            _same(f[name], compiled, source="btree1")
            for index in h5_chunks.INDEX_SOURCES if compiled else ("btree1", "h5py"):
                _same(f[name], compiled, index, source=index)
        ref_f, ref_c = f["features"][()], f["coords"][()]
    ff = read_features(path)
    assert np.array_equal(ff.features, ref_f) and np.array_equal(ff.coords, ref_c)


@pytest.mark.parametrize("compiled", ENGINES)
def test_synthetic_writers(tmp_path, rng, compiled):
    """The benchmark's files: TRIDENT (each dataset written whole) and CLAM (batches)."""
    n, d = int(rng.integers(2000, 6000)), 64
    x = rng.standard_normal((n, d)).astype(np.float16)
    xy = rng.integers(0, 10**5, (n, 2))
    write_trident_h5(tmp_path / "t.h5", x, xy)
    write_clam_h5(tmp_path / "c.h5", x.astype(np.float32), xy, batch=int(rng.integers(50, 700)))
    for name in ("t.h5", "c.h5"):
        with h5py.File(tmp_path / name, "r") as f:
            _same(f["features"], compiled, source="btree1")
            _same(f["coords"], compiled, source="btree1")


@pytest.mark.parametrize("compiled", ENGINES)
def test_batch_axis_and_multi_row_chunks(tmp_path, rng, compiled):
    a = rng.standard_normal((1, 503, 64)).astype(np.float32)
    b = rng.standard_normal((1001, 40)).astype(np.float16)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("features", data=a, chunks=(1, 1, 64))
        f.create_dataset("rows7", data=b, chunks=(7, 40))  # 1001 = 143 * 7
        f.create_dataset("rows13", data=b, chunks=(13, 40))  # 1001 = 77 * 13
        f.create_dataset("odd", data=a[0], chunks=(9, 64))  # 503 = 55 * 9 + 8: the last chunk is partial
        f.create_dataset("batch_odd", data=a, chunks=(1, 10, 64), maxshape=(1, None, 64))  # partial, (1, N, d)
        f.create_dataset("ints", data=rng.integers(-9, 9, (77, 3)).astype(np.int16), chunks=(2, 3))
        f.create_dataset("one_chunk", data=b[:5], chunks=(8, 40), maxshape=(None, 40))  # 5 rows of a chunk of 8
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for name in ("features", "rows7", "rows13", "odd", "batch_odd", "ints", "one_chunk"):
            _same(f[name], compiled, source="btree1")
            _same(f[name], compiled, index="h5py")


@pytest.mark.parametrize("compiled", ENGINES)
def test_chunks_out_of_row_order(tmp_path, rng, compiled):
    """Rows written in a random order: chunks lie in the file in that order (every one its own
    piece: more than one preadv's 1,024 pieces), and 3 chunks per row block in another dataset."""
    n, d = 1500, 8
    x = rng.standard_normal((n, d)).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("features", shape=(n, d), chunks=(1, d), dtype=np.float32)
        three = f.create_dataset("three", shape=(n, d), chunks=(3, d), dtype=np.float32)
        for i in rng.permutation(n):
            ds[i] = x[i]
        for i in rng.permutation(n // 3):
            three[3 * i:3 * i + 3] = x[3 * i:3 * i + 3]
    with h5py.File(tmp_path / "x.h5", "r") as f:
        addr = chunk_index(f["features"], compiled=compiled).addr
        assert (np.diff(addr) < 0).any()  # listed in row order, not file order
        _same(f["features"], compiled, source="btree1")
        _same(f["three"], compiled, source="btree1")
    assert np.array_equal(read_features(tmp_path / "x.h5").features, x)


@pytest.mark.parametrize("compiled", ENGINES)
def test_other_chunk_indexes(tmp_path, rng, compiled):
    """libver='latest': version-2 object headers and the chunk indexes of layout version 4. The
    native lister (H5Dchunk_iter) reads them when numba is present, h5py's chunk_iter otherwise."""
    x = rng.standard_normal((700, 24)).astype(np.float32)
    path = tmp_path / "x.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("extensible", data=x, chunks=(1, 24), maxshape=(None, 24))  # extensible array
        f.create_dataset("fixed", data=x, chunks=(1, 24))  # fixed array
        f.create_dataset("btree2", data=x, chunks=(5, 24), maxshape=(None, None))  # version-2 B-tree
        f.create_dataset("single", data=x, chunks=x.shape)  # single chunk
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((4, 24))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # implicit index
        h5py.h5d.create(f.id, b"implicit", h5py.h5t.NATIVE_FLOAT, h5py.h5s.create_simple(x.shape), dcpl=dcpl)
        f["implicit"][...] = x
    expect = "native" if compiled else "h5py"
    with h5py.File(path, "r") as f:
        for name in ("extensible", "fixed", "btree2", "single", "implicit"):
            _same(f[name], compiled, source=expect)
            assert chunk_index(f[name], "btree1", compiled=compiled) is None  # not an index it parses


@pytest.mark.parametrize("compiled", ENGINES)
def test_version2_object_headers(tmp_path, rng, compiled):
    """libver='v108': version-2 object headers ("OHDR", 4-byte message headers, 6 with attribute
    creation order) over the version-1 B-tree, with enough attributes to need continuation blocks."""
    x = rng.standard_normal((900, 24)).astype(np.float16)
    with h5py.File(tmp_path / "x.h5", "w", libver=("v108", "v108")) as f:
        f.create_dataset("features", data=x, chunks=(1, 24), maxshape=(None, 24))
        ordered = f.create_dataset("ordered", data=x, chunks=(3, 24), track_order=True)
        for i in range(40):
            ordered.attrs[f"a{i}"] = "x" * int(rng.integers(1, 300))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        _same(f["features"], compiled, source="btree1")
        _same(f["ordered"], compiled, source="btree1")


@pytest.mark.parametrize("compiled", ENGINES)
@pytest.mark.parametrize("k", [2, 64])
def test_btree_node_sizes(tmp_path, rng, compiled, k):
    """A file made with another B-tree K: K=2 (4 chunks a node: a deep tree), K=64 (128: more
    than the walker reads at first)."""
    lib = ctypes.CDLL(h5py.h5d.__file__)
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    assert lib.H5Pset_istore_k(ctypes.c_int64(fcpl.id), ctypes.c_uint(k)) >= 0
    path = tmp_path / "k.h5"
    fid = h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl)
    n = int(rng.integers(700, 1500))
    with h5py.File(fid) as f:
        f.create_dataset("features", data=rng.standard_normal((n, 16)).astype(np.float16), chunks=(1, 16),
                         maxshape=(None, 16))
    with h5py.File(path, "r") as f:
        _same(f["features"], compiled, source="btree1")


@pytest.mark.parametrize("compiled", ENGINES)
def test_aligned_chunks(tmp_path, rng, compiled):
    """Chunks aligned to 4 KiB (gaps between every chunk) and a dataset after a large attribute."""
    with h5py.File(tmp_path / "a.h5", "w", alignment_threshold=64, alignment_interval=4096) as f:
        f.attrs["blob"] = rng.integers(0, 255, 60_000).astype(np.uint8)
        f.create_dataset("features", data=rng.standard_normal((400, 32)).astype(np.float32), chunks=(1, 32))
        f.create_dataset("small", data=rng.standard_normal((400, 8)).astype(np.float32), chunks=(1, 8))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        _same(f["features"], compiled, source="btree1")
        _same(f["small"], compiled, source="btree1")


@pytest.mark.parametrize("compiled", ENGINES)
def test_layouts_it_leaves_to_h5py(tmp_path, rng, compiled):
    x = rng.standard_normal((200, 32)).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("gzip", data=x, chunks=(1, 32), compression="gzip")
        f.create_dataset("shuffle", data=x, chunks=(1, 32), shuffle=True)
        f.create_dataset("contiguous", data=x)
        f.create_dataset("column_chunks", data=x, chunks=(200, 8))
        half = f.create_dataset("half_written", shape=x.shape, chunks=(1, 32), dtype=np.float32)
        half[:100] = x[:100]
        f.create_dataset("strings", data=np.array([b"a", b"b"]), chunks=(1,))
        f.create_dataset("compound", data=np.zeros(5, dtype=[("a", "f4"), ("b", "i4")]), chunks=(1,))
        f.create_dataset("vector", data=x[:, 0], chunks=(1,))
        f.create_dataset("batch2", data=np.stack([x, x]), chunks=(1, 1, 32))
    names = ("gzip", "shuffle", "contiguous", "column_chunks", "half_written", "strings", "compound", "vector",
             "batch2")
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for name in names:
            assert read_row_chunked(f[name], compiled=compiled) is None, name
    with h5py.File(tmp_path / "ub.h5", "w", userblock_size=512) as f:
        f.create_dataset("features", data=x, chunks=(1, 32))
    with h5py.File(tmp_path / "ub.h5", "r") as f:
        assert read_row_chunked(f["features"], compiled=compiled) is None  # chunk addresses are not offsets
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("features", data=x, chunks=(1, 32))
    with h5py.File(tmp_path / "plain.h5", "r+") as f:
        assert read_row_chunked(f["features"], compiled=compiled) is None  # writable: chunks may be cached
    with h5py.File(tmp_path / "plain.h5", "r", driver="core") as f:
        assert read_row_chunked(f["features"], compiled=compiled) is None  # not the default driver
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        _same(f["features"], compiled)  # the same dataset, opened plainly
    # read_features still reads all of these through h5py
    with h5py.File(tmp_path / "gz.h5", "w") as f:
        f.create_dataset("features", data=x, chunks=(1, 32), compression="gzip")
    assert np.array_equal(read_features(tmp_path / "gz.h5").features, x)


def _truncate_after_open(path, keep):
    f = h5py.File(path, "r")
    ds = f["features"]
    os.truncate(path, keep)
    return f, ds


@pytest.mark.parametrize("compiled", ENGINES)
def test_truncated_file(tmp_path, rng, compiled):
    path = tmp_path / "cut.h5"
    write_trident_h5(path, rng.standard_normal((3000, 64)).astype(np.float32), np.zeros((3000, 2), np.int64))
    size = path.stat().st_size
    # cut before opening: HDF5 refuses to open it, read_features names the file
    short = tmp_path / "short.h5"
    short.write_bytes(path.read_bytes()[:size // 2])
    with pytest.raises(FeatureFileError, match="short.h5"):
        read_features(short)
    # cut while open (B-tree nodes past the end; only the last chunk past it): an OSError naming the file
    with h5py.File(path, "r") as f:
        last = int(chunk_index(f["features"], compiled=compiled).addr.max())
    assert last + 100 < size
    for keep in (size // 2, last + 100):
        copy = tmp_path / f"cut{keep}.h5"
        copy.write_bytes(path.read_bytes())
        f, ds = _truncate_after_open(copy, keep)
        try:
            with pytest.raises(OSError, match=f"cut{keep}.h5.*truncated"):
                read_row_chunked(ds, compiled=compiled)
        finally:
            f.close()


def test_short_reads_are_finished(tmp_path, rng, monkeypatch):
    """preadv may return fewer bytes than asked (a signal, over 2 GiB): the numpy path reads on."""
    x = rng.standard_normal((900, 40)).astype(np.float32)
    write_trident_h5(tmp_path / "x.h5", x, np.zeros((900, 2), np.int64))
    real = os.preadv

    def stingy(fd, bufs, at):
        if len(bufs) == 1 and len(bufs[0]) <= 4096:
            return real(fd, bufs, at)
        bufs = list(bufs)
        return real(fd, [memoryview(bufs[0])[:max(1, len(bufs[0]) // 3)]], at)

    monkeypatch.setattr(h5_chunks.os, "preadv", stingy)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert np.array_equal(read_row_chunked(f["features"], compiled=False), x)


def test_unknown_lister():
    with pytest.raises(ValueError, match="chunk lister"):
        read_row_chunked(None, index="fast")


def test_without_numba(tmp_path, rng, monkeypatch):
    """Where numba does not import, the default call takes the numpy path (and h5py's lister for
    layout-4 indexes)."""
    def no_numba():
        raise ImportError("no numba (simulated)")
    monkeypatch.setattr(h5_chunks, "_compiled_module", h5_chunks._LoadOnce(no_numba))
    x = rng.standard_normal((600, 16)).astype(np.float32)
    write_trident_h5(tmp_path / "t.h5", x, np.zeros((600, 2), np.int64))
    with h5py.File(tmp_path / "n.h5", "w", libver="latest") as f:
        f.create_dataset("features", data=x, chunks=(1, 16), maxshape=(None, 16))
    assert compiled_unavailable() == "ImportError: no numba (simulated)"
    for name, source in (("t.h5", "btree1"), ("n.h5", "h5py")):
        with h5py.File(tmp_path / name, "r") as f:
            assert np.array_equal(read_row_chunked(f["features"]), x)
            assert chunk_index(f["features"]).source == source
    with pytest.raises(RuntimeError, match="simulated"):
        with h5py.File(tmp_path / "t.h5", "r") as f:
            read_row_chunked(f["features"], compiled=True)


def test_prefetch_never_raises(tmp_path):
    h5_chunks.prefetch(tmp_path / "missing.h5")  # h5py's open reports a missing file, not this
    (tmp_path / "x.h5").write_bytes(b"\0" * 10)
    h5_chunks.prefetch(tmp_path / "x.h5")


def test_read_speed_benchmark_runs(tmp_path):
    """`python -m proalign.bench.features --read-speed` on two small files: every reader timed,
    ours checked against h5py."""
    from proalign.bench.features import read_speed
    from proalign.testing.synthetic_features import write_cohort

    paths = write_cohort(tmp_path, n_slides=2, d=16, n_range=(50, 90), fmt="clam", dtype="float16")
    r = read_speed(paths, warm_reps=1)
    assert r["files"] == 2 and set(r["warm"]) >= {"plain", "pread-1MiB", "ours", "h5py", "ours_over_plain"}
    assert all(v["mb_per_s"] > 0 for k, v in r["warm"].items() if k != "ours_over_plain")
