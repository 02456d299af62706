"""Run one evaluation (classify | survival | retrieve) over folds; results as a table and JSON.

The metrics JSON is keyed by metric name: {"balanced_accuracy": {"mean", "std", "folds"}, ...}
(std over folds with ddof=0; a metric undefined in a fold, e.g. AUC without both classes, is
null there and left out of the mean). Beside it, `<name>.run.json` keeps what the pictures and the
report need: the run's options and the out-of-fold predictions of every slide.
"""
from __future__ import annotations

import json
import logging
import os
import time as _time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics as M
from .data import Dataset, EvalError
from .heads import (PANTHER_MIN_STEPS, HeadOptions, choose_alpha, choose_C, fit_cox, fit_linear, fit_logistic,
                    one_thread, resolve_head)
from .splits import Split, check_patient_leakage, group_kfold

log = logging.getLogger("proalign.eval")

TASKS = ("classify", "survival", "retrieve")
CLASSIFY_METRICS = ("balanced_accuracy", "macro_auc", "weighted_f1", "quadratic_kappa")


@dataclass
class EvalResult:
    task: str
    fold_metrics: dict[str, list[float]]  # metric -> one value per fold
    info: dict = field(default_factory=dict)  # options, counts, classes, provenance
    predictions: dict = field(default_factory=dict)  # per-slide out-of-fold outputs

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, vals in self.fold_metrics.items():
            v = np.array(vals, float)
            ok = v[np.isfinite(v)]
            out[name] = {"mean": float(ok.mean()) if len(ok) else None, "std": float(ok.std()) if len(ok) else None,
                         "folds": [float(a) if np.isfinite(a) else None for a in v]}
        return out

    def table(self) -> str:
        return format_table(self.summary())

    def write_json(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Metrics JSON at `path`; options and predictions at `<path stem>.run.json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=2) + "\n")
        side = run_json_path(path)
        side.write_text(json.dumps({"task": self.task, "info": self.info, "predictions": self.predictions,
                                    "metrics": self.summary()}, indent=1) + "\n")
        return path, side


def run_json_path(metrics_json: str | os.PathLike) -> Path:
    p = Path(metrics_json)
    return p.with_name(p.stem + ".run.json")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_table(summary: dict[str, dict]) -> str:
    """metric | mean ± std | per-fold values, as aligned text."""
    w = max([len("metric")] + [len(k) for k in summary])
    lines = [f"{'metric':<{w}}  {'mean ± std':<15}  folds"]
    for name, s in summary.items():
        folds = " ".join(_fmt(v) for v in s["folds"])
        lines.append(f"{name:<{w}}  {_fmt(s['mean']) + ' ± ' + _fmt(s['std']):<15}  {folds}")
    return "\n".join(lines)


def format_comparison(results: dict[str, dict[str, dict]]) -> str:
    """One row per method, one column per metric, `mean ± std`."""
    names = list(dict.fromkeys(k for s in results.values() for k in s))
    cells = [[m] + [(_fmt(s[k]["mean"]) + " ± " + _fmt(s[k]["std"])) if k in s else "" for k in names]
             for m, s in results.items()]
    head = ["method"] + names
    widths = [max(len(r[i]) for r in [head] + cells) for i in range(len(head))]
    row = lambda r: "  ".join(c.ljust(wd) for c, wd in zip(r, widths))  # noqa: E731
    return "\n".join([row(head), row(["-" * wd for wd in widths])] + [row(r) for r in cells])


def check_classes(ds: Dataset, n_folds: int | None, min_per_class: int = 2) -> None:
    """Enough patients per class for stratified folds, and at least two classes."""
    if len(ds.classes) < 2:
        raise EvalError(f"only one class ({ds.classes[0]!r}) among the {len(ds.y)} evaluated slides")
    need = max(min_per_class, n_folds or 0)
    small = []
    for c, name in enumerate(ds.classes):
        n_pat = len(set(ds.patients[ds.y == c].tolist()))
        if n_pat < need:
            small.append(f"{name!r}: {int((ds.y == c).sum())} slides of {n_pat} patients")
    if small:
        why = f"--folds {n_folds}" if n_folds else "a train/test split"
        raise EvalError(f"too few samples per class for {why} (need {need} patients per class): " + "; ".join(small)
                        + ". Lower --folds, merge or drop these classes")


def make_splits(ds: Dataset, task: str, folds: int, seed: int, splits: Sequence[Split] | None) -> list[Split]:
    if splits is None:
        strata = ds.y if task != "survival" else ds.event.astype(np.int64)
        if task == "survival" and ds.event.sum() < folds:
            raise EvalError(f"only {int(ds.event.sum())} events among {len(ds.event)} slides: too few for "
                            f"{folds} folds")
        splits = group_kfold(ds.patients, strata, folds, seed)
    check_patient_leakage(splits, ds.patients)
    return list(splits)


def _classify_fold_metrics(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    pred = proba.argmax(axis=1)
    return {"balanced_accuracy": M.balanced_accuracy(y, pred, n_classes), "macro_auc": M.macro_auc(y, proba),
            "weighted_f1": M.weighted_f1(y, pred, n_classes), "quadratic_kappa": M.quadratic_kappa(y, pred, n_classes)}


def evaluate(ds: Dataset, task: str, opts: HeadOptions = HeadOptions(), folds: int = 5,
             splits: Sequence[Split] | None = None, ks: Sequence[int] = (1, 3, 5)) -> EvalResult:
    """Evaluate frozen embeddings `ds` on `task`; seeded patient-grouped k-fold unless `splits`.
    The head is `opts.head` or the task's default (logistic | cox, regularisation chosen per outer
    fold by an inner patient-grouped search on its training slides; see heads.py). Warnings (a
    deprecated head name, an undertrained PANTHER head) are logged and kept in info["warnings"]."""
    if task not in TASKS:
        raise EvalError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    n = len(ds.slide_ids)
    head, warnings = resolve_head(task, opts.head)
    if task != "survival":
        # stratified folds need `folds` patients per class; retrieval only needs a second patient
        check_classes(ds, folds if splits is None and task == "classify" else None)
    sp = make_splits(ds, task, folds, opts.seed, splits)
    t0 = _time.perf_counter()
    with one_thread():
        fm, preds, fit = _run_folds(ds, task, head, opts, sp, ks)
    warnings += fit.pop("warnings", [])
    for w in warnings:
        log.warning("%s", w)
    info = {"task": task, "head": head, "options": asdict(replace(opts, head=head)),
            "n_slides": n, "n_patients": len(set(ds.patients.tolist())), "patient_source": ds.patient_source,
            "n_folds": len(sp), "fold_sizes": [int(len(te)) for _, te in sp], "classes": ds.classes,
            **fit, "warnings": warnings,
            "missing_in_store": len(ds.missing_in_store), "unlabelled_in_store": ds.unlabelled_in_store,
            "store_meta": ds.store_meta, "embedding_length": int(ds.x.shape[1]),
            "seconds": round(_time.perf_counter() - t0, 3)}
    if task == "retrieve":
        info["ks"] = sorted(set(int(k) for k in ks))
    return EvalResult(task, fm, info, preds)


def _g(v: float) -> str:
    return f"{v:g}"


def describe_head(info: dict) -> str:
    """One line: the head and, per outer fold, the regularisation it ran with (or its steps)."""
    head = info.get("head")
    if head in ("logistic", "cox"):
        param = "C" if head == "logistic" else "alpha"
        search = info.get("search")
        chosen = info.get(f"chosen_{param}") or [info.get("options", {}).get(param)]  # older run files: options
        if search is None:
            return f"head {head}, {param} = {chosen[0] if chosen[0] is None else _g(chosen[0])} (fixed)"
        grid = search["grid"]
        inner = sorted(set(search["inner_folds"]))
        return (f"head {head}, {param} chosen by inner {'/'.join(map(str, inner))}-fold patient-grouped CV "
                f"on each training fold ({search['metric']}, grid {_g(min(grid))}..{_g(max(grid))}): "
                + " ".join(_g(v) for v in chosen))
    if head == "panther-linear":
        steps = info.get("optimiser_steps", [])
        o = info.get("options", {})
        return (f"head panther-linear (PANTHER's probe: AdamW lr {_g(o.get('lr', 0))}, {o.get('epochs')} epochs, "
                f"batch {o.get('batch_size')}): optimiser steps per fold {' '.join(map(str, steps))}")
    return f"head {head}"


def _run_folds(ds: Dataset, task: str, head: str, opts: HeadOptions, sp: list[Split],
               ks: Sequence[int]) -> tuple[dict, dict, dict]:
    """Metrics per fold, out-of-fold predictions, and what the fits chose (chosen C / alpha and
    the search's scores, or PANTHER's optimiser steps, and warnings)."""
    n = len(ds.slide_ids)
    fold_of = np.full(n, -1)
    for f, (_, te) in enumerate(sp):
        fold_of[te] = f
    fm: dict[str, list[float]] = {}
    fit: dict = {}
    preds: dict = {"slide_id": list(ds.slide_ids), "patient_id": ds.patients.tolist(), "fold": fold_of.tolist()}
    chosen, searches, steps = [], [], []
    if task == "classify":
        C = len(ds.classes)
        proba = np.full((n, C), np.nan)
        for f, (tr, te) in enumerate(sp):
            if len(set(ds.y[tr].tolist())) < 2:
                raise EvalError(f"fold {f}: the training slides hold a single class")
            if head == "logistic":
                c = opts.C
                if c is None:
                    try:
                        c, s = choose_C(ds.x[tr], ds.y[tr], C, ds.patients[tr], opts.C_grid, opts.inner_folds,
                                        opts.seed, opts.standardize)
                    except EvalError as e:
                        raise EvalError(f"fold {f}: {e}") from None
                    searches.append(s)
                chosen.append(c)
                model = fit_logistic(ds.x[tr], ds.y[tr], C, C=c, standardize=opts.standardize)
            else:
                model = fit_linear(ds.x[tr], "classify", opts, y=ds.y[tr], n_classes=C)
                steps.append(model.steps)
            proba[te] = model(ds.x[te])
            for k, v in _classify_fold_metrics(ds.y[te], proba[te], C).items():
                fm.setdefault(k, []).append(v)
        preds.update(label=[ds.classes[i] for i in ds.y], y=ds.y.tolist(), proba=np.round(proba, 6).tolist())
    elif task == "survival":
        risk = np.full(n, np.nan)
        for f, (tr, te) in enumerate(sp):
            if ds.event[tr].sum() == 0:
                raise EvalError(f"fold {f}: no events among the training slides")
            if head == "cox":
                a = opts.alpha
                if a is None:
                    try:
                        a, s = choose_alpha(ds.x[tr], ds.time[tr], ds.event[tr], ds.patients[tr], opts.alpha_grid,
                                            opts.inner_folds, opts.seed, opts.standardize)
                    except EvalError as e:
                        raise EvalError(f"fold {f}: {e}") from None
                    searches.append(s)
                chosen.append(a)
                model = fit_cox(ds.x[tr], ds.time[tr], ds.event[tr], alpha=a, standardize=opts.standardize)
            else:
                model = fit_linear(ds.x[tr], "survival", opts, time=ds.time[tr], event=ds.event[tr])
                steps.append(model.steps)
            risk[te] = model(ds.x[te])
            fm.setdefault("c_index", []).append(M.c_index(ds.time[te], ds.event[te], risk[te]))
        preds.update(time=ds.time.tolist(), event=ds.event.tolist(), risk=np.round(risk, 6).tolist())
    else:  # retrieve: every slide queries all slides of the other patients; folds group the queries
        x = ds.x.astype(np.float64)
        if opts.standardize:  # unsupervised, over the whole cohort
            sd = x.std(axis=0)
            x = (x - x.mean(axis=0)) / np.where(sd > 1e-8, sd, 1.0)
        ks = sorted(set(int(k) for k in ks))
        mv = M.retrieval_accuracy(x, ds.y, ds.patients, ks)
        nn = M.cosine_neighbours(x, ds.patients, max(ks))
        for k in ks:
            hit = np.array([(nn[i, :k] >= 0).any() and (ds.y[nn[i, :k][nn[i, :k] >= 0]] == ds.y[i]).any()
                            for i in range(n)])
            for _, te in sp:
                fm.setdefault(f"mv_accuracy@{k}", []).append(float(mv[k][te].mean()))
                fm.setdefault(f"accuracy@{k}", []).append(float(hit[te].mean()))
        preds.update(label=[ds.classes[i] for i in ds.y], y=ds.y.tolist(), neighbours=nn.tolist())
        return fm, preds, fit
    if head in ("logistic", "cox"):
        param = "C" if head == "logistic" else "alpha"
        fit[f"chosen_{param}"] = [float(v) for v in chosen]
        fit["search"] = None if not searches else {
            "param": param, "grid": searches[0]["grid"], "inner_folds": [s["inner_folds"] for s in searches],
            "metric": "mean inner log-loss" if head == "logistic" else "cross-validated partial-likelihood deviance",
            "scores": [s["log_loss" if head == "logistic" else "cv_deviance"] for s in searches]}
    else:
        fit["optimiser_steps"] = steps
        if min(steps) < PANTHER_MIN_STEPS:
            per = f"{steps[0]} optimiser steps per fold" if len(set(steps)) == 1 else \
                f"{min(steps)} optimiser steps on a fold (per fold: {' '.join(map(str, steps))})"
            fit["warnings"] = [
                f"head panther-linear took only {per} (lr {opts.lr:g}, {opts.epochs} epochs of batches of "
                f"{opts.batch_size}): it is likely undertrained. It is PANTHER's protocol, made for cohorts of "
                f"thousands of slides; the default head ({DEFAULT_NOTE[task]}) is solved to its optimum at any "
                "cohort size"]
    return fm, preds, fit


DEFAULT_NOTE = {"classify": "logistic regression, C chosen by inner cross-validation",
                "survival": "ridge Cox regression, alpha chosen by inner cross-validation"}
