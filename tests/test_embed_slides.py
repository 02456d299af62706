"""Slides end to end: a generated slide -> tissue -> grid -> engine -> decode -> a tiny random CONCH
-> streaming aggregation, checked against the same steps done by hand on the whole slide."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from test_encoders import conch_folder, conch_tokenizer_file  # noqa: F401 (pytest fixtures)

from proalign import aggregate
from proalign.slides.patches import read_patches
from proalign.encoders import create_encoder
from proalign.errors import SlideError
from proalign.pipeline.embed_slides import SlideOptions, embed_slide
from proalign.slides.patching import patch_slide
from proalign.testing.synthetic_slides import write_aperio_svs


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("slides") / "case-01.svs"
    write_aperio_svs(p, 3000, 2200, tile=256, levels=(1, 4), seed=4, tissue="blobs", mpp=0.5, app_mag=20)
    return p


@pytest.mark.parametrize("method, kw", [("proalign", {"tau": [0.1, 0.5]}),
                                       pytest.param("panther", {}, marks=pytest.mark.slow),
                                       pytest.param("mean", {}, marks=pytest.mark.slow)])
def test_embed_slide_equals_whole_slide_steps(slide_path, conch_folder, tmp_path, method, kw, rng):
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    opts = SlideOptions(magnification=20, patch_size=64, batch_size=37, features_dir=str(tmp_path / "feats"))
    c = rng.normal(size=(6, enc.feature_dim)).astype(np.float32)
    res = embed_slide(slide_path, enc, c, method=method, aggregate_kwargs=kw, options=opts)
    # by hand: the same grid, every patch read at once, encoded at once, aggregated at once
    slide, grid = patch_slide(slide_path, patch_size=64, target_magnification=20)
    assert res.n_patches == len(grid) > 20
    patches = torch.from_numpy(read_patches(slide, grid.coords, grid.patch_size_level0, grid.patch_size))
    with torch.inference_mode():
        x = enc.encode_image(enc.preprocess(patches)).float()
    want = aggregate(x.numpy(), c, method, backend="torch", **kw)
    np.testing.assert_allclose(res.embedding, want, rtol=1e-4, atol=1e-4)
    # the TRIDENT-style features file holds the same features, rows matched by coords
    with h5py.File(tmp_path / "feats" / "case-01.h5") as f:
        feats, coords = f["features"][:], f["coords"][:]
        assert f["coords"].attrs["patch_size_level0"] == grid.patch_size_level0
    order = {tuple(xy): i for i, xy in enumerate(grid.coords.tolist())}
    rows = np.array([order[tuple(xy)] for xy in coords.tolist()])
    np.testing.assert_allclose(feats, x.numpy()[rows], rtol=1e-5, atol=1e-5)
    assert set(res.timing) >= {"grid_s", "patches_s", "encode_s", "aggregate_s", "total_s"}


def test_joint_space_and_coords_dir(slide_path, conch_folder, tmp_path, rng):
    from proalign.slides.coords_io import trident_coords_path, write_coords_h5

    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    slide, grid = patch_slide(slide_path, patch_size=64, target_magnification=20)
    grid.coords = grid.coords[:50]
    write_coords_h5(trident_coords_path(tmp_path, "case-01"), grid)
    c = rng.normal(size=(4, enc.feature_dim)).astype(np.float32)
    t = rng.normal(size=(4, enc.joint_dim)).astype(np.float32)
    res = embed_slide(slide_path, enc, c, options=SlideOptions(coords_dir=str(tmp_path)), text_prototypes=t)
    assert res.n_patches == 50
    patches = torch.from_numpy(read_patches(slide, grid.coords, grid.patch_size_level0, grid.patch_size))
    with torch.inference_mode():
        x = enc.encode_image(enc.preprocess(patches)).float()
        z = enc.project(x).float()
    want = aggregate(x.numpy(), c, "proalign", backend="torch", keys=z.numpy(), queries=t)  # the default reading
    np.testing.assert_allclose(res.embedding, want, rtol=1e-4, atol=1e-4)


def test_slide_errors(conch_folder, tmp_path):
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    blank = tmp_path / "blank.svs"
    write_aperio_svs(blank, 1200, 900, tissue="none", mpp=0.5, app_mag=20)
    with pytest.raises(SlideError, match="no tissue patches"):
        embed_slide(blank, enc, np.ones((2, enc.feature_dim), np.float32),
                    options=SlideOptions(magnification=20, patch_size=64))
    nompp = tmp_path / "nompp.svs"
    write_aperio_svs(nompp, 1200, 900, mpp=None, app_mag=None)
    with pytest.raises(SlideError, match="--slide-mpp"):
        embed_slide(nompp, enc, np.ones((2, enc.feature_dim), np.float32),
                    options=SlideOptions(magnification=20, patch_size=64))
    with pytest.raises(SlideError, match="no coords file"):
        embed_slide(blank, enc, np.ones((2, enc.feature_dim), np.float32),
                    options=SlideOptions(coords_dir=str(tmp_path / "none")))


def test_prototypes_build_from_archive_with_text_init(tmp_path):
    """CLI: slides + a random-weight CONCH + the shipped lung set -> K=16 prototypes in the
    encoder's feature space, with type names and provenance."""
    from conftest import run_cli

    from proalign.testing.random_weights import write_random_conch
    from proalign.prototypes.io import read_prototype_file

    over = write_random_conch(tmp_path / "conch")
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        write_aperio_svs(archive / f"s{i}.svs", 2000, 1600, tile=256, levels=(1, 4), seed=10 + i, mpp=0.5,
                         app_mag=20)
    (archive / "broken.svs").write_bytes(b"not a slide")
    args = [a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")]
    out = tmp_path / "p.safetensors"
    r = run_cli("prototypes", "build", "--archive", str(archive), "--encoder", "conch_v1", "--weights",
                str(tmp_path / "conch"), *args, "--patch-size", "128", "--init", "text", "--descriptions", "lung",
                "--pool-size", "120", "--top-fraction", "0.05", "--force", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "skipped broken" in r.stderr and "from 2 slides" in r.stdout
    protos, meta = read_prototype_file(out)
    assert protos.shape == (16, over["embed_dim"]) and np.isfinite(protos).all()
    assert meta["descriptions"] == "lung" and len(meta["type_names"]) == 16 and meta["encoder"] == "conch_v1"


def test_embed_archive_cli_resumes_and_reports(tmp_path, rng):
    """`embed --archive` over generated slides (one broken): exit 1 naming it, the good slides stored
    equal to embed_slide's result; a rerun stores nothing new."""
    from conftest import run_cli

    from proalign import open_store
    from proalign.testing.random_weights import write_random_conch
    from proalign.prototypes.io import save_prototypes

    over = write_random_conch(tmp_path / "conch")
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        # 1024 x 768: about 20 tissue patches a slide (the size is not what is tested)
        write_aperio_svs(archive / f"case-{i}.svs", 1024, 768, tile=256, levels=(1, 4), seed=20 + i, mpp=0.5,
                         app_mag=20)
    (archive / "broken.svs").write_bytes(b"II*\x00garbage")
    c = rng.normal(size=(5, over["embed_dim"])).astype(np.float32)
    save_prototypes(tmp_path / "p.safetensors", c, {})
    args = [a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")]
    cmd = ["embed", "--archive", str(archive), "--encoder", "conch_v1", "--weights", str(tmp_path / "conch"), *args,
           "--patch-size", "128", "--mag", "20", "--prototypes", str(tmp_path / "p.safetensors"),
           "--out", str(tmp_path / "store"), "--dtype", "float32", "--retries", "0"]
    r = run_cli(*cmd)
    assert r.returncode == 1, r.stderr
    assert "broken" in r.stderr
    enc = create_encoder("conch_v1", tmp_path / "conch", **over)
    with open_store(tmp_path / "store") as s:
        assert sorted(s) == ["case-0", "case-1"]
        for sid in s:
            want = embed_slide(archive / f"{sid}.svs", enc, c,  # the default reading, as the CLI's
                               options=SlideOptions(magnification=20, patch_size=128)).embedding
            np.testing.assert_allclose(s[sid], want, rtol=1e-4, atol=1e-4)
            assert s.meta(sid)["options"]["encoder"] == "conch_v1"
    r2 = run_cli(*cmd)
    assert r2.returncode == 1 and "0 embedded, 2 already stored" in r2.stdout, r2.stdout


def test_worker_threads_size_the_cpu_decoders():
    """N workers on one node: each worker's CPU decoders use its share of the cores, not every core."""
    from proalign.slides.patches import _make_decoder, set_decode_threads
    from proalign.pipeline.worker import set_threads

    import numba

    before, before_numba = torch.get_num_threads(), numba.get_num_threads()
    try:
        set_threads(3)
        assert _make_decoder("cpu", "jpeg").threads == 3
        set_decode_threads(None)
        assert _make_decoder("cpu", "jpeg").threads == (os.cpu_count() or 1)
    finally:
        set_decode_threads(None)
        torch.set_num_threads(before)
        numba.set_num_threads(before_numba)
