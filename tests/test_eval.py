"""Evaluation, pictures and the report (python/proalign/eval), on cohorts whose answer is planted
in the features (proalign.testing.planted_cohort): a pipeline that loses the signal anywhere (embedding,
store, join with the labels, folds, head, metric) fails the thresholds, and shuffled labels must
fall to chance."""
import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import proalign
from proalign.defaults import default_taus
from proalign.eval import (EvalError, HeadOptions, default_patient_id, evaluate, fit_cox, fit_logistic,
                           group_kfold, load_dataset, read_labels, read_splits)
from proalign.eval import metrics as M
from proalign.eval import plots
from proalign.eval.data import Dataset
from proalign.eval.heads import (C_GRID, _Logistic, choose_alpha, cox_log_partial_likelihood, cox_partial_nll,
                                 one_thread)
from proalign.testing.planted_cohort import planted_cohort
from proalign.features import list_feature_files
from proalign.pipeline import EmbedOptions, embed_features

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """48 patients (64 slides), d=512, K=16: the store of their proalign embeddings."""
    root = tmp_path_factory.mktemp("planted")
    paths = planted_cohort(root, seed=0)
    store = root / "store"
    with one_thread():
        rep = embed_features(list_feature_files(features=paths["features"]), paths["prototypes"], store,
                             EmbedOptions(dtype="float32", backend="torch"), progress=False)
    assert rep.ok and len(rep.done) == 64
    return {**paths, "store": store, "root": root}


@pytest.fixture(scope="module")
def datasets(planted):
    cls = load_dataset(planted["store"], read_labels(planted["labels"], "classify"), "classify")
    surv = load_dataset(planted["store"], read_labels(planted["labels"], "survival"), "survival")
    return cls, surv


def _cohort(seed: int, extra: float = 0.2, null: bool = False, n_patients: int = 48, d: int = 512,
            g: int = 16) -> Dataset:
    """80 slides of 48 patients (the first 32 have two slides) as proalign embeddings (K=16, d=512:
    8,208 long) of patch features drawn from g tissue types. Patients of class 1 carry type 5 in a
    share `extra` of their patches; class 0 never does. `null`: the labels are coin flips drawn
    independently of the classes that shaped the features."""
    from proalign.testing.synthetic_features import tissue_centres

    rng = np.random.default_rng([seed, 3])
    centres = tissue_centres(g, d, seed)
    label = rng.permutation(np.arange(n_patients) % 2)  # balanced, independent of the features
    xs, ys, pats = [], [], []
    with one_thread():
        for p in range(n_patients):
            cls = p % 2
            for _ in range(2 if p < 32 else 1):
                mix = rng.dirichlet(np.ones(g))
                mix[5] = 0
                mix *= (1 - extra * cls) / mix.sum()
                mix[5] = extra * cls
                n = int(rng.integers(150, 260))
                types = rng.choice(g, size=n, p=mix)
                x = centres[types] + 2.4 * rng.standard_normal((n, d)) / np.sqrt(d)
                xs.append(np.ravel(proalign.aggregate(x.astype(np.float32), centres.astype(np.float32),
                                                      backend="torch")))
                ys.append(label[p] if null else cls)
                pats.append(f"case-{p:02d}")
    return Dataset([f"slide-{i:03d}" for i in range(len(xs))], np.array(pats), np.stack(xs), y=np.array(ys),
                   classes=["a", "b"], patient_source="column case_id")


def _png(path, size=None):
    """A valid PNG of `size` (w, h) that is not blank; returns it as an RGB array."""
    from PIL import Image

    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    Image.open(io.BytesIO(data)).verify()
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if size is not None:
        assert (img.shape[1], img.shape[0]) == size
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50, f"{path} looks blank"
    return img


# --- metrics against scikit-learn and hand computations ------------------------------------------

def test_classification_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    assert M.balanced_accuracy(y, p, 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 per class: 0.8, 0.5, 2/3 with supports 3, 2, 1
    assert M.weighted_f1(y, p, 3) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    # quadratic kappa: 1 - sum(w*O)/sum(w*E), w=(i-j)^2
    o = M.confusion(y, p, 3).astype(float)
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    w = np.subtract.outer(np.arange(3), np.arange(3)) ** 2
    assert M.quadratic_kappa(y, p, 3) == pytest.approx(1 - (w * o).sum() / (w * e).sum())
    assert M.quadratic_kappa(y, y, 3) == pytest.approx(1.0)
    # AUC = P(score_pos > score_neg), ties 1/2
    assert M.binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.binary_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(M.binary_auc([1, 1], [0.2, 0.3]))


@pytest.mark.optional
def test_classification_metrics_match_sklearn(rng):
    sk = pytest.importorskip("sklearn.metrics")
    for c in (2, 3, 5):
        y = rng.integers(0, c, 200)
        y[:c] = np.arange(c)
        logits = rng.standard_normal((200, c)) + 1.5 * np.eye(c)[y]
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        proba = np.round(proba, 2)  # ties
        proba /= proba.sum(1, keepdims=True)
        pred = proba.argmax(1)
        assert M.balanced_accuracy(y, pred, c) == pytest.approx(sk.balanced_accuracy_score(y, pred))
        assert M.weighted_f1(y, pred, c) == pytest.approx(sk.f1_score(y, pred, average="weighted"))
        assert M.quadratic_kappa(y, pred, c) == pytest.approx(
            sk.cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(c))))
        want = sk.roc_auc_score(y, proba[:, 1]) if c == 2 else sk.roc_auc_score(y, proba, multi_class="ovr")
        assert M.macro_auc(y, proba) == pytest.approx(want)
        fpr, tpr = M.roc_curve(y == 0, proba[:, 0])
        assert np.trapezoid(tpr, fpr) == pytest.approx(sk.roc_auc_score(y == 0, proba[:, 0]))


