"""Step 4: patch-text contrastive refinement (prototypes/train.py and `prototypes train`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli

from proalign.errors import PrototypeError
from proalign.prototypes.build import COLLAPSE_USAGE, usage
from proalign.prototypes.io import read_prototype_file, save_prototypes
from proalign.prototypes.train import (CollapsedSetError, contrastive_loss, save_trained, teacher,
                                       train_prototypes)


def _planted(rng, k=4, d=32, dj=16, n=3000, noise=0.35):
    """Patches around K orthonormal centres; W (d, dj) with orthonormal columns spanning the centres
    (then rotated), so the text prototypes t = the centres' projections stay orthonormal and the
    teacher q = softmax(normalize(x W) . t / tau_a) points each patch at its own centre."""
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    centres = basis[:, :k].T
    w = basis[:, :dj] @ np.linalg.qr(rng.normal(size=(dj, dj)))[0]
    lab = rng.integers(0, k, n)
    x = centres[lab] + noise * rng.normal(size=(n, d)) / np.sqrt(d)
    return x.astype(np.float32), w.astype(np.float32), (centres @ w).astype(np.float32), centres, lab


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_training_lowers_the_loss_and_moves_prototypes_to_the_centres(rng):
    """Each initial prototype blends its centre with the next one's; with the default settings
    (tau_s 0.05, lambda 1, lr 1e-3) the loss falls and every prototype turns toward its centre."""
    x, w, t, centres, lab = _planted(rng)
    init = (0.55 * centres + 0.45 * np.roll(centres, -1, axis=0)).astype(np.float32)
    res = train_prototypes(x, None, t, w, init, tau_a=0.05, batch_size=256, seed=1)
    assert [r["epoch"] for r in res.loss_curve] == list(range(1, 11))
    assert res.loss_curve[-1]["total"] < 0.5 * res.loss_curve[0]["total"]
    tr = res.meta["train"]
    assert tr["loss_after"]["total"] < 0.5 * tr["loss_before"]["total"]
    gain = _cos(res.prototypes, centres) - _cos(init, centres)
    assert (gain > 0).all() and gain.mean() > 0.03, gain
    # directions are trained, norms are the initial ones; usage sums to 1 and follows the planted types
    np.testing.assert_allclose(np.linalg.norm(res.prototypes, axis=1), np.linalg.norm(init, axis=1), rtol=1e-5)
    assert abs(res.usage.sum() - 1) < 1e-9 and res.collapsed == []
    np.testing.assert_allclose(res.usage, np.bincount(lab, minlength=4) / len(lab), atol=0.03)
    # z given explicitly = z computed from W
    res_z = train_prototypes(x, x.astype(np.float64) @ w, t, None, init, tau_a=0.05, batch_size=256, seed=1,
                             epochs=1)
    res_w = train_prototypes(x, None, t, w, init, tau_a=0.05, batch_size=256, seed=1, epochs=1)
    np.testing.assert_array_equal(res_z.prototypes, res_w.prototypes)


def _diffuse_teacher(rng, a0=0.45, noise=0.15, n=3000, d=32):
    """Six clusters at +-e1, +-e2, +-e3 and a skewed teacher: every patch gives its own type 1 - a0 and
    one extra type a0 (a large share of the teacher's mass, but never its top type). q is planted
    exactly through z = [log q, pad] with t_k = e_k and tau_a = 1/|z|."""
    k = 6
    centres = np.concatenate([np.eye(3, d), -np.eye(3, d)])
    lab = rng.integers(0, k, n)
    x = (centres[lab] + noise * rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
    q = np.zeros((n, k + 1))
    q[np.arange(n), lab] = 1 - a0
    q[:, k] = a0
    logq = np.log(np.clip(q, 1e-9, None))
    r = np.linalg.norm(logq, axis=1).max() + 1
    z = np.concatenate([logq, np.sqrt(r ** 2 - (logq ** 2).sum(1))[:, None]], axis=1)
    t = np.eye(k + 1, k + 2)
    np.testing.assert_allclose(teacher(z, t, 1 / r), q / q.sum(1, keepdims=True), atol=1e-6)  # the plant holds
    init = np.concatenate([centres, np.eye(1, d, d - 1)]).astype(np.float32)  # the extra type: off the data
    return x, z, t.astype(np.float32), 1 / r, init


def test_kl_term_prevents_collapse(rng, tmp_path):
    """The cross-entropy alone leaves the extra type unused (its pull toward the symmetric data
    cancels) and the set is refused; with lambda = 1 the KL matches the student's mean use of it to
    the teacher's (45%), and it is used. (200 seeds: lambda 0 gives at most 0 patches, lambda 1 at
    least 3.7%.)"""
    x, z, t, tau_a, init = _diffuse_teacher(rng)
    kw = dict(tau_a=tau_a, tau_s=0.12, lr=1e-2, batch_size=256, epochs=10, seed=0)
    ce_only = train_prototypes(x, z, t, None, init, lam=0.0, **kw)
    assert ce_only.collapsed == [6] and ce_only.meta["train"]["collapsed"] == [6]
    assert ce_only.meta["train"]["teacher_usage"][6] == 0  # the teacher never prefers it either
    with pytest.raises(CollapsedSetError, match=r"prototypes \[6\] have < 0.1% usage"):
        save_trained(tmp_path / "ce.safetensors", ce_only)
    assert not list(tmp_path.iterdir())
    save_trained(tmp_path / "forced.safetensors", ce_only, {"note": "x"}, force=True)
    assert read_prototype_file(tmp_path / "forced.safetensors")[1]["train"]["collapsed"] == [6]
    with_kl = train_prototypes(x, z, t, None, init, lam=1.0, **kw)
    assert with_kl.collapsed == [] and with_kl.usage[6] > 10 * COLLAPSE_USAGE
    # the KL term is what changed: the student's mean p of the extra type moved toward the teacher's
    assert with_kl.meta["train"]["loss_after"]["kl"] < ce_only.meta["train"]["loss_after"]["kl"]
    save_trained(tmp_path / "kl.safetensors", with_kl)


def test_deterministic(rng):
    x, w, t, centres, _ = _planted(rng, n=800)
    init = (centres + 0.3 * rng.normal(size=centres.shape)).astype(np.float32)
    a = train_prototypes(x, None, t, w, init, epochs=3, seed=7, batch_size=100, lr=1e-2)
    b = train_prototypes(x, None, t, w, init, epochs=3, seed=7, batch_size=100, lr=1e-2)
    assert np.array_equal(a.prototypes, b.prototypes) and a.loss_curve == b.loss_curve
    assert np.array_equal(a.usage, b.usage) and a.meta == b.meta
    c = train_prototypes(x, None, t, w, init, epochs=3, seed=8, batch_size=100, lr=1e-2)
    assert not np.array_equal(a.prototypes, c.prototypes)


def _loss64(x, q, c, tau_s, lam):
    """The Step-4 loss written out in float64 numpy, independently of the module."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    s = xn @ cn.T / tau_s
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ce = -(q * np.log(p)).sum(1).mean()
    pm, qm = p.mean(0), q.mean(0)
    kl = (pm * np.log(pm / qm)).sum()
    return ce + lam * kl, ce, kl


