"""Seeded patient-grouped k-fold splits (stratified by class, or by event for survival), and
splits read from a CSV. No patient ever has slides on both sides of a fold."""
from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import EvalError

Split = tuple[np.ndarray, np.ndarray]  # (train indices, test indices)


def group_kfold(patients: Sequence[str], strata: Sequence[int] | None, n_folds: int, seed: int) -> list[Split]:
    """k folds over patients. Each patient takes the stratum most common among its slides;
    within a stratum, patients (largest first, ties in a seeded random order) go to the fold that
    has the fewest slides of that stratum, then the fewest slides overall."""
    patients = np.asarray(patients)
    strata = np.zeros(len(patients), np.int64) if strata is None else np.asarray(strata, np.int64)
    uniq = sorted(set(patients.tolist()))
    if n_folds < 2:
        raise EvalError(f"--folds must be at least 2, got {n_folds}")
    if len(uniq) < n_folds:
        raise EvalError(f"{len(uniq)} patients cannot make {n_folds} folds (each fold needs at least one patient)")
    rows = defaultdict(list)
    for i, p in enumerate(patients.tolist()):
        rows[p].append(i)
    p_stratum = {p: Counter(strata[rows[p]].tolist()).most_common(1)[0][0] for p in uniq}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    fold_of: dict[str, int] = {}
    per_stratum = np.zeros((int(strata.max()) + 1, n_folds), np.int64)
    total = np.zeros(n_folds, np.int64)
    # Largest patients first so the greedy fill stays balanced; the seeded permutation breaks ties.
    for rank in sorted(range(len(uniq)), key=lambda r: (p_stratum[uniq[order[r]]], -len(rows[uniq[order[r]]]), r)):
        p = uniq[order[rank]]
        s, n = p_stratum[p], len(rows[p])
        f = min(range(n_folds), key=lambda j: (per_stratum[s, j], total[j], j))
        fold_of[p] = f
        per_stratum[s, f] += n
        total[f] += n
    fold = np.array([fold_of[p] for p in patients.tolist()])
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(n_folds)]


def read_splits(path: str | os.PathLike, slide_ids: Sequence[str]) -> list[Split]:
    """Splits CSV: either `slide_id,fold` (the fold in which the slide is a test slide; it trains in
    every other fold) or `slide_id,fold,split` with split `train` or `test` (one row per slide and
    fold; `val` rows are ignored). Slides of the CSV missing from the evaluated set are ignored;
    evaluated slides missing from the CSV are an error."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"splits file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = list(reader)
    if "slide_id" not in cols or "fold" not in cols:
        raise EvalError(f"{path}: needs columns slide_id and fold (columns: {', '.join(cols)})")
    index = {s: i for i, s in enumerate(slide_ids)}
    folds: dict[str, dict[str, set[int]]] = defaultdict(lambda: {"train": set(), "test": set()})
    seen = set()
    for line, r in enumerate(rows, start=2):
        sid, f = r["slide_id"].strip(), r["fold"].strip()
        part = (r.get("split") or "test").strip().lower() if "split" in cols else "test"
        if part not in ("train", "test", "val", "validation"):
            raise EvalError(f"{path}: line {line}: split must be train, test or val, got {part!r}")
        if sid in index and part in ("train", "test"):
            folds[f][part].add(index[sid])
            seen.add(sid)
    unsplit = [s for s in slide_ids if s not in seen]
    if unsplit:
        raise EvalError(f"{path}: {len(unsplit)} evaluated slides are in no split (e.g. {', '.join(unsplit[:5])})")
    names = sorted(folds, key=lambda f: (len(f), f))
    out = []
    for f in names:
        test = folds[f]["test"]
        train = folds[f]["train"] if "split" in cols else set(range(len(slide_ids))) - test
        if not test or not train:
            raise EvalError(f"{path}: fold {f!r} has {len(train)} train and {len(test)} test slides")
        out.append((np.array(sorted(train)), np.array(sorted(test))))
    return out


def check_patient_leakage(splits: Sequence[Split], patients: Sequence[str]) -> None:
    """Raise if any fold has a patient on both sides."""
    patients = np.asarray(patients)
    for f, (tr, te) in enumerate(splits):
        both = set(patients[tr].tolist()) & set(patients[te].tolist())
        if both:
            raise EvalError(f"fold {f}: {len(both)} patients have slides in both train and test "
                            f"(e.g. {', '.join(sorted(both)[:5])}); give a patient_id column or fix the splits")