def _c_index_brute(t, e, r):
    num = den = 0.0
    for i in range(len(t)):
        for j in range(len(t)):
            if i != j and e[i] and (t[i] < t[j] or (t[i] == t[j] and not e[j])):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def test_c_index_kaplan_meier_logrank(rng):
    # by hand: pairs (event i, later j): (0,1) (0,2) (0,3) (2,3); concordant if risk_i > risk_j
    assert M.c_index([1, 2, 3, 4], [1, 0, 1, 0], [4, 3, 1, 2]) == pytest.approx(3 / 4)
    assert M.c_index([1, 2, 3], [1, 1, 1], [3, 2, 1]) == 1.0
    assert M.c_index([1, 2, 3], [1, 1, 1], [1, 2, 3]) == 0.0
    for _ in range(5):
        n = 40
        t = rng.integers(1, 12, n).astype(float)  # many tied times
        e = rng.uniform(size=n) < 0.7
        r = rng.integers(0, 5, n).astype(float)  # tied risks
        assert M.c_index(t, e, r) == pytest.approx(_c_index_brute(t, e, r))
    ts, s, at_risk = M.kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    np.testing.assert_allclose(ts, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(s, [1, 0.8, 0.6, 0.3, 0.3])
    np.testing.assert_array_equal(at_risk, [5, 5, 4, 2, 1])
    t = rng.exponential(1.0, 200)
    g = np.arange(200) % 2 == 0
    stat, p = M.logrank_test(np.where(g, t / 4, t), np.ones(200), g)
    assert p < 1e-6
    stat, p = M.logrank_test(t, np.ones(200), g)
    assert p > 1e-3


def test_retrieval_leaves_out_the_patient():
    x = np.array([[1, 0], [1, 0.01], [0.9, 0.1], [0, 1], [0.1, 1]], float)
    y = np.array([0, 0, 1, 1, 1])
    patients = ["a", "a", "b", "c", "d"]
    nn = M.cosine_neighbours(x, patients, 2)
    assert nn[0].tolist() == [2, 4] and nn[1].tolist() == [2, 4]  # never its own patient's other slide
    hit = M.retrieval_accuracy(x, y, patients, [1])[1]
    assert hit.tolist() == [False, False, False, True, True]
    assert M.majority_vote(np.array([[1, 0, 0], [2, 1, -1]]), 3).tolist() == [0, 2]


# --- heads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,p", [(2, 30), (2, 300), (3, 30), (3, 300)])
def test_logistic_is_the_penalised_optimum(rng, c, p):
    """Optimality of sum log-loss + ||W||^2 / (2C), read off the predicted probabilities alone:
    the gradient in the bias is sum(P - Y) = 0 and in W it is X^T (P - Y) + W / C = 0, so
    W = -C X^T (P - Y), and these W must reproduce the logits up to the bias."""
    n, C = 80, 0.5
    x = rng.standard_normal((n, p))
    y = (x[:, :c] + 0.7 * rng.standard_normal((n, c))).argmax(1)
    proba = fit_logistic(x, y, c, C=C, standardize=False)(x)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    if c == 2:  # one logit for class 1
        r = (proba[:, 1] - (y == 1))[:, None]
        logit = np.log(proba[:, 1] / proba[:, 0])[:, None]
    else:
        r = proba - np.eye(c)[y]
        logit = np.log(proba)
        logit -= logit[:, :1]  # softmax logits up to a per-row constant
    np.testing.assert_allclose(r.sum(0), 0.0, atol=1e-6)
    w = -C * x.T @ r
    resid = logit - (x @ w if c == 2 else x @ w - (x @ w)[:, :1])
    np.testing.assert_allclose(resid - resid.mean(0), 0.0, atol=1e-5)  # only the bias is left


@pytest.mark.optional
@pytest.mark.parametrize("c,p", [(2, 30), (3, 300)])
def test_logistic_matches_sklearn(rng, c, p):
    lm = pytest.importorskip("sklearn.linear_model")
    n = 80
    x = rng.standard_normal((n, p))
    y = (x[:, :c] + 0.7 * rng.standard_normal((n, c))).argmax(1)
    mine = fit_logistic(x, y, c, C=0.5, standardize=False)(x)
    ref = lm.LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(mine, ref, atol=2e-4)


def test_cox_partial_likelihood_and_fit(rng):
    import torch
    from scipy.optimize import minimize

    t = rng.integers(1, 8, 30).astype(float)  # ties
    e = (rng.uniform(size=30) < 0.7).astype(float)
    x = rng.standard_normal((30, 3))

    def nll(w):  # Breslow, written out
        eta = x @ w
        return -sum(eta[i] - np.log(np.exp(eta[t >= t[i]]).sum()) for i in range(30) if e[i]) + 0.5 * (w @ w)

    w0 = rng.standard_normal(3)
    got = cox_partial_nll(torch.from_numpy(x @ w0), torch.from_numpy(t), torch.from_numpy(e)).item() + 0.5 * w0 @ w0
    assert got == pytest.approx(nll(w0))
    best = minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(fit_cox(x, t, e, alpha=1.0, standardize=False)(x), x @ best, atol=1e-4)
    # p > n goes through the row space: the same optimum as the fit over all p weights
    xw = rng.standard_normal((30, 60))
    tt, te, tx = torch.from_numpy(t), torch.from_numpy(e), torch.from_numpy(xw)

    def full(w):
        w = torch.tensor(w, requires_grad=True)
        loss = cox_partial_nll(tx @ w, tt, te) + w @ w  # alpha = 2
        loss.backward()
        return loss.item(), w.grad.numpy()

    best = minimize(full, np.zeros(60), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14}).x
    np.testing.assert_allclose(fit_cox(xw, t, e, alpha=2.0, standardize=False)(xw), xw @ best, atol=1e-4)


# --- labels, patients, splits ----------------------------------------------------------------------

def test_labels_and_patient_ids(tmp_path):
    assert default_patient_id("TCGA-2F-A9KO-01Z-00-DX1.195576CF") == "TCGA-2F-A9KO"
    assert default_patient_id("slide_7") == "slide_7"
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label,patient_id,time,censorship\nTCGA-AB-0001-01Z,x,,5,1\ns2,y,P9,3,0\ns3,,P9,2,0\n")
    lab = read_labels(p, "classify")
    assert lab.slide_ids == ["TCGA-AB-0001-01Z", "s2"] and lab.patients == ["TCGA-AB-0001", "P9"]
    assert lab.dropped == {"s3": "no label"}
    assert lab.patient_source == "column patient_id (1 rows without one: TCGA barcode, else slide id)"
    surv = read_labels(p, "survival")
    assert surv.event.tolist() == [0.0, 1.0, 1.0] and surv.time.tolist() == [5, 3, 2]
    p.write_text("slide_id,label\na,1\na,2\n")
    with pytest.raises(EvalError, match="appears twice"):
        read_labels(p, "classify")
    with pytest.raises(EvalError, match="time"):
        read_labels(p, "survival")
    p.write_text("id,label\na,1\n")
    with pytest.raises(EvalError, match="slide_id"):
        read_labels(p, "classify")


