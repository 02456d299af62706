"""Feature files as TRIDENT and CLAM write them, and every malformed one."""
import h5py
import numpy as np
import pytest
import torch

from proalign.errors import FeatureFileError
from proalign.features import list_feature_files, read_features
from proalign.testing.synthetic_features import grid_coords, write_clam_h5, write_trident_h5


def test_trident_h5(tmp_path, rng):
    x = rng.standard_normal((37, 16)).astype(np.float32)
    p = tmp_path / "TCGA-AA-0001.h5"
    write_trident_h5(p, x, grid_coords(37), encoder="conch_v15")
    ff = read_features(p)
    assert ff.slide_id == "TCGA-AA-0001"
    np.testing.assert_array_equal(ff.features, x)
    assert ff.coords.shape == (37, 2) and ff.attrs["encoder"] == "conch_v15"
    assert ff.attrs["coords.patch_size_level0"] == 512


@pytest.mark.parametrize("batch", [1, 5])
def test_clam_h5_appended_chunks_and_legacy_attrs(tmp_path, rng, batch):
    x = rng.standard_normal((23, 8)).astype(np.float16)
    p = tmp_path / "slide.h5"
    write_clam_h5(p, x, grid_coords(23), batch=batch)
    with h5py.File(p) as f:
        assert f["features"].chunks == (1, 8) and f["features"].maxshape == (None, 8)
    ff = read_features(p)
    assert ff.features.dtype == np.float16
    np.testing.assert_array_equal(ff.features, x)
    assert ff.attrs["coords.patch_level"] == 0 and ff.attrs["coords.downsample"] == [1.0, 1.0]


def test_h5_with_batch_axis_and_no_coords(tmp_path, rng):
    x = rng.standard_normal((1, 9, 4)).astype(np.float64)
    p = tmp_path / "b.h5"
    with h5py.File(p, "w") as f:
        f["features"] = x
    ff = read_features(p)
    assert ff.coords is None
    np.testing.assert_array_equal(ff.features, x[0])


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pt_files(tmp_path, rng, wrap, dtype):
    t = torch.from_numpy(rng.standard_normal((11, 6)).astype(np.float32)).to(dtype)
    p = tmp_path / "s.pt"
    torch.save({"features": t} if wrap else t, p)
    np.testing.assert_array_equal(read_features(p).features, t.float().numpy())


def test_trident_pt_numpy_array_and_none_encoder(tmp_path, rng):
    x = rng.standard_normal((5, 4)).astype(np.float16)
    torch.save(x, tmp_path / "t.pt")  # TRIDENT's .pt option saves the numpy array itself
    np.testing.assert_array_equal(read_features(tmp_path / "t.pt").features, x)
    with h5py.File(tmp_path / "n.h5", "w") as f:
        f["features"] = x
        f["features"].attrs["encoder"] = "None"
    assert read_features(tmp_path / "n.h5").attrs["encoder"] is None


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


@pytest.mark.parametrize("make,problem", [
    (lambda d: d / "missing.h5", "file not found"),
    (lambda d: _h5(d / "nofeat.h5", coords=np.zeros((3, 2))), "no 'features' dataset"),
    (lambda d: _h5(d / "nan.h5", features=np.array([[1.0, np.nan], [0, 1]])), "contain NaN or inf"),
    (lambda d: _h5(d / "inf.h5", features=np.array([[1.0, 2], [np.inf, 1]])), "contain NaN or inf"),
    (lambda d: _h5(d / "empty.h5", features=np.zeros((0, 8), np.float32)), "zero patches"),
    (lambda d: _h5(d / "int.h5", features=np.zeros((3, 8), np.int32)), "expected a float dtype"),
    (lambda d: _h5(d / "1d.h5", features=np.zeros(8, np.float32)), "expected (N, d)"),
    (lambda d: _h5(d / "coords.h5", features=np.zeros((3, 2), np.float32), coords=np.zeros((4, 2))), "4 coords but 3"),
    (lambda d: (d / "garbage.h5").write_bytes(b"not an hdf5 file at all") and d / "garbage.h5", "unreadable"),
    (lambda d: (d / "garbage.pt").write_bytes(b"\x00junk") and d / "garbage.pt", "unreadable"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "unknown feature file type"),
])
def test_bad_feature_files_name_the_file_and_problem(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(FeatureFileError) as ei:
        read_features(path)
    assert problem in str(ei.value) and path.name in str(ei.value)


def test_manifest_and_folder_listing(tmp_path, rng):
    sub = tmp_path / "feats"
    sub.mkdir()
    for name in ["b", "a"]:
        write_trident_h5(sub / f"{name}.h5", rng.standard_normal((4, 3)).astype(np.float32), grid_coords(4))
    assert [e.slide_id for e in list_feature_files(features=sub)] == ["a", "b"]
    man = tmp_path / "m.csv"
    man.write_text("slide_id,path\npatient-b,feats/b.h5\npatient-a,feats/a.h5\n")
    entries = list_feature_files(manifest=man)
    assert [e.slide_id for e in entries] == ["patient-a", "patient-b"] and entries[0].path == sub / "a.h5"
    (tmp_path / "dup.csv").write_text("slide_id,path\nx,feats/a.h5\nx,feats/b.h5\n")
    with pytest.raises(ValueError, match="appears twice"):
        list_feature_files(manifest=tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("id,file\nx,feats/a.h5\n")
    with pytest.raises(ValueError, match="lacks column"):
        list_feature_files(manifest=tmp_path / "bad.csv")


def test_nonfinite_rows_float16_bits_match_isfinite():
    """The float16 exponent-bit test agrees with numpy's isfinite on every one of the 65,536 halves,
    alone and in rows; other dtypes go through isfinite."""
    from proalign.features.io import nonfinite_rows

    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    np.testing.assert_array_equal(nonfinite_rows(every[:, None]), ~np.isfinite(every))
    rows = np.random.default_rng(0).permutation(every).reshape(-1, 64)
    np.testing.assert_array_equal(nonfinite_rows(rows), ~np.isfinite(rows).all(axis=1))
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.inf
    assert nonfinite_rows(x).tolist() == [False, True, False]
