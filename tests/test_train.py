"""Step 4: patch-text contrastive refinement (prototypes/train.py and `prototypes train`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli

from proalign.prototypes.train import contrastive_loss, train_prototypes


def _planted(rng, k=4, d=32, dj=16, n=3000, noise=0.35):
    """Patches around K centres; W a random projection; text prototypes = the centres' projections,
    so the teacher points each patch at its own centre."""
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, k, n)
    x = centres[lab] + noise * rng.normal(size=(n, d)) / np.sqrt(d)
    w = rng.normal(size=(d, dj))
    t = centres @ w
    return x.astype(np.float32), w.astype(np.float32), t.astype(np.float32), centres, lab


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _agreement(x, c, lab):
    return ((x / np.linalg.norm(x, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
            ).argmax(1).__eq__(lab).mean()


def test_training_fixes_ambiguous_prototypes(rng):
    """Each initial prototype is a blend of its own centre and the next one's: the text teacher
    pulls the assignments back to the planted types (the loss only asks for the teacher's
    assignments, not for prototypes at the centres)."""
    x, w, t, centres, lab = _planted(rng)
    init = (0.55 * centres + 0.45 * np.roll(centres, -1, axis=0)).astype(np.float32)
    res = train_prototypes(x, t, w, init, epochs=15, lr=0.02, batch_size=256, tau_a=0.05, seed=1)
    losses = [r["loss"] for r in res.loss_curve]
    assert losses[-1] < 0.5 * losses[0] and res.meta["train"]["loss_after"] < res.meta["train"]["loss_before"]
    assert _agreement(x, res.prototypes, lab) > 0.98 > _agreement(x, init, lab)
    np.testing.assert_allclose(np.linalg.norm(res.prototypes, axis=1), np.linalg.norm(init, axis=1), rtol=1e-5)
    assert abs(res.usage.sum() - 1) < 1e-9 and (res.usage > 0.1).all()


def test_deterministic(rng):
    x, w, t, centres, _ = _planted(rng, n=800)
    a = train_prototypes(x, t, w, centres.astype(np.float32), epochs=3, seed=7, batch_size=100)
    b = train_prototypes(x, t, w, centres.astype(np.float32), epochs=3, seed=7, batch_size=100)
    assert np.array_equal(a.prototypes, b.prototypes) and a.loss_curve == b.loss_curve
    c = train_prototypes(x, t, w, centres.astype(np.float32), epochs=3, seed=8, batch_size=100)
    assert not np.array_equal(a.prototypes, c.prototypes)


def test_loss_matches_a_float64_formula(rng):
    x = torch.from_numpy(rng.normal(size=(50, 8)))
    c = torch.from_numpy(rng.normal(size=(3, 8))).requires_grad_(True)
    q = torch.softmax(torch.from_numpy(rng.normal(size=(50, 3))), dim=1)
    loss, ce, kl = contrastive_loss(x, q, c, tau_s=0.2, lam=0.7)
    xn, cn = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True), c.detach().numpy()
    cn = cn / np.linalg.norm(cn, axis=1, keepdims=True)
    s = xn @ cn.T / 0.2
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    qq = q.numpy()
    want_ce = -(qq * np.log(p)).sum(1).mean()
    pm, qm = p.mean(0), qq.mean(0)
    want = want_ce + 0.7 * (pm * np.log(pm / qm)).sum()
    assert float(loss.detach()) == pytest.approx(want, rel=1e-10)
    assert float(ce.detach()) == pytest.approx(want_ce, rel=1e-10)
    assert torch.autograd.gradcheck(lambda cc: contrastive_loss(x, q, cc, 0.2, 0.7)[0], (c,))


def test_cli_trains_and_refuses_a_collapsed_set(tmp_path, rng):
    from proalign.prototypes.io import read_prototype_file, save_prototypes
    from proalign.synthetic import write_cohort

    d, dj, k = 64, 16, 4
    feats = tmp_path / "feats"
    write_cohort(feats, n_slides=6, d=d, g=k, seed=3, n_range=(200, 400))
    from proalign.features.io import list_slides, read_features
    x = np.concatenate([read_features(e.path, e.slide_id).features for e in list_slides(features=feats)])
    w = rng.normal(size=(d, dj)).astype(np.float32)
    from proalign.prototypes.build import spherical_kmeans
    init = spherical_kmeans(x, k, 0)
    t = (init @ w).astype(np.float32)
    save_prototypes(tmp_path / "init.safetensors", init, {"type_names": ["a", "b", "c", "d"]})
    save_prototypes(tmp_path / "t.safetensors", t, {})
    np.save(tmp_path / "w.npy", w)
    common = ["prototypes", "train", "--features", str(feats), "--text-prototypes", str(tmp_path / "t.safetensors"),
              "--projection", str(tmp_path / "w.npy"), "--epochs", "3", "--batch-size", "256"]
    r = run_cli(*common, "--from", str(tmp_path / "init.safetensors"), "--out", str(tmp_path / "out.safetensors"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("epoch") == 3 and "usage per prototype" in r.stdout
    c, meta = read_prototype_file(tmp_path / "out.safetensors")
    assert c.shape == (k, d) and meta["type_names"] == ["a", "b", "c", "d"] and len(meta["loss_curve"]) == 3
    assert json.loads((tmp_path / "out.safetensors.train.json").read_text())["loss_curve"] == meta["loss_curve"]
    # one prototype nobody is near: collapsed, refused (exit 1, nothing written) unless --force
    far = init.copy()
    far[0] = -x.mean(0) * 50
    save_prototypes(tmp_path / "far.safetensors", far, {})
    bad = ["--from", str(tmp_path / "far.safetensors"), "--epochs", "0", "--out", str(tmp_path / "bad.safetensors")]
    r = run_cli(*common[:-4], *bad)
    assert r.returncode == 1 and "collapsed" in r.stderr and not (tmp_path / "bad.safetensors").exists()
    r = run_cli(*common[:-4], *bad, "--force")
    assert r.returncode == 0 and (tmp_path / "bad.safetensors").exists()
