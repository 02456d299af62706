"""Planted-signal quality suite: every aggregation method and option on cohorts with a known answer.

    python -m proalign.bench.quality [--seeds 0,1,2] [--slides 200] [--signals rare,...]
        [--regimes kmeans,text,joint] [--methods NAME,...] [--json out.json]

For each signal (rare type, proportion shift, morphology shift, survival, null) and prototype
regime (k-means, text-like, Step-3 joint-space allocation) of `planted_signals`, every method
embeds the same slides with the same prototypes and is evaluated with the default probe of
`proalign-engine eval` (L2 logistic regression or ridge Cox, strength chosen by inner
patient-grouped folds) on the same patient-grouped folds. Prints balanced accuracy (C-index for
survival) as mean ± std over seeds, one table per signal, and flags every cell where a `proalign`
variant falls more than 0.03 below the best baseline.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from ..defaults import DEFAULT_PROALIGN
from ..testing.planted_signals import REGIMES, SIGNALS, make_cohort, prototypes_for

# name -> (method, options); every ProAlign reading the suite compares, and the baselines.
METHODS: dict[str, tuple[str, dict]] = {
    "patches τ0.1": ("proalign", {"over": "patches", "tau": 0.1}),
    "patches τ1": ("proalign", {"over": "patches", "tau": 1.0}),
    "protos τ0.1": ("proalign", {"over": "prototypes", "tau": 0.1}),
    "protos τ0.05": ("proalign", {"over": "prototypes", "tau": 0.05}),
    "protos τ0.05 prior1": ("proalign", {"over": "prototypes", "tau": 0.05, "prior": 1.0}),
    "protos τ0.1 m2": ("proalign", {"over": "prototypes", "tau": 0.1, "moments": 2}),
    "protos τ0.1+0.05 prior1": ("proalign", {"over": "prototypes", "tau": [0.1, 0.05], "prior": 1.0}),
    "protos τ0.2+0.05+0.025": ("proalign", {"over": "prototypes", "tau": [0.2, 0.05, 0.025], "prior": 0.0}),
    "protos τ0.2+0.05+0.025 prior0.5": ("proalign", {"over": "prototypes", "tau": [0.2, 0.05, 0.025], "prior": 0.5}),
    "protos τ0.2+0.05+0.025 prior1": ("proalign", {"over": "prototypes", "tau": [0.2, 0.05, 0.025], "prior": 1.0}),
    "protos τ0.2+0.05+0.025 prior0.5 m2": ("proalign", {"over": "prototypes", "tau": [0.2, 0.05, 0.025], "prior": 0.5, "moments": 2}),
    "protos τ0.2+0.05+0.025 prior0.25": ("proalign", {"over": "prototypes", "tau": [0.2, 0.05, 0.025], "prior": 0.25}),
    "protos τ0.2+0.05+0.025 prior0.5 +τ0.025 prior0": ("proalign", {"over": "prototypes", "tau": [0.2, 0.05, 0.025, 0.025],
                                                                    "prior": [0.5, 0.5, 0.5, 0.0]}),
    "panther": ("panther", {}),
    "h2t": ("h2t", {}),
    "protocount": ("protocount", {}),
    "mean": ("mean", {}),
}
BASELINES = ("panther", "h2t", "protocount", "mean")
MARGIN = 0.03  # how far below the best baseline a proalign variant may fall (noise)


def default_variant() -> str | None:
    """The METHODS name of the engine's default ProAlign reading."""
    def reading(o: dict) -> dict:
        full = {**DEFAULT_PROALIGN, **o}
        return {**full, "tau": tuple(np.atleast_1d(full["tau"]).tolist()),
                "prior": tuple(np.atleast_1d(full["prior"]).tolist())}
    want = reading({})
    return next((n for n, (m, o) in METHODS.items() if m == "proalign" and reading(o) == want), None)


def embed(slides: Sequence[np.ndarray], prototypes: np.ndarray, name: str, backend: str | None = None) -> np.ndarray:
    """(n_slides, length) embeddings of `slides` by METHODS[name]."""
    from ..aggregate import aggregate_batch

    method, opts = METHODS[name]
    opts = dict(opts)
    tau = opts.pop("tau", 0.1)
    out = []
    for i in range(0, len(slides), 16):  # ragged batches of 16 slides
        out += [np.asarray(e, np.float32).ravel()
                for e in aggregate_batch(list(slides[i:i + 16]), prototypes, method, tau, backend, **opts)]
    return np.stack(out)


