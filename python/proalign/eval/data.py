"""Labels CSV + embedding store -> the arrays an evaluation needs, with clear errors.

Labels CSV: `slide_id` and, per task, `label` (classify, retrieve) or `time` + `event`
(survival; `censorship` = 1 - event is read too). Patients come from the first present of the
columns `case_id` (CLAM's and PANTHER's CSVs), `patient_id`, `patient` (or the column named by
`patient_col`, which must then exist), else the TCGA convention (the first 12 characters of a
TCGA barcode, `TCGA-XX-XXXX`), else the slide id; `Labels.patient_source` says which.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ProAlignError

log = logging.getLogger("proalign.eval")


class EvalError(ProAlignError):
    """The labels, the store or the splits cannot support the evaluation asked for."""


def default_patient_id(slide_id: str) -> str:
    """TCGA barcodes (`TCGA-2F-A9KO-01Z-00-DX1...`) -> the 12-character patient barcode; any other
    slide id is its own patient."""
    return slide_id[:12] if slide_id.upper().startswith("TCGA-") and len(slide_id) >= 12 else slide_id


PATIENT_COLUMNS = ("case_id", "patient_id", "patient")  # looked for in this order


@dataclass
class Labels:
    """One row per slide, in CSV order."""
    slide_ids: list[str]
    patients: list[str]
    label: list[str] | None = None  # classify / retrieve
    time: np.ndarray | None = None  # survival
    event: np.ndarray | None = None
    dropped: dict[str, str] = field(default_factory=dict)  # slide -> why it was left out
    patient_source: str = ""  # "column case_id" | "TCGA barcode" | "slide id" (| mixtures, with counts)


def _patient_source(column: str | None, kinds: list[str]) -> str:
    """Where the patients came from: `column X`, `TCGA barcode` or `slide id`, with the rows that
    fell back (an empty cell; a slide id that is not a TCGA barcode) counted."""
    fallback = [k for k in kinds if k != "col"]
    if column:
        if not fallback:
            return f"column {column}"
        return f"column {column} ({len(fallback)} rows without one: TCGA barcode, else slide id)"
    n_tcga = fallback.count("tcga")
    if n_tcga == len(fallback) and fallback:
        return "TCGA barcode"
    if n_tcga == 0:
        return "slide id"
    return f"TCGA barcode ({len(fallback) - n_tcga} of {len(fallback)} slides: slide id)"


def _sort_classes(values: set[str]) -> list[str]:
    """Numeric labels in numeric order (the order quadratic kappa uses), others alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def read_labels(path: str | os.PathLike, task: str, label_col: str = "label", time_col: str = "time",
                event_col: str = "event", patient_col: str | None = None) -> Labels:
    """Read a labels CSV for `task`. `patient_col` None: the first of PATIENT_COLUMNS the file has,
    else TCGA barcodes / slide ids; a named `patient_col` must exist."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"labels file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = list(reader)
    if "slide_id" not in cols:
        raise EvalError(f"{path}: no 'slide_id' column (columns: {', '.join(cols) or 'none'})")
    survival = task == "survival"
    if survival:
        if time_col not in cols:
            raise EvalError(f"{path}: survival needs a {time_col!r} column (columns: {', '.join(cols)})")
        if event_col not in cols and "censorship" not in cols:
            raise EvalError(f"{path}: survival needs an {event_col!r} (1 = event) or 'censorship' (1 = censored) "
                            f"column (columns: {', '.join(cols)})")
    elif label_col not in cols:
        raise EvalError(f"{path}: no {label_col!r} column for task {task} (columns: {', '.join(cols)})")
    if patient_col is not None and patient_col not in cols:
        raise EvalError(f"{path}: no patient column {patient_col!r} (--patient-col; columns: {', '.join(cols)}); "
                        f"leave it out to use the first of {', '.join(PATIENT_COLUMNS)} or the TCGA barcode")
    if patient_col is None:
        patient_col = next((c for c in PATIENT_COLUMNS if c in cols), None)
    kinds: list[str] = []
    out = Labels([], [], [] if not survival else None)
    times, events, seen = [], [], set()
    for i, r in enumerate(rows, start=2):
        sid = (r["slide_id"] or "").strip()
        if not sid:
            raise EvalError(f"{path}: line {i}: empty slide_id")
        if sid in seen:
            raise EvalError(f"{path}: line {i}: slide {sid!r} appears twice")
        seen.add(sid)
        if survival:
            try:
                t = float(r[time_col])
                e = float(r[event_col]) if event_col in cols and r.get(event_col, "").strip() != "" \
                    else 1.0 - float(r["censorship"])
            except (TypeError, ValueError):
                out.dropped[sid] = "missing or non-numeric time/event"
                continue
            if not np.isfinite(t) or t < 0 or e not in (0.0, 1.0):
                out.dropped[sid] = f"bad time/event ({r[time_col]!r}, {e})"
                continue
            times.append(t)
            events.append(e)
        else:
            lab = (r[label_col] or "").strip()
            if lab == "" or lab.lower() in ("nan", "na", "none"):
                out.dropped[sid] = "no label"
                continue
            out.label.append(lab)
        pid = (r.get(patient_col) or "").strip() if patient_col else ""
        if not pid:
            pid = default_patient_id(sid)
            kinds.append("slide" if pid == sid else "tcga")
        else:
            kinds.append("col")
        out.slide_ids.append(sid)
        out.patients.append(pid)
    if survival:
        out.time, out.event = np.array(times, float), np.array(events, float)
    out.patient_source = _patient_source(patient_col, kinds)
    if out.dropped:
        log.warning("%s: %d rows without a usable label were left out (e.g. %s)", path, len(out.dropped),
                    ", ".join(list(out.dropped)[:3]))
    return out


@dataclass
class Dataset:
    """Slides that are both labelled and stored, in labels-file order."""
    slide_ids: list[str]
    patients: np.ndarray  # str per slide
    x: np.ndarray  # (n, D) float32, each stored embedding flattened
    y: np.ndarray | None = None  # class codes (classify / retrieve)
    classes: list[str] | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    missing_in_store: list[str] = field(default_factory=list)
    unlabelled_in_store: int = 0
    store_meta: dict = field(default_factory=dict)
    patient_source: str = ""  # Labels.patient_source

    def summary(self) -> str:
        s = f"{len(self.slide_ids)} slides of {len(set(self.patients))} patients, embedding length {self.x.shape[1]}"
        if self.classes is not None:
            counts = np.bincount(self.y, minlength=len(self.classes))
            s += "; classes " + ", ".join(f"{c}: {n}" for c, n in zip(self.classes, counts))
        if self.time is not None:
            s += f"; {int(self.event.sum())} events"
        return s

    def patients_line(self) -> str:
        """`patients: column case_id (48 patients for 80 slides)`."""
        return (f"patients: {self.patient_source or 'given'} ({len(set(self.patients.tolist()))} patients for "
                f"{len(self.slide_ids)} slides)")


def load_dataset(store_path: str | os.PathLike, labels: Labels, task: str, strict: bool = False,
                 row: int | None = None) -> Dataset:
    """Join labels and store. Slides labelled but not stored are reported (an error with
    `strict`); stored slides without a label are counted and ignored. `row`: one row of
    multi-row (several-tau) embeddings; default all rows concatenated."""
    from ..store import open_store

    if not Path(store_path).exists():
        raise EvalError(f"no store at {store_path}")
    with open_store(store_path) as store:
        stored = set(store)
        keep = [i for i, s in enumerate(labels.slide_ids) if s in stored]
        missing = [s for s in labels.slide_ids if s not in stored]
        labelled = set(labels.slide_ids) | set(labels.dropped)
        unlabelled = len(stored - labelled)
        if missing:
            msg = (f"{len(missing)} of {len(labels.slide_ids)} labelled slides are not in the store {store_path} "
                   f"(e.g. {', '.join(missing[:5])})")
            if strict or not keep:
                raise EvalError(msg + ("" if keep else "; no labelled slide is stored: do the slide ids match?"))
            log.warning("%s; evaluating the other %d", msg, len(keep))
        if unlabelled:
            log.info("%d stored slides have no label and are ignored", unlabelled)
        xs, shapes, metas = [], {}, {}
        for i in keep:
            sid = labels.slide_ids[i]
            rec = store.record(sid)
            e = np.asarray(rec.embedding, np.float32)
            if e.ndim == 2 and row is not None:
                if not -e.shape[0] <= row < e.shape[0]:
                    raise EvalError(f"slide {sid!r}: --row {row} but the embedding has {e.shape[0]} rows")
                e = e[row]
            shapes.setdefault(e.shape, []).append(sid)
            xs.append(e.ravel())
            metas.setdefault(rec.meta.get("method"), rec.meta)
    if len(shapes) > 1:
        desc = "; ".join(f"{shape}: {len(ids)} slides (e.g. {ids[0]})" for shape, ids in shapes.items())
        raise EvalError(f"store {store_path} holds embeddings of different shapes ({desc}); "
                        "evaluate one method / option set per store")
    x = np.stack(xs)
    if not np.isfinite(x).all():
        bad = [labels.slide_ids[keep[i]] for i in np.flatnonzero(~np.isfinite(x).all(axis=1))]
        raise EvalError(f"{len(bad)} stored embeddings contain NaN or inf (e.g. {', '.join(bad[:5])})")
    ds = Dataset([labels.slide_ids[i] for i in keep], np.array([labels.patients[i] for i in keep]), x,
                 missing_in_store=missing, unlabelled_in_store=unlabelled, patient_source=labels.patient_source,
                 store_meta=next(iter(metas.values())) if len(metas) == 1 else {"methods": sorted(map(str, metas))})
    if labels.label is not None:
        lab = [labels.label[i] for i in keep]
        ds.classes = _sort_classes(set(lab))
        ds.y = np.array([ds.classes.index(v) for v in lab], np.int64)
    else:
        ds.time, ds.event = labels.time[keep], labels.event[keep]
    return ds