def test_patient_column_detection(tmp_path):
    """case_id (CLAM's and PANTHER's name), then patient_id, then patient; else the TCGA barcode,
    else the slide id; a --patient-col that is not in the file is an error naming file and columns."""
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label,patient,patient_id,case_id\ns1,x,A,P1,C1\ns2,y,A,P2,C1\ns3,x,B,P3,C2\n")
    lab = read_labels(p, "classify")
    assert lab.patients == ["C1", "C1", "C2"] and lab.patient_source == "column case_id"
    assert read_labels(p, "classify", patient_col="patient").patients == ["A", "A", "B"]
    p.write_text("slide_id,label,patient\ns1,x,A\ns2,y,A\n")
    lab = read_labels(p, "classify")
    assert lab.patients == ["A", "A"] and lab.patient_source == "column patient"
    with pytest.raises(EvalError, match=r"l\.csv: no patient column 'case' .*columns: slide_id, label, patient"):
        read_labels(p, "classify", patient_col="case")
    p.write_text("slide_id,label\nTCGA-AB-0001-01Z-00-DX1,x\nTCGA-AB-0001-01Z-00-DX2,y\n")
    lab = read_labels(p, "classify")
    assert lab.patients == ["TCGA-AB-0001"] * 2 and lab.patient_source == "TCGA barcode"
    p.write_text("slide_id,label\nTCGA-AB-0001-01Z-00-DX1,x\nother,y\n")
    assert read_labels(p, "classify").patient_source == "TCGA barcode (1 of 2 slides: slide id)"
    p.write_text("slide_id,label\ns1,x\ns2,y\n")
    lab = read_labels(p, "classify")
    assert lab.patients == ["s1", "s2"] and lab.patient_source == "slide id"