def score(cohort, x: np.ndarray, folds: int = 5) -> float:
    """Mean over folds of the default probe's balanced accuracy (C-index for survival)."""
    from ..eval.data import Dataset
    from ..eval.evaluate import evaluate
    from ..eval.heads import HeadOptions

    ids = [f"s{i:05d}" for i in range(len(x))]
    ds = Dataset(ids, np.array(cohort.patients), x, y=cohort.y if cohort.task == "classify" else None,
                 classes=["0", "1"] if cohort.task == "classify" else None, time=cohort.time, event=cohort.event)
    res = evaluate(ds, cohort.task, HeadOptions(seed=cohort.seed), folds=folds)
    metric = "balanced_accuracy" if cohort.task == "classify" else "c_index"
    return float(res.summary()[metric]["mean"])


def run_cell(signal: str, seed: int, regimes: Sequence[str], methods: Sequence[str], n_slides: int,
             median_patches: int, backend: str | None = None) -> list[dict]:
    """One cohort (signal, seed): every regime x method. Returns one row per (regime, method)."""
    cohort = make_cohort(signal, seed, n_slides=n_slides, median_patches=median_patches)
    rows = []
    for regime in regimes:
        protos = prototypes_for(cohort, regime)
        for m in methods:
            t0 = time.perf_counter()
            value = score(cohort, embed(cohort.slides, protos, m, backend))
            rows.append({"signal": signal, "seed": seed, "regime": regime, "method": m, "score": value,
                         "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def summarise(rows: list[dict]) -> dict:
    """{signal: {regime: {method: (mean, std, n)}}}."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["signal"], {}).setdefault(r["regime"], {}).setdefault(r["method"], []).append(r["score"])
    return {s: {g: {m: (float(np.mean(v)), float(np.std(v)), len(v)) for m, v in ms.items()} for g, ms in gs.items()}
            for s, gs in out.items()}


def shortfalls(summary: dict, variant: str) -> list[str]:
    """Cells where `variant` is more than MARGIN below the best baseline (null: not compared)."""
    bad = []
    for signal, gs in summary.items():
        if signal == "null":
            continue
        for regime, ms in gs.items():
            scored = [(ms[b][0], b) for b in BASELINES if b in ms]
            if not scored or variant not in ms:
                continue  # nothing to compare in this cell
            best = max(scored)
            if ms[variant][0] < best[0] - MARGIN:
                bad.append(f"{signal}/{regime}: {ms[variant][0]:.3f} < {best[1]} {best[0]:.3f}")
    return bad


def format_tables(summary: dict) -> str:
    lines = []
    for signal, gs in summary.items():
        regimes = list(gs)
        methods = list(dict.fromkeys(m for ms in gs.values() for m in ms))
        metric = "C-index" if signal == "survival" else "balanced accuracy"
        lines.append(f"\n{signal} ({metric}, mean ± std over seeds)")
        w = max(len(m) for m in methods)
        lines.append(f"{'method':<{w}}  " + "  ".join(f"{g:<13}" for g in regimes))
        for m in methods:
            cells = []
            for g in regimes:
                v = gs[g].get(m)
                cells.append(f"{v[0]:.3f} ± {v[1]:.3f}" if v else "")
            lines.append(f"{m:<{w}}  " + "  ".join(f"{c:<13}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--median-patches", type=int, default=1500)
    ap.add_argument("--signals", default=",".join(SIGNALS))
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--methods", default=",".join(METHODS), help=f"from: {', '.join(METHODS)}")
    ap.add_argument("--backend", default=None, help="aggregation backend (default: the fastest live one)")
    ap.add_argument("--workers", type=int, default=1, help="cohorts evaluated in parallel processes")
    ap.add_argument("--json", default=None, help="write every row and the summary here")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    signals, regimes, methods = a.signals.split(","), a.regimes.split(","), a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    cells = [(s, seed) for s in signals for seed in seeds]
    rows: list[dict] = []
    with ProcessPoolExecutor(max(1, a.workers)) as pool:
        futures = [pool.submit(run_cell, s, seed, regimes, methods, a.slides, a.median_patches, a.backend)
                   for s, seed in cells]
        for f in futures:
            rows += f.result()
            print(f"done {rows[-1]['signal']} seed {rows[-1]['seed']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarise(rows)
    print(f"\nplanted-signal suite: {a.slides} slides per cohort, seeds {seeds}, d=512, {platform.node()}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_tables(summary))
    print(f"\ndefault proalign: {default_variant()} ({DEFAULT_PROALIGN})")
    if not [sig for sig in summary if sig != "null"]:
        methods = []  # a null cohort only: nothing to compare against a baseline
    for m in methods:
        if METHODS[m][0] == "proalign":
            bad = shortfalls(summary, m)
            print(f"{m}: " + ("within %.2f of the best baseline in every signal cohort" % MARGIN if not bad
                              else "below the best baseline in " + "; ".join(bad)))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary, "args": vars(a)}, fh, indent=1)


if __name__ == "__main__":
    main()
