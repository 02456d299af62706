"""Embed the same features with several methods and evaluate them side by side.

Each method gets its own store `OUT/stores/<method>`, built by the embed pipeline (resumable:
rerunning skips what is stored). All methods are evaluated on the slides every store holds,
with the same folds.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from .data import Dataset, EvalError, Labels, load_dataset
from .evaluate import EvalResult, evaluate, format_comparison, make_splits
from .heads import HeadOptions
from .splits import read_splits

log = logging.getLogger("proalign.eval")


@dataclass
class Comparison:
    results: dict[str, EvalResult]
    failed: dict[str, dict[str, str]]  # method -> slide -> why embedding failed

    def summary(self) -> dict[str, dict]:
        return {m: r.summary() for m, r in self.results.items()}

    def table(self) -> str:
        return format_comparison(self.summary())


def _subset(ds: Dataset, keep: list[str]) -> Dataset:
    idx = [ds.slide_ids.index(s) for s in keep]
    return replace(ds, slide_ids=list(keep), patients=ds.patients[idx], x=ds.x[idx],
                   y=None if ds.y is None else ds.y[idx], time=None if ds.time is None else ds.time[idx],
                   event=None if ds.event is None else ds.event[idx])


def compare_methods(entries: Sequence, prototypes: str | Path, labels: Labels, out: str | Path, task: str,
                    methods: Sequence[str] = ("proalign", "panther", "h2t", "mean"), opts: HeadOptions = HeadOptions(),
                    folds: int = 5, splits_csv: str | Path | None = None, ks: Sequence[int] = (1, 3, 5),
                    embed_dtype: str = "float32",
                    backend: str | None = None, progress: bool | None = False) -> Comparison:
    """Embed `entries` (feature files) with each method into OUT/stores/<method>, evaluate each, and
    write OUT/compare.json ({method: {metric: {mean, std, folds}}}), OUT/compare.txt and per-method
    OUT/eval-<method>.json (+ .run.json). `opts` is `evaluate`'s: by default logistic (classify) or
    Cox (survival) regression with C / alpha chosen per outer fold by an inner search on that
    method's own training slides, so each method is judged with its best-regularised probe; the
    chosen values are in each eval-<method>.run.json."""
    from ..pipeline import EmbedOptions, embed_features

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failed: dict[str, dict[str, str]] = {}
    datasets: dict[str, Dataset] = {}
    embed_log = logging.getLogger("proalign.embed")
    for m in methods:
        store = out / "stores" / m
        level = embed_log.level
        if not progress:
            embed_log.setLevel(logging.WARNING)  # one summary line per method instead of one per slide
        try:
            rep = embed_features(entries, prototypes, store,
                                 EmbedOptions(method=m, dtype=embed_dtype, backend=backend), progress=progress)
        finally:
            embed_log.setLevel(level)
        log.info("%s: %s", m, rep.summary())
        if rep.failed:
            failed[m] = dict(rep.failed)
        datasets[m] = load_dataset(store, labels, task)
    common = [s for s in next(iter(datasets.values())).slide_ids if all(s in d.slide_ids for d in datasets.values())]
    if not common:
        raise EvalError("no labelled slide was embedded by every method")
    datasets = {m: _subset(d, common) for m, d in datasets.items()}
    first = next(iter(datasets.values()))
    splits = read_splits(splits_csv, first.slide_ids) if splits_csv else None
    sp = make_splits(first, task, folds, opts.seed, splits)  # the same folds for every method
    results = {}
    for m, ds in datasets.items():
        r = evaluate(ds, task, opts, folds=folds, splits=sp, ks=ks)
        r.info["method"] = m
        r.info["store"] = str(out / "stores" / m)
        r.write_json(out / f"eval-{m}.json")
        results[m] = r
    cmp = Comparison(results, failed)
    (out / "compare.json").write_text(json.dumps(cmp.summary(), indent=2) + "\n")
    (out / "compare.txt").write_text(cmp.table() + "\n")
    return cmp