def test_group_kfold_never_splits_a_patient(rng):
    for trial in range(20):
        n = int(rng.integers(30, 120))
        patients = rng.integers(0, n // 2, n).astype(str)
        strata = rng.integers(0, 3, n)
        folds = int(rng.integers(2, 6))
        sp = group_kfold(patients, strata, folds, seed=trial)
        seen = np.concatenate([te for _, te in sp])
        assert sorted(seen.tolist()) == list(range(n))  # every slide tested exactly once
        for tr, te in sp:
            assert not set(patients[tr]) & set(patients[te])
            assert len(set(tr.tolist()) | set(te.tolist())) == n
        # seeded: same seed same folds, and stratified (each stratum spread across folds)
        again = group_kfold(patients, strata, folds, seed=trial)
        assert all((a[1] == b[1]).all() for a, b in zip(sp, again))
    patients = np.array([f"p{i}" for i in range(100)])
    strata = np.repeat([0, 1], [80, 20])
    for _, te in group_kfold(patients, strata, 5, seed=0):
        assert (strata[te] == 1).sum() == 4 and len(te) == 20
    with pytest.raises(EvalError, match="patients cannot make"):
        group_kfold(["a", "a", "b"], None, 3, 0)


def test_given_splits(tmp_path):
    ids = ["a", "b", "c", "d"]
    p = tmp_path / "s.csv"
    p.write_text("slide_id,fold\na,0\nb,0\nc,1\nd,1\nzz,1\n")
    sp = read_splits(p, ids)
    assert [te.tolist() for _, te in sp] == [[0, 1], [2, 3]] and sp[0][0].tolist() == [2, 3]
    p.write_text("slide_id,fold,split\na,0,train\nb,0,train\nc,0,test\nd,0,val\n")
    with pytest.raises(EvalError, match="in no split"):
        read_splits(p, ids)  # d is only in val
    sp = read_splits(p, ["a", "b", "c"])
    assert sp[0][0].tolist() == [0, 1] and sp[0][1].tolist() == [2]


# --- the planted cohort: the answer is known --------------------------------------------------------

def test_planted_classification(datasets):
    cls, _ = datasets
    assert cls.classes == ["LUAD", "LUSC"] and len(cls.slide_ids) == 64 and len(set(cls.patients)) == 48
    for head in (None, "panther-linear"):  # None: the default, logistic with C by inner CV
        r = evaluate(cls, "classify", HeadOptions(head=head, seed=0))
        s = r.summary()
        assert s["balanced_accuracy"]["mean"] > 0.9, (head, r.table())
        assert s["macro_auc"]["mean"] > 0.9 and s["weighted_f1"]["mean"] > 0.9 and s["quadratic_kappa"]["mean"] > 0.75
        fold = np.array(r.predictions["fold"])
        for p in set(cls.patients):  # no patient spans folds
            assert len(set(fold[cls.patients == p])) == 1
    # chance when the labels are shuffled (mean of three shuffles)
    rng = np.random.default_rng(5)
    shuffled = [evaluate(dataclasses.replace(cls, y=rng.permutation(cls.y)), "classify", HeadOptions())
                .summary()["balanced_accuracy"]["mean"] for _ in range(3)]
    assert 0.3 < np.mean(shuffled) < 0.7, shuffled


def test_planted_survival(datasets):
    _, surv = datasets
    for head in (None, "panther-linear"):  # None: the default, ridge Cox with alpha by inner CV
        r = evaluate(surv, "survival", HeadOptions(head=head, seed=0))
        assert r.summary()["c_index"]["mean"] > 0.8, (head, r.table())
        if head is None:
            assert r.info["head"] == "cox" and len(r.info["chosen_alpha"]) == 5
            assert all(a in r.info["search"]["grid"] for a in r.info["chosen_alpha"])
            assert r.info["search"]["metric"] == "cross-validated partial-likelihood deviance"
    assert r.info["head"] == "panther-linear"
    rng = np.random.default_rng(5)
    perms = [rng.permutation(len(surv.time)) for _ in range(3)]
    shuffled = [evaluate(dataclasses.replace(surv, time=surv.time[q], event=surv.event[q]), "survival", HeadOptions())
                .summary()["c_index"]["mean"] for q in perms]
    assert 0.3 < np.mean(shuffled) < 0.7, shuffled


def test_planted_retrieval(datasets):
    cls, _ = datasets
    s = evaluate(cls, "retrieve", HeadOptions(), ks=(1, 5)).summary()
    assert s["mv_accuracy@5"]["mean"] > 0.9 and s["accuracy@1"]["mean"] > 0.9
    rng = np.random.default_rng(1)
    sh = evaluate(dataclasses.replace(cls, y=rng.permutation(cls.y)), "retrieve", HeadOptions(), ks=(5,)).summary()
    assert sh["mv_accuracy@5"]["mean"] < 0.75


# --- the default heads: inner search, null cohorts, PANTHER's head ---------------------------------

def test_default_head_finds_the_planted_label():
    """80 slides of 48 patients, class 1 carries an extra tissue type in 20% of its patches: the
    default head (logistic, C by inner patient-grouped CV) finds it; PANTHER's head is run too,
    for the record, and warns that 50 optimiser steps leave it undertrained."""
    ds = _cohort(0)
    assert len(ds.slide_ids) == 80 and len(set(ds.patients)) == 48
    assert ds.x.shape[1] == len(default_taus()) * (16 + 16 * 512)  # the default reading's rows, concatenated
    r = evaluate(ds, "classify")
    ba = r.summary()["balanced_accuracy"]
    print(f"default head: balanced accuracy {ba['mean']:.3f} ± {ba['std']:.3f}, C {r.info['chosen_C']}, "
          f"{r.info['seconds']} s")
    assert ba["mean"] > 0.9, r.table()
    assert r.info["head"] == "logistic" and r.info["options"]["head"] == "logistic" and r.info["options"]["C"] is None
    assert len(r.info["chosen_C"]) == 5 and all(c in C_GRID for c in r.info["chosen_C"])
    assert r.info["search"]["inner_folds"] == [3] * 5 and r.info["warnings"] == []
    assert all(len(sc) == len(C_GRID) for sc in r.info["search"]["scores"])
    p = evaluate(ds, "classify", HeadOptions(head="panther-linear"))
    print(f"panther-linear: balanced accuracy {p.summary()['balanced_accuracy']['mean']:.3f}")
    assert p.info["optimiser_steps"] == [50] * 5 and "likely undertrained" in p.info["warnings"][0]


def test_default_head_stays_at_chance_on_null_cohorts():
    """Labels drawn independently of the features: five cohorts, the mean balanced accuracy within
    0.5 ± 0.1 (one cohort's spread is about ±0.06, so the mean of five is ±0.03: a search that
    peeked at the test folds, or folds that split patients, would push it up) and every run below
    0.7. The search should settle on strong regularisation (the grid's strong half)."""
    bas, chosen = [], []
    for seed in range(5):
        r = evaluate(_cohort(seed, null=True), "classify")
        bas.append(r.summary()["balanced_accuracy"]["mean"])
        chosen += r.info["chosen_C"]
    print(f"null cohorts: balanced accuracy {np.round(bas, 3).tolist()}, mean {np.mean(bas):.3f}")
    assert abs(np.mean(bas) - 0.5) < 0.1 and max(bas) < 0.7, bas
    assert np.median(chosen) <= 1e-3, chosen


def test_inner_search_never_sees_the_test_fold(datasets):
    """Replace the outer test fold's embeddings by garbage: the search of that fold scores every
    C (alpha) exactly as before, so it chose the same. Garbage in one of its training slides does
    change the scores (the check can fail)."""
    ds = _cohort(1, null=True)  # null: the scores are not all at one end of the grid
    sp = group_kfold(ds.patients, ds.y, 5, seed=0)
    te0, tr0 = sp[0][1], sp[0][0]
    garbage = np.random.default_rng(0).normal(0, 50, (len(te0), ds.x.shape[1])).astype(np.float32)

    def run(rows):
        x = ds.x.copy()
        x[rows] = garbage[:len(rows)]
        return evaluate(dataclasses.replace(ds, x=x), "classify", splits=sp).info

    base, test_garbage, train_garbage = evaluate(ds, "classify", splits=sp).info, run(te0), run(tr0[:3])
    assert test_garbage["search"]["scores"][0] == base["search"]["scores"][0]
    assert test_garbage["chosen_C"][0] == base["chosen_C"][0]
    assert train_garbage["search"]["scores"][0] != base["search"]["scores"][0]
    _, surv = datasets  # survival: alpha, likewise
    sp = group_kfold(surv.patients, surv.event.astype(int), 5, seed=0)
    x = surv.x.copy()
    x[sp[0][1]] = np.random.default_rng(1).normal(0, 50, (len(sp[0][1]), x.shape[1]))
    a = evaluate(surv, "survival", splits=sp).info
    b = evaluate(dataclasses.replace(surv, x=x), "survival", splits=sp).info
    assert a["search"]["scores"][0] == b["search"]["scores"][0] and a["chosen_alpha"][0] == b["chosen_alpha"][0]


def test_search_fits_match_the_cold_fit(rng):
    """The search's shortcuts (one decomposition per inner training set, warm starts along the
    grid, held-out log-loss from the row-space projection; Cox's numpy partial likelihood) give the
    numbers the plain fits give."""
    x = rng.standard_normal((60, 200))
    y = (x[:, 0] + rng.standard_normal(60) > 0).astype(int)
    tr, va = np.arange(40), np.arange(40, 60)
    prob = _Logistic(x[tr], y[tr], 2)
    theta = None
    for c in (1e-3, 1e-1, 10.0):
        theta = prob.solve(c, theta)
        p = fit_logistic(x[tr], y[tr], 2, C=c)(x[va])
        assert prob.log_loss(prob.project(x[va]), y[va], theta) == pytest.approx(-np.log(p[np.arange(20), y[va]]).sum(),
                                                                                  rel=1e-6)
    import torch

    t = rng.integers(1, 8, 30).astype(float)
    e = (rng.uniform(size=30) < 0.7).astype(float)
    eta = rng.standard_normal(30)
    want = -cox_partial_nll(torch.from_numpy(eta), torch.from_numpy(t), torch.from_numpy(e)).item()
    assert cox_log_partial_likelihood(eta, t, e) == pytest.approx(want, rel=1e-10)


def test_inner_folds_fall_back_then_fail(datasets):
    """Training folds with 2 patients of a class: 2 inner folds; with 1: a clear error that says
    how to go on (a fixed C works)."""
    cls, _ = datasets
    pats = sorted(set(cls.patients.tolist()))
    cls_of = {p: int(cls.y[cls.patients == p][0]) for p in pats}
    keep6 = [p for c in (0, 1) for p in [q for q in pats if cls_of[q] == c][:3]]  # 3 patients per class
    idx = np.flatnonzero(np.isin(cls.patients, keep6))
    small = dataclasses.replace(cls, slide_ids=[cls.slide_ids[i] for i in idx], patients=cls.patients[idx],
                                x=cls.x[idx], y=cls.y[idx])
    r = evaluate(small, "classify", folds=3)
    assert r.info["search"]["inner_folds"] == [2, 2, 2]
    keep4 = [p for c in (0, 1) for p in [q for q in pats if cls_of[q] == c][:2]]
    idx = np.flatnonzero(np.isin(cls.patients, keep4))
    tiny = dataclasses.replace(cls, slide_ids=[cls.slide_ids[i] for i in idx], patients=cls.patients[idx],
                               x=cls.x[idx], y=cls.y[idx])
    with pytest.raises(EvalError, match=r"fold 0: cannot choose C by inner cross-validation: .*only 1 patient.*"
                                        r"give a fixed --C"):
        evaluate(tiny, "classify", folds=2)
    r = evaluate(tiny, "classify", HeadOptions(C=0.5), folds=2)
    assert r.info["chosen_C"] == [0.5, 0.5] and r.info["search"] is None
    # survival: only patients with an event count (censored ones may be few)
    x = np.random.default_rng(0).standard_normal((12, 5))
    time, pats = np.arange(1.0, 13.0), np.array([f"p{i}" for i in range(12)])
    alpha, s = choose_alpha(x, time, np.array([1, 1] + [0] * 10, float), pats)
    assert s["inner_folds"] == 2
    alpha, s = choose_alpha(x, time, np.array([0] + [1] * 11, float), pats)
    assert s["inner_folds"] == 3
    with pytest.raises(EvalError, match=r"cannot choose alpha .* only 1 patient\(s\) with an event"):
        choose_alpha(x, time, np.array([1] + [0] * 11, float), pats)


def test_default_heads_are_fast():
    """100 slides of 8,208-long embeddings: the inner search of every outer fold included, an
    evaluation takes well under a second on one core (a few seconds at most under load)."""
    ds = _cohort(2, n_patients=68)
    assert ds.x.shape == (100, len(default_taus()) * 8208)
    rng = np.random.default_rng(0)
    surv = dataclasses.replace(ds, y=None, classes=None, time=rng.exponential(1, 100) * np.exp(-ds.y),
                               event=(rng.uniform(size=100) < 0.8).astype(float))
    for task, d in (("classify", ds), ("survival", surv)):
        r = evaluate(d, task)
        print(f"{task}: {r.info['seconds']} s for 100 slides of 8,208")
        assert r.info["seconds"] < 10, r.info["seconds"]


def test_panther_head_warns(planted, datasets, caplog):
    """PANTHER's head on 64 slides: 50 optimiser steps per fold, a warning (log, info, the CLI's
    printed line) that says so; `linear` still works as a deprecated alias. Enough steps: silence."""
    cls, _ = datasets
    r = evaluate(cls, "classify", HeadOptions(head="panther-linear"))
    assert r.info["optimiser_steps"] == [50] * 5
    (w,) = r.info["warnings"]
    assert "took only 50 optimiser steps" in w and "thousands of slides" in w and "likely undertrained" in w
    assert "took only 50 optimiser steps" in caplog.text
    r = evaluate(cls, "classify", HeadOptions(head="panther-linear", epochs=80, batch_size=16))
    assert min(r.info["optimiser_steps"]) >= 300 and r.info["warnings"] == []
    out = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "classify",
                  "--head", "linear")
    assert out.exit_code == 0, out.output
    assert "warning: --head linear is a deprecated alias of --head panther-linear" in out.stdout
    assert "warning: head panther-linear took only 50 optimiser steps" in out.stdout
    assert "head panther-linear (PANTHER's probe" in out.stdout


