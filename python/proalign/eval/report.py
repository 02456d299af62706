"""One self-contained HTML page for a run: store summary, provenance, evaluation tables and
pictures (PNGs inlined as base64 data URIs; inline CSS; no script, no external asset)."""
from __future__ import annotations

import base64
import html
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .._version import __version__
from . import plots
from .evaluate import describe_head

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:min(100%,720px);border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}.note{color:#666;font-size:.85em}"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(head: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    def cell(v):
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f'<td class="num">{_e(f"{v:.4g}" if isinstance(v, float) else v)}</td>' if num else f"<td>{_e(v)}</td>"
    h = "".join(f"<th>{_e(x)}</th>" for x in head)
    thead = f"<thead><tr>{h}</tr></thead>" if any(head) else ""
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _img(png: str | os.PathLike, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _ms(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def store_summary(store_path: str | os.PathLike) -> tuple[list[tuple[str, str]], dict, list[dict], np.ndarray]:
    """(key/value rows, one record's metadata, run reports, embeddings (n, D) of the most common
    shape) of a store."""
    from ..store import open_store

    methods, shapes, dtypes, encoders, backends, versions, protos = (Counter() for _ in range(7))
    n_patches, times, embs, ids = [], [], {}, []
    meta = {}
    with open_store(store_path) as s:
        for sid, rec in s.items():
            m = rec.meta
            meta = meta or m
            methods[m.get("method")] += 1
            shapes[tuple(rec.embedding.shape)] += 1
            dtypes[str(rec.embedding.dtype)] += 1
            encoders[m.get("encoder")] += 1
            backends[m.get("backend")] += 1
            versions[m.get("engine_version")] += 1
            p = m.get("prototypes") or {}
            protos[f"{p.get('hash')} (K={p.get('k')})"] += 1
            n_patches.append(rec.n_patches)
            times.append(m.get("time") or "")
            embs.setdefault(tuple(rec.embedding.shape), []).append(np.asarray(rec.embedding, np.float32).ravel())
            ids.append(sid)
    fmt = lambda c: ", ".join(f"{k} ({v})" for k, v in c.most_common())  # noqa: E731
    rows = [("store", str(Path(store_path).resolve())), ("slides", str(len(ids)))]
    if ids:
        rows += [("methods", fmt(methods)), ("embedding shape", fmt(shapes)), ("stored dtype", fmt(dtypes)),
                 ("prototype sets", fmt(protos)), ("encoders", fmt(encoders)), ("backends", fmt(backends)),
                 ("engine versions", fmt(versions)),
                 ("patches per slide", f"min {min(n_patches)}, median {statistics.median(n_patches):g}, "
                                       f"max {max(n_patches)}, total {sum(n_patches)}"),
                 ("embedded between", f"{min(times)} and {max(times)}")]
    reports = []
    for rp in sorted((Path(store_path) / "reports").glob("*.json")):
        try:
            r = json.loads(rp.read_text())
            reports.append({"file": rp.name, "started": r.get("started"), "done": len(r.get("done", [])),
                            "skipped": len(r.get("skipped", [])), "failed": len(r.get("failed", {})),
                            "seconds": round(r.get("timing", {}).get("total_s", 0.0), 2)})
        except (OSError, ValueError):
            reports.append({"file": rp.name, "started": "unreadable"})
    x = np.stack(embs[shapes.most_common(1)[0][0]]) if ids else np.zeros((0, 0))
    return rows, meta, reports, x


def _eval_section(path: Path, figdir: Path) -> str:
    data = json.loads(path.read_text())
    parts = [f"<h3>{_e(path.name)}</h3>"]
    nested = data and all(isinstance(v, dict) and all(isinstance(s, dict) and "mean" in s for s in v.values())
                          for v in data.values())
    if nested:  # eval compare: {method: {metric: {...}}}
        metrics = list(dict.fromkeys(k for v in data.values() for k in v))
        parts.append(_table(["method"] + metrics, [[m] + [_ms(v.get(k)) for k in metrics] for m, v in data.items()],
                            "compare"))
        runs = [(m, path.parent / f"eval-{m}.run.json") for m in data]
    else:
        n_folds = max((len(s.get("folds", [])) for s in data.values()), default=0)
        parts.append(_table(["metric", "mean ± std"] + [f"fold {i}" for i in range(n_folds)],
                            [[k, _ms(s)] + [("n/a" if v is None else round(v, 4)) for v in s.get("folds", [])]
                             for k, s in data.items()], "metrics"))
        runs = [(None, path.with_name(path.stem + ".run.json"))]
    loaded = {m: json.loads(rp.read_text()) for m, rp in runs if rp.is_file()}
    if nested and loaded and all(r.get("task") == "classify" and len(r["info"]["classes"]) == 2
                                 for r in loaded.values()):
        parts.append(_img(plots.roc_compare_figure(loaded, figdir / f"roc-compare-{path.stem}.png"),
                          "ROC curves of the methods, out-of-fold predictions"))
        return "\n".join(parts)
    for method, run in loaded.items():
        info = run.get("info", {})
        if method is None:
            opts = info.get("options", {})
            parts.append(f'<p class="note">task {_e(info.get("task"))}, {_e(describe_head(info))}, '
                         f'{_e(info.get("n_slides"))} slides of {_e(info.get("n_patients"))} patients '
                         f'(from {_e(info.get("patient_source") or "the labels")}), '
                         f'{_e(info.get("n_folds"))} folds (sizes {_e(info.get("fold_sizes"))}), seed '
                         f'{_e(opts.get("seed"))}; {_e(info.get("missing_in_store"))} labelled slides missing from '
                         f'the store</p>')
        tag = f" ({method})" if method else ""
        stem = (method or path.stem).replace(os.sep, "_")
        if run.get("task") == "classify":
            parts.append(_img(plots.roc_figure(run, figdir / f"roc-{stem}.png", title=f"ROC{tag}"),
                              f"ROC curves, out-of-fold predictions{tag}"))
        elif run.get("task") == "survival":
            parts.append(_img(plots.km_figure(run, figdir / f"km-{stem}.png"),
                              f"Kaplan-Meier curves of the predicted risk halves (split at each fold's median){tag}"))
    return "\n".join(parts)


def build_report(store: str | os.PathLike, out: str | os.PathLike, eval_jsons: Sequence[str | os.PathLike] = (),
                 labels: str | os.PathLike | None = None, images: Sequence[str | os.PathLike] = (),
                 title: str | None = None, descriptions: str | None = None, map_method: str = "pca") -> Path:
    """Write the HTML report; returns its path."""
    out = Path(out)
    rows, meta, reports, x = store_summary(store)
    body = [f"<h1>{_e(title or 'proalign-engine report')}</h1>",
            f'<p class="note">generated {_e(time.strftime("%Y-%m-%d %H:%M:%S %z"))} by proalign-engine '
            f"{_e(__version__)}</p>", "<h2>Store</h2>", _table(["", ""], rows, "store")]
    if reports:
        body += ["<h3>Embedding runs</h3>", _table(list(reports[0]), [list(r.values()) for r in reports], "runs")]
    with tempfile.TemporaryDirectory() as td:
        figdir = Path(td)
        pics = []
        try:
            pi, m = plots.usage_from_store(store)
            names = plots.prototype_names(pi.shape[1], _proto_meta(m), descriptions)
            pics.append(_img(plots.prototype_usage(pi, figdir / "usage.png", names),
                             "prototype usage: mean proportion π over the cohort"))
        except (ValueError, KeyError):
            pass  # methods without proportions (h2t, mean)
        if labels and len(x):
            pics.append(_labelled_map(store, labels, figdir / "map.png", map_method))
        if eval_jsons:
            body.append("<h2>Evaluation</h2>")
            for ej in eval_jsons:
                body.append(_eval_section(Path(ej), figdir))
        if pics or images:
            body.append("<h2>Pictures</h2>")
            body += pics + [_img(p, Path(p).name) for p in images]
        if meta:
            body += ["<h2>Provenance (first record)</h2>", f"<pre>{_e(json.dumps(meta, indent=2))}</pre>"]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title or "proalign report")}'
            f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _proto_meta(record_meta: dict) -> dict:
    """The prototype file's own metadata, when the file named in the record is still there."""
    path = (record_meta.get("prototypes") or {}).get("path")
    if path and Path(path).is_file():
        from ..prototypes.io import read_prototype_file

        try:
            return read_prototype_file(path)[1]
        except Exception:  # a moved or rewritten file only costs the names
            return {}
    return {}


def _labelled_map(store, labels, png: Path, method: str) -> str:
    from .data import load_dataset, read_labels

    import csv

    with open(labels, newline="", encoding="utf-8-sig") as fh:
        cols = csv.DictReader(fh).fieldnames or []
    task = "classify" if "label" in cols else "survival"
    ds = load_dataset(store, read_labels(labels, task), task)
    lab = [ds.classes[i] for i in ds.y] if task == "classify" else ds.time.tolist()
    what = "label" if task == "classify" else "survival time"
    return _img(plots.embedding_map(ds.x, lab, png, method=method), f"slide embeddings ({method.upper()}) by {what}")
