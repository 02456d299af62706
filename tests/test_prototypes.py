"""Prototype pools, k-means, text allocation, files, and the `prototypes build` command."""
import h5py
import numpy as np
import pytest

import proalign
from proalign.errors import PrototypeError
from proalign.features import list_feature_files
from proalign.prototypes.build import sample_pool, spherical_kmeans, text_allocation, usage
from proalign.prototypes.io import prototype_hash, read_prototype_file, save_prototypes
from proalign.testing.synthetic_features import tissue_centres, write_cohort


def test_pool_is_a_seeded_random_quota_per_slide(tmp_path):
    # Feature row i of every slide holds the value i, so the pool tells which rows were drawn.
    for s in range(4):
        with h5py.File(tmp_path / f"s{s}.h5", "w") as f:
            f["features"] = np.repeat(np.arange(1000, dtype=np.float32)[:, None] + 1000 * s, 3, axis=1)
    entries = list_feature_files(features=tmp_path)
    pool = sample_pool(entries, pool_size=200, seed=5)
    rows = pool.x[:, 0].astype(int)
    assert len(rows) == 200 and len(set(rows)) == 200
    per_slide = np.bincount(rows // 1000, minlength=4)
    assert (per_slide == 50).all()
    assert (rows % 1000 >= 50).sum() > 150  # not the first rows of each slide
    np.testing.assert_array_equal(sample_pool(entries, 200, seed=5).x, pool.x)
    assert not np.array_equal(sample_pool(entries, 200, seed=6).x, pool.x)


def test_kmeans_finds_planted_types(rng):
    centres = tissue_centres(6, 32, seed=int(rng.integers(1 << 30)))
    x = np.concatenate([c + 0.05 * rng.standard_normal((300, 32)) for c in centres]).astype(np.float32)
    protos = spherical_kmeans(x, 6, seed=0)
    cos = (protos / np.linalg.norm(protos, axis=1, keepdims=True)) @ (centres / 3.0).T
    assert sorted(cos.argmax(axis=1)) == list(range(6)) and cos.max(axis=1).min() > 0.99
    np.testing.assert_allclose(usage(x, protos), np.full(6, 1 / 6))


def test_text_allocation_matches_independent_float64(rng):
    x = rng.standard_normal((500, 12)).astype(np.float32)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    t = rng.standard_normal((4, 8)).astype(np.float32)
    got, unpreferred = text_allocation(x, t, w, tau_a=0.05, top_fraction=0.02)
    z = x.astype(np.float64) @ w
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = z @ tn.T / 0.05
    q = np.exp(logits - logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    for k in range(4):
        top = sorted(range(500), key=lambda i: -q[i, k])[:10]
        np.testing.assert_allclose(got[k], x[top].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    assert unpreferred == [k for k in range(4) if q[:, k].max() < 0.25]


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_prototype_files_round_trip(tmp_path, rng, suffix):
    c = rng.standard_normal((16, 24)).astype(np.float32)
    h = save_prototypes(tmp_path / f"p{suffix}", c, {"init": "kmeans", "seed": 3})
    got, meta = read_prototype_file(tmp_path / f"p{suffix}")
    np.testing.assert_array_equal(got, c)
    assert meta["hash"] == h == prototype_hash(c) and meta["seed"] == 3 and meta["k"] == 16
    np.save(tmp_path / "p.npy", c[None])  # PANTHER-style (1, K, d)
    np.testing.assert_array_equal(proalign.load_prototypes(tmp_path / "p.npy"), c)


def test_bad_prototype_files(tmp_path):
    with pytest.raises(PrototypeError, match="not found"):
        proalign.load_prototypes(tmp_path / "none.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"nonsense")
    with pytest.raises(PrototypeError, match="unreadable"):
        proalign.load_prototypes(tmp_path / "x.safetensors")
    np.save(tmp_path / "nan.npy", np.full((2, 3), np.nan))
    with pytest.raises(PrototypeError, match="NaN"):
        proalign.load_prototypes(tmp_path / "nan.npy")


def test_build_cli_is_deterministic(tmp_path, cli):
    feats = tmp_path / "f"
    write_cohort(feats, n_slides=6, d=32, n_range=(100, 400), g=4, seed=1)
    outs = []
    for i, seed in enumerate([7, 7, 8]):
        out = tmp_path / f"p{i}.safetensors"
        r = cli("prototypes", "build", "--features", feats, "--init", "kmeans", "--k", 4, "--seed", seed,
                "--pool-size", 1000, "--out", out, check=0)
        assert "usage per prototype" in r.stdout
        outs.append(read_prototype_file(out))
    assert outs[0][1]["hash"] == outs[1][1]["hash"] and outs[0][1]["hash"] != outs[2][1]["hash"]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])


def test_build_cli_text_init(tmp_path, cli, rng):
    feats = tmp_path / "f"
    write_cohort(feats, n_slides=4, d=16, n_range=(200, 300), g=3, seed=2)
    np.save(tmp_path / "w.npy", rng.standard_normal((16, 8)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.standard_normal((3, 8)).astype(np.float32))
    out = tmp_path / "p.npz"
    cli("prototypes", "build", "--features", feats, "--init", "text", "--text-prototypes", tmp_path / "t.npy",
        "--projection", tmp_path / "w.npy", "--pool-size", 800, "--out", out, "--force", check=0)
    c, meta = read_prototype_file(out)
    assert c.shape == (3, 16) and meta["init"] == "text" and meta["pool_size"] == 800


def test_build_cli_refuses_collapsed_set(tmp_path, cli, rng):
    feats = tmp_path / "f"
    write_cohort(feats, n_slides=3, d=16, n_range=(200, 300), g=2, seed=3)
    bad = rng.standard_normal((4, 16)).astype(np.float32)
    bad[1] = -100 * np.ones(16)  # far from everything: nobody's nearest
    bad[2] = bad[3]  # a duplicate: the twin never wins argmax
    np.save(tmp_path / "init.npy", bad)
    out = tmp_path / "p.safetensors"
    r = cli("prototypes", "build", "--features", feats, "--init", "file", "--from", tmp_path / "init.npy",
            "--out", out, check=1)
    assert "collapsed" in r.stderr and not out.exists()
    cli("prototypes", "build", "--features", feats, "--init", "file", "--from", tmp_path / "init.npy",
        "--out", out, "--force", check=0)
    assert out.exists()