def _invoke(*args):
    """The CLI in this process (no interpreter start-up); the error line goes to result.stderr."""
    from click.testing import CliRunner

    from proalign.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_eval_cli_json_and_errors(planted, cli, tmp_path, caplog):
    out = tmp_path / "e.json"
    r = cli("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "classify", "--folds", 4,
            "--json", out, check=0)
    assert "balanced_accuracy" in r.stdout and "±" in r.stdout
    assert "patients: column patient_id (48 patients for 64 slides)" in r.stdout
    assert re.search(r"head logistic, C chosen by inner 3-fold patient-grouped CV .*: (\S+ ){3}\S+$", r.stdout, re.M)
    j = json.loads(out.read_text())
    assert set(j) == {"balanced_accuracy", "macro_auc", "weighted_f1", "quadratic_kappa"}
    for v in j.values():
        assert set(v) == {"mean", "std", "folds"} and len(v["folds"]) == 4
        assert v["mean"] == pytest.approx(np.mean(v["folds"])) and v["std"] == pytest.approx(np.std(v["folds"]))
    run = json.loads(out.with_name("e.run.json").read_text())
    assert run["info"]["n_folds"] == 4 and len(run["predictions"]["proba"]) == 64
    # labelled slides missing from the store: reported with counts; --strict makes it an error
    lab = tmp_path / "l.csv"
    rows = planted["labels"].read_text().splitlines()
    lab.write_text("\n".join(rows + ["GHOST-1,GHOST-1,LUAD,1,1,0", "GHOST-2,GHOST-2,LUSC,1,1,0"]) + "\n")
    r = _invoke("eval", "--store", planted["store"], "--labels", lab, "--task", "retrieve")
    assert r.exit_code == 0 and "mv_accuracy@5" in r.stdout
    r = _invoke("eval", "--store", planted["store"], "--labels", lab, "--task", "retrieve", "--neighbours", 2)
    assert r.exit_code == 0 and "mv_accuracy@2" in r.stdout and "mv_accuracy@5" not in r.stdout
    assert "2 of 66 labelled slides are not in the store" in caplog.text
    r = _invoke("eval", "--store", planted["store"], "--labels", lab, "--task", "retrieve", "--strict")
    assert r.exit_code == 2 and "2 of 66 labelled slides" in r.stderr and "GHOST-1" in r.stderr
    # too few samples per class
    few = tmp_path / "few.csv"
    body = rows[1:41]
    body[0] = re.sub(",(LUAD|LUSC),", ",RARE,", body[0])
    few.write_text("\n".join([rows[0]] + body) + "\n")
    r = _invoke("eval", "--store", planted["store"], "--labels", few, "--task", "classify")
    assert r.exit_code == 2 and "too few samples per class" in r.stderr and "'RARE': 1 slides of 1 patients" in r.stderr
    none = tmp_path / "none.csv"
    none.write_text("slide_id,label\nX1,a\nX2,b\n")
    r = _invoke("eval", "--store", planted["store"], "--labels", none, "--task", "classify")
    assert r.exit_code == 2 and "no labelled slide is stored" in r.stderr
    r = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "classify",
                "--head", "cox")
    assert r.exit_code == 2 and "does not fit" in r.output
    r = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "survival", "--C", 1)
    assert r.exit_code == 2 and "--C sets logistic regression, not --head cox" in r.output
    # a fixed --C / --alpha: no search
    r = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "classify", "--C", 0.5,
                "--json", out)
    assert r.exit_code == 0 and "head logistic, C = 0.5 (fixed)" in r.stdout, r.output
    info = json.loads(out.with_name("e.run.json").read_text())["info"]
    assert info["chosen_C"] == [0.5] * 5 and info["search"] is None and info["options"]["C"] == 0.5
    r = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "survival")
    assert r.exit_code == 0 and "head cox, alpha chosen by inner 3-fold patient-grouped CV" in r.stdout, r.output
    r = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "survival", "--alpha", 10)
    assert r.exit_code == 0 and "head cox, alpha = 10 (fixed)" in r.stdout, r.output


