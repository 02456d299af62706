"""The one-pass reader of row-chunked HDF5 datasets against h5py's own reader, on every layout."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from proalign.features.h5_chunks import MAX_GAP_BYTES, read_row_chunked
from proalign.features.io import read_features


def _trident_like(path, n, d, dtype, batch, rng):
    """Features and coords grown batch by batch with one-row chunks, as TRIDENT/CLAM write them:
    the two datasets' chunks interleave in the file."""
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", shape=(0, d), maxshape=(None, d), chunks=(1, d), dtype=dtype)
        coords = f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), chunks=(1, 2), dtype=np.int64)
        for s in range(0, n, batch):
            m = min(batch, n - s)
            feats.resize(s + m, axis=0)
            feats[s:] = rng.standard_normal((m, d)).astype(dtype)
            coords.resize(s + m, axis=0)
            coords[s:] = rng.integers(0, 100_000, (m, 2))


def _same(ds):
    fast = read_row_chunked(ds)
    ref = ds[()]
    assert fast is not None
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    assert np.array_equal(fast, ref)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ">f4", np.float64])
def test_trident_layout_equals_h5py(tmp_path, dtype):
    rng = np.random.default_rng()
    n, d = int(rng.integers(300, 900)), int(rng.integers(300, 600))
    batch = int(rng.integers(128, 328))
    assert batch * d * np.dtype(dtype).itemsize > MAX_GAP_BYTES  # coords come back in several runs
    path = tmp_path / "slide.h5"
    _trident_like(path, n, d, dtype, batch, rng)
    with h5py.File(path, "r") as f:
        _same(f["features"])
        _same(f["coords"])
        ref_f, ref_c = f["features"][()], f["coords"][()]
    ff = read_features(path)
    assert np.array_equal(ff.features, ref_f) and np.array_equal(ff.coords, ref_c)


def test_batch_axis_and_multi_row_chunks(tmp_path):
    rng = np.random.default_rng()
    a = rng.standard_normal((1, 503, 64)).astype(np.float32)
    b = rng.standard_normal((1001, 40)).astype(np.float16)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("features", data=a, chunks=(1, 1, 64))
        f.create_dataset("rows7", data=b, chunks=(7, 40))  # the last chunk is partial (1001 = 143 * 7)
        f.create_dataset("rows13", data=b, chunks=(13, 40))  # 1001 = 77 * 13 ... and partial for 503 below
        f.create_dataset("odd", data=a[0], chunks=(9, 64))  # 503 = 55 * 9 + 8
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for name in ("features", "rows7", "rows13", "odd"):
            _same(f[name])


def test_layouts_it_leaves_to_h5py(tmp_path):
    x = np.random.default_rng().standard_normal((200, 32)).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("gzip", data=x, chunks=(1, 32), compression="gzip")
        f.create_dataset("contiguous", data=x)
        f.create_dataset("column_chunks", data=x, chunks=(200, 8))
        half = f.create_dataset("half_written", shape=x.shape, chunks=(1, 32), dtype=np.float32)
        half[:100] = x[:100]
        f.create_dataset("strings", data=np.array([b"a", b"b"]), chunks=(1,))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for name in ("gzip", "contiguous", "column_chunks", "half_written", "strings"):
            assert read_row_chunked(f[name]) is None, name
    with h5py.File(tmp_path / "ub.h5", "w", userblock_size=512) as f:
        f.create_dataset("features", data=x, chunks=(1, 32))
    with h5py.File(tmp_path / "ub.h5", "r") as f:
        assert read_row_chunked(f["features"]) is None
    # read_features still reads all of these through h5py
    with h5py.File(tmp_path / "gz.h5", "w") as f:
        f.create_dataset("features", data=x, chunks=(1, 32), compression="gzip")
    assert np.array_equal(read_features(tmp_path / "gz.h5").features, x)