def test_loss_and_gradient_match_a_float64_formula(rng):
    x = rng.normal(size=(50, 8))
    c = rng.normal(size=(3, 8))
    q = rng.dirichlet(np.ones(3), size=50)
    tau_s, lam = 0.2, 0.7
    want = _loss64(x, q, c, tau_s, lam)
    got = contrastive_loss(torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(c), tau_s, lam)
    np.testing.assert_allclose([float(v) for v in got], want, rtol=1e-10)
    # the float32 gradient training uses vs central finite differences of the float64 formula
    c32 = torch.from_numpy(c.astype(np.float32)).requires_grad_(True)
    contrastive_loss(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(q.astype(np.float32)), c32,
                     tau_s, lam)[0].backward()
    h, fd = 1e-6, np.zeros_like(c)
    for idx in np.ndindex(*c.shape):
        e = np.zeros_like(c)
        e[idx] = h
        fd[idx] = (_loss64(x, q, c + e, tau_s, lam)[0] - _loss64(x, q, c - e, tau_s, lam)[0]) / (2 * h)
    np.testing.assert_allclose(c32.grad.numpy(), fd, rtol=1e-3, atol=1e-5)
    # and autograd vs finite differences in float64, over x's prototypes and a KL-heavy lambda
    c64 = torch.from_numpy(c).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda cc: contrastive_loss(torch.from_numpy(x), torch.from_numpy(q), cc,
                                                                tau_s, 5.0)[0], (c64,))