def test_eval_cli_groups_by_case_id(planted, tmp_path):
    """A CLAM/PANTHER labels CSV: `case_id` groups the slides (here 3 planted patients of one class
    per case, 16 cases for 64 slides); no case spans folds, and eval prints where patients came from."""
    rows = planted["labels"].read_text().splitlines()
    lab = tmp_path / "cases.csv"
    body = []
    for r in rows[1:]:
        sid, pid, label = r.split(",")[:3]
        p = int(pid[-4:])
        body.append(f"{sid},case-{p % 2}-{p // 6},{label}")
    lab.write_text("slide_id,case_id,label\n" + "\n".join(body) + "\n")
    out = tmp_path / "e.json"
    r = _invoke("eval", "--store", planted["store"], "--labels", lab, "--task", "classify", "--json", out)
    assert r.exit_code == 0, r.output
    assert "patients: column case_id (16 patients for 64 slides)" in r.stdout
    run = json.loads(out.with_name("e.run.json").read_text())
    assert run["info"]["patient_source"] == "column case_id" and run["info"]["n_patients"] == 16
    fold_of = {}
    for sid, case, f in zip(run["predictions"]["slide_id"], run["predictions"]["patient_id"],
                            run["predictions"]["fold"]):
        assert case == next(b.split(",")[1] for b in body if b.startswith(sid + ","))
        assert fold_of.setdefault(case, f) == f, f"{case} spans folds"
    assert len(fold_of) == 16 and len(set(fold_of.values())) == 5
    # without case_id: the TCGA barcode (48 patients); a named column must exist
    r = _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "classify",
                "--patient-col", "case_id")
    assert r.exit_code == 2 and "labels.csv: no patient column 'case_id'" in r.stderr
    assert "columns: slide_id, patient_id, label, time, event, grade" in r.stderr
    lab.write_text("slide_id,label\n" + "\n".join(f"{b.split(',')[0]},{b.split(',')[2]}" for b in body) + "\n")
    r = _invoke("eval", "--store", planted["store"], "--labels", lab, "--task", "classify")
    assert r.exit_code == 0 and "patients: TCGA barcode (48 patients for 64 slides)" in r.stdout, r.output


def test_eval_compare(planted, cli, tmp_path):
    out = tmp_path / "cmp"
    manifest = tmp_path / "m.csv"  # 40 of the 64 slides keep it quick
    files = sorted(planted["features"].glob("*.h5"))[:40]
    manifest.write_text("slide_id,path\n" + "".join(f"{f.stem},{f}\n" for f in files))
    with one_thread():  # small tensors: one thread beats two that contend with other jobs
        r = _invoke("eval", "compare", "--manifest", manifest, "--prototypes", planted["prototypes"],
                    "--labels", planted["labels"], "--task", "classify", "--methods", "proalign,panther,h2t,mean",
                    "--folds", 4, "--backend", "torch", "--out", out)
    assert r.exit_code == 0, r.output
    table = r.stdout
    assert "patients: column patient_id (30 patients for 40 slides)" in table, table
    for m in ("proalign", "panther", "h2t", "mean"):  # the default head for every method, C chosen per method
        assert re.search(rf"^{m}: head logistic, C chosen by inner 3-fold patient-grouped CV", table, re.M), table
    for m in ("proalign", "panther", "h2t", "mean"):
        assert re.search(rf"^{m}\s+\d\.\d{{3}} ± ", table, re.M), table
    j = json.loads((out / "compare.json").read_text())
    assert list(j) == ["proalign", "panther", "h2t", "mean"]
    assert j["proalign"]["balanced_accuracy"]["mean"] > 0.9
    folds = [json.loads((out / f"eval-{m}.run.json").read_text())["predictions"]["fold"] for m in j]
    assert all(f == folds[0] for f in folds)  # the same folds for every method
    with proalign.open_store(out / "stores" / "panther") as s:
        assert len(s) == 40 and s.meta(next(iter(s)))["method"] == "panther"
    from proalign.eval.report import build_report

    page = build_report(out / "stores" / "proalign", tmp_path / "r.html", [out / "compare.json"]).read_text()
    assert page.count("data:image/png;base64,") == 2  # usage chart + one ROC figure with every method
    assert all(f"<td>{m}</td>" in page for m in ("proalign", "panther", "h2t", "mean"))