def test_input_checks(rng):
    x, w, t, centres, _ = _planted(rng, n=50)
    with pytest.raises(PrototypeError, match="one text prototype per visual prototype"):
        train_prototypes(x, None, t[:3], w, centres.astype(np.float32))
    with pytest.raises(PrototypeError, match="z or the projection"):
        train_prototypes(x, None, t, None, centres.astype(np.float32))
    with pytest.raises(PrototypeError, match="joint-space dim"):
        train_prototypes(x, None, t, w[:, :5], centres.astype(np.float32))
    with pytest.raises(PrototypeError, match="zero vector"):
        train_prototypes(x, None, t, w, np.zeros_like(centres, dtype=np.float32))


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_cli_builds_trains_and_refuses_a_collapsed_set(tmp_path, rng):
    """Generated TRIDENT features -> `prototypes build --init text` -> `prototypes train`, then a teacher
    that never prefers one type: training abandons it, the set is refused (exit 1, nothing written)
    unless --force."""
    from proalign.features.io import list_feature_files, read_features
    from proalign.testing.synthetic_features import tissue_centres, write_cohort

    d, dj, g, seed = 64, 16, 4, 3
    feats = tmp_path / "feats"
    write_cohort(feats, n_slides=6, d=d, g=g, seed=seed, n_range=(200, 400))
    w = np.concatenate([rng.normal(size=(d, dj)), np.zeros((d, 1))], axis=1).astype(np.float32)
    t = np.concatenate([tissue_centres(g, d, seed) @ w[:, :dj], np.zeros((g, 1))], axis=1).astype(np.float32)
    names = ["a", "b", "c", "d"]
    save_prototypes(tmp_path / "t.safetensors", t, {"description_set": "syn", "description_set_hash": "h1",
                                                    "type_names": names})
    np.save(tmp_path / "w.npy", w)
    teach = ["--text-prototypes", tmp_path / "t.safetensors", "--projection", tmp_path / "w.npy", "--tau-a", "0.05"]
    run_cli("prototypes", "build", "--features", feats, "--init", "text", *teach, "--out", tmp_path / "init.safetensors",
            check=0)
    out = tmp_path / "out.safetensors"
    common = ["prototypes", "train", "--features", feats, "--batch-size", "256", "--lr", "5e-3"]
    r = run_cli(*common, *teach, "--from", tmp_path / "init.safetensors", "--epochs", "3", "--out", out, check=0)
    assert r.stdout.count("epoch ") == 3 and "usage per prototype" in r.stdout
    c, meta = read_prototype_file(out)
    init = read_prototype_file(tmp_path / "init.safetensors")[0]
    assert c.shape == (g, d) and meta["type_names"] == names and meta["descriptions"] == "syn"
    assert meta["init"] == "train" and meta["train"]["from"]["init"] == "text" and meta["tau_a"] == 0.05
    assert meta["train"]["init_hash"] == meta["train"]["from"]["hash"] != meta["hash"]
    assert [row["epoch"] for row in meta["loss_curve"]] == [1, 2, 3]
    assert meta["train"]["loss_after"]["total"] < meta["train"]["loss_before"]["total"]
    report = json.loads((tmp_path / "out.safetensors.train.json").read_text())
    assert report["loss_curve"] == meta["loss_curve"] and report["usage"] == meta["usage"]
    assert report["hash"] == meta["hash"] and not np.array_equal(c, init)

    # a fifth type whose text is orthogonal to every patch's z: the teacher never gives it mass
    t5 = np.concatenate([t, np.eye(1, dj + 1, dj)]).astype(np.float32)
    save_prototypes(tmp_path / "t5.safetensors", t5, {})
    x = np.concatenate([read_features(e.path, e.slide_id).features for e in list_feature_files(features=feats)])
    # the fifth starts in use: type 0's prototype split in two along its patches' widest axis (a
    # midpoint between two prototypes caught < 1% of the patches for some projections)
    mine = x[np.argmax(_unit(x) @ _unit(init).T, axis=1) == 0]
    axis = np.linalg.svd(mine - mine.mean(0), full_matrices=False)[2][0]
    step = (mine - mine.mean(0)) @ axis
    init5 = np.concatenate([init, init[:1]]).astype(np.float32)
    init5[0] += step.std() * axis
    init5[4] -= step.std() * axis
    assert usage(x, init5)[4] > 10 * COLLAPSE_USAGE  # in use before training
    save_prototypes(tmp_path / "init5.safetensors", init5, {})
    bad = [*common, "--text-prototypes", tmp_path / "t5.safetensors", "--projection", tmp_path / "w.npy",
           "--tau-a", "0.05", "--from", tmp_path / "init5.safetensors", "--epochs", "3"]
    r = run_cli(*bad, "--out", tmp_path / "bad.safetensors", check=1)
    assert "collapsed" in r.stderr and "[4]" in r.stderr
    assert not list(tmp_path.glob("bad.safetensors*"))
    run_cli(*bad, "--out", tmp_path / "bad.safetensors", "--force", check=0)
    assert read_prototype_file(tmp_path / "bad.safetensors")[1]["train"]["collapsed"] == [4]
    assert (tmp_path / "bad.safetensors.train.json").is_file()
    # usage errors
    r = run_cli(*common, "--from", tmp_path / "init.safetensors", "--out", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "--text-prototypes" in r.stderr


def test_cli_descriptions_with_a_vision_language_encoder(tmp_path):
    """--descriptions NAME with a (random-weight) CONCH: the teacher comes from the encoder's text
    tower, W from its projection, tau_a = 1/logit_scale; the set's name, hash and type names are kept."""
    from proalign.testing.random_weights import write_random_conch
    from proalign.prototypes.descriptions import load_descriptions
    from proalign.testing.synthetic_features import write_cohort

    over = write_random_conch(tmp_path / "conch")
    d = over["embed_dim"]
    feats = tmp_path / "feats"
    write_cohort(feats, n_slides=3, d=d, g=16, seed=5, n_range=(100, 150))
    init = np.random.default_rng(0).normal(size=(16, d)).astype(np.float32)
    save_prototypes(tmp_path / "init.safetensors", init, {})
    args = [a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")]
    out = tmp_path / "p.safetensors"
    run_cli("prototypes", "train", "--features", feats, "--encoder", "conch_v1", "--weights", tmp_path / "conch",
            *args, "--device", "cpu", "--descriptions", "lung", "--from", tmp_path / "init.safetensors",
            "--epochs", "2", "--force", "--out", out, check=0)
    c, meta = read_prototype_file(out)
    lung = load_descriptions("lung")
    assert c.shape == (16, d) and meta["descriptions"] == "lung" and meta["descriptions_hash"] == lung.hash
    assert meta["type_names"] == list(lung.type_names) and meta["encoder"] == "conch_v1"
    assert meta["tau_a"] == pytest.approx(meta["train"]["tau_a"]) and meta["tau_a"] != 0.01