# --- pictures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slide_case(tmp_path_factory):
    """A small synthetic SVS and a features file on its patch grid: the left half of the slide is
    type 0, the right half type 1."""
    from proalign.testing.synthetic_slides import write_aperio_svs
    from proalign.testing.synthetic_features import tissue_centres, write_trident_h5
    from proalign.prototypes.io import save_prototypes

    root = tmp_path_factory.mktemp("slide")
    svs = root / "s.svs"
    write_aperio_svs(svs, 2048, 1536, tile=256, levels=(1, 4), tissue="dense", seed=3)
    xs, ys = np.meshgrid(np.arange(0, 2048, 256), np.arange(0, 1536, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    c = tissue_centres(4, 32, 0)
    rng = np.random.default_rng(0)
    types = (coords[:, 0] >= 1024).astype(int)
    x = (c[types] + 0.3 * rng.standard_normal((len(coords), 32))).astype(np.float32)
    feats = root / "s.h5"
    write_trident_h5(feats, x, coords)
    with __import__("h5py").File(feats, "a") as f:
        f["coords"].attrs["patch_size_level0"] = 256
    protos = root / "p.safetensors"
    save_prototypes(protos, c.astype(np.float32), {"type_names": ["tumour", "stroma", "necrosis", "fat"]})
    return svs, feats, protos, x, coords, c


def test_attention_and_heatmap_cli(slide_case, cli, tmp_path):
    svs, feats, protos, x, coords, c = slide_case
    a = plots.attention(x, c, 0.1)
    np.testing.assert_allclose(a.sum(0), 1.0)
    ref = np.ravel(proalign.aggregate(x, c, method="proalign", tau=0.1, over="patches", backend="torch"))  # h_k = sum_i a_ik x_i
    np.testing.assert_allclose(ref[4:].reshape(4, 32), a.T @ x, rtol=1e-4, atol=1e-4)
    left = coords[:, 0] < 1024
    assert a[left, 0].sum() > 0.99 and a[~left, 1].sum() > 0.99  # attention sits where the type is
    out = tmp_path / "h.png"
    r = cli("heatmap", svs, "--feature-file", feats, "--prototypes", protos, "--out", out, check=0)
    assert "wrote" in r.stdout
    with proalign.open_slide(svs) as s:
        th = s.get_thumbnail(1024).shape[:2]
    _png(out, plots.heatmap_size(4, th))
    names = plots.prototype_names(4, {"type_names": ["tumour", "stroma", "necrosis", "fat"]})
    assert names == ["tumour", "stroma", "necrosis", "fat"]
    plots.attention_heatmap(a, coords, 256, tmp_path / "blank.png", names)  # no slide: blank canvas
    _png(tmp_path / "blank.png", plots.heatmap_size(4, (768, 1024)))


def test_montage_usage_map_roc_km(slide_case, planted, cli, tmp_path):
    svs, feats, protos, *_ = slide_case
    out = tmp_path / "m.png"
    r = _invoke("plot", "montage", svs, "--feature-file", feats, "--prototypes", protos, "--n", 5, "--out", out)
    assert r.exit_code == 0, r.output
    _png(out, plots.montage_size(4, 5))
    pi, meta = plots.usage_from_store(planted["store"])
    assert pi.shape == (64, 16) and np.allclose(pi.sum(1), 1, atol=1e-5)
    _png(plots.prototype_usage(pi, tmp_path / "u.png"), plots.usage_size(16))
    cls = load_dataset(planted["store"], read_labels(planted["labels"], "classify"), "classify")
    _png(plots.embedding_map(cls.x, [cls.classes[i] for i in cls.y], tmp_path / "map.png"), (600, 500))
    xy = plots.pca_2d(cls.x)
    # the planted classes split the map: a line through it (least squares on the two PCs) separates them
    fit = np.c_[xy, np.ones(len(xy))] @ np.linalg.lstsq(np.c_[xy, np.ones(len(xy))], cls.y - 0.5, rcond=None)[0]
    assert ((fit > 0) == (cls.y == 1)).mean() > 0.9
    ej = tmp_path / "c.json"
    evaluate(cls, "classify", HeadOptions(head="logistic")).write_json(ej)
    _png(plots.roc_figure(plots.load_run(ej), tmp_path / "roc.png"), (500, 500))
    surv = load_dataset(planted["store"], read_labels(planted["labels"], "survival"), "survival")
    sj = tmp_path / "s.json"
    evaluate(surv, "survival", HeadOptions(head="cox")).write_json(sj)
    run = plots.load_run(sj)
    high = plots.risk_groups(run)
    t = np.array(run["predictions"]["time"])
    assert np.median(t[high]) < np.median(t[~high])  # the predicted high-risk half dies earlier
    _png(plots.km_figure(run, tmp_path / "km.png"), (600, 450))
    r = _invoke("plot", "usage", "--store", planted["store"], "--out", tmp_path / "u2.png")
    assert r.exit_code == 0 and "wrote" in r.stdout
    for sub, arg in (("roc", ej), ("km", sj)):
        assert _invoke("plot", sub, "--eval-json", arg, "--out", tmp_path / f"{sub}2.png").exit_code == 0
        _png(tmp_path / f"{sub}2.png")



@pytest.fixture(scope="module")
def slide_and_conch(tmp_path_factory):
    """A generated 20x slide and a tiny random CONCH (weights folder + its config overrides)."""
    from proalign.testing.random_weights import write_random_conch
    from proalign.testing.synthetic_slides import write_aperio_svs

    root = tmp_path_factory.mktemp("heat")
    svs = root / "case-7.svs"
    write_aperio_svs(svs, 2048, 1536, tile=256, levels=(1, 4), seed=7, tissue="blobs", mpp=0.5, app_mag=20)
    over = write_random_conch(root / "conch")
    return svs, root / "conch", over


def test_heatmap_straight_from_the_slide(slide_and_conch, tmp_path, rng):
    """Slide + encoder -> features and coords through the slides pipeline -> the same heatmap as the
    features-file path on those features; panel titles are the prototype file's type names."""
    from PIL import Image

    from proalign.encoders import create_encoder
    from proalign.pipeline.embed_slides import SlideOptions
    from proalign.prototypes.io import save_prototypes
    from proalign.slides.patching import patch_slide

    svs, weights, over = slide_and_conch
    enc = create_encoder("conch_v1", weights, **over)
    names = ["tumour", "stroma", "necrosis"]
    c = rng.normal(size=(3, enc.feature_dim)).astype(np.float32)
    protos = tmp_path / "p.safetensors"
    save_prototypes(protos, c, {"type_names": names})
    with one_thread():
        res = plots.slide_pictures(svs, protos, tmp_path / "h.png", encoder=enc,
                                   slide_options=SlideOptions(magnification=20, patch_size=128),
                                   save_features=tmp_path / "feats", montage_out=tmp_path / "m.png", montage_n=4)
    _, grid = patch_slide(svs, patch_size=128, target_magnification=20)
    n = len(grid)
    assert n > 20 and res.features.shape == (n, enc.feature_dim) and res.coords.shape == (n, 2)
    assert sorted(map(tuple, res.coords.tolist())) == sorted(map(tuple, grid.coords.tolist()))
    assert res.patch_size == grid.patch_size_level0 == 128 and res.slide_id == "case-7"
    # attention: a_ik = softmax over the slide's patches, each prototype's column sums to 1
    assert res.attention.shape == (n, 3)
    np.testing.assert_allclose(res.attention.sum(0), 1.0, rtol=1e-9)
    np.testing.assert_allclose(res.attention, plots.attention(res.features, c, 0.1))
    assert res.names == names and len(res.titles) == 3
    for t, name in zip(res.titles, names):
        assert t.startswith(f"{name} (peak ") and t.endswith("× uniform)"), t
    with proalign.open_slide(svs) as s:
        th = s.get_thumbnail(1024).shape[:2]
    img = _png(res.heatmap, plots.heatmap_size(3, th))
    _png(res.montage, plots.montage_size(3, 4))
    # the features-file path on the kept features: the same arrays, titles and picture
    assert res.features_path == tmp_path / "feats" / "case-7.h5"
    ref = plots.slide_pictures(svs, protos, tmp_path / "h_ref.png", features_path=res.features_path)
    np.testing.assert_array_equal(ref.coords, res.coords)
    np.testing.assert_array_equal(ref.attention, res.attention)
    assert ref.titles == res.titles and ref.patch_size == res.patch_size
    np.testing.assert_array_equal(np.asarray(Image.open(ref.heatmap).convert("RGB")), img)


def test_heatmap_cli_from_slide_and_usage_errors(slide_and_conch, tmp_path):
    from proalign.prototypes.io import save_prototypes

    svs, weights, over = slide_and_conch
    protos = tmp_path / "p.safetensors"
    c = np.random.default_rng(0).normal(size=(2, over["embed_dim"])).astype(np.float32)
    save_prototypes(protos, c, {"type_names": ["tumour", "stroma"]})
    enc_args = [a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")]
    out, mont = tmp_path / "h.png", tmp_path / "m.png"
    with one_thread():
        r = _invoke("heatmap", svs, "--prototypes", protos, "--encoder", "conch_v1", "--weights", weights, *enc_args,
                    "--mag", 20, "--patch-size", 128, "--device", "cpu", "--montage", mont, "--montage-n", 3,
                    "--out", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.stdout and f"wrote {mont}" in r.stdout and "patches encoded with conch_v1" in r.stdout
    with proalign.open_slide(svs) as s:
        th = s.get_thumbnail(1024).shape[:2]
    _png(out, plots.heatmap_size(2, th))
    _png(mont, plots.montage_size(2, 3))
    feats = tmp_path / "f.h5"
    feats.write_bytes(b"")
    for args, msg in [
        ((svs, "--prototypes", protos), "--encoder E --weights W"),  # neither --features nor --encoder
        ((svs, "--prototypes", protos, "--encoder", "conch_v1"), "--encoder needs --weights"),
        (("--prototypes", protos, "--encoder", "conch_v1", "--weights", weights), "give the slide file"),
        ((svs, "--prototypes", protos, "--feature-file", feats, "--mag", 20), "--mag compute features from SLIDE"),
        (("--prototypes", protos, "--feature-file", feats, "--montage", mont), "--montage reads the top patches"),
    ]:
        r = _invoke("heatmap", *args, "--out", tmp_path / "x.png")
        assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "x.png").exists()

# --- the report -----------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


@pytest.mark.slow
def test_report_self_contained_and_renders(planted, cli, tmp_path):
    ej, sj = tmp_path / "cls.json", tmp_path / "surv.json"
    assert _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "classify", "--head",
                   "logistic", "--json", ej).exit_code == 0
    assert _invoke("eval", "--store", planted["store"], "--labels", planted["labels"], "--task", "survival", "--head",
                   "cox", "--json", sj).exit_code == 0
    html = tmp_path / "report.html"
    r = cli("report", "--store", planted["store"], "--eval-json", ej, "--eval-json", sj, "--labels", planted["labels"],
            "--title", "planted <cohort>", "--out", html, check=0)
    assert "wrote" in r.stdout
    page = html.read_text()
    assert "planted &lt;cohort&gt;" in page and "<script" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # no external asset
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(srcs) == 4  # usage, map, ROC, Kaplan-Meier
    for b in srcs:
        p = tmp_path / "x.png"
        p.write_bytes(base64.b64decode(b))
        _png(p)
    for text in ("balanced_accuracy", "c_index", "64", "proalign", "Provenance"):
        assert text in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium): the HTML checks above ran, "
                    "the browser render did not")
    prof = tmp_path / "profile"

    def run(*args):
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={prof}", *args], capture_output=True,
                              text=True, timeout=90)

    d = run("--dump-dom", html.as_uri())
    assert d.returncode == 0, d.stderr[-2000:]
    dom = d.stdout
    assert dom.count("<table") >= 4 and dom.count("<img") == 4 and "mean ± std" in dom
    shot = tmp_path / "shot.png"
    s = run(f"--screenshot={shot}", "--window-size=1200,4000", "--hide-scrollbars", html.as_uri())
    assert s.returncode == 0 and shot.is_file(), s.stderr[-2000:]
    img = _png(shot)
    # the usage chart's bars (#4C72B0) are on screen: the embedded PNGs decoded and rendered
    bar = (np.abs(img.astype(int) - [0x4C, 0x72, 0xB0]).sum(axis=2) < 30).sum()
    assert bar > 500
