"""`embed --features`: per-slide patch feature files -> slide embeddings in an LMDB store.

One slide at a time (peak memory follows the largest slide), each stored atomically, so a run
killed at any point resumes where it stopped: a slide whose record exists with the same options
is skipped. A bad slide is reported and skipped; the run goes on.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..aggregate import aggregate, resolve_backend
from ..errors import FeatureFileError, ProAlignError, StoreError, StoreWriteError
from ..features.io import SlideEntry, check_slide_id, read_features
from ..prototypes.io import prototype_hash, read_prototype_file
from ..store import open_store

log = logging.getLogger("proalign.embed")


@dataclass(frozen=True)
class EmbedOptions:
    method: str = "proalign"
    taus: tuple[float, ...] = (0.1,)
    over: str = "patches"
    dtype: str = "float16"  # how embeddings are stored
    backend: str | None = None  # None: fastest live backend
    encoder_id: str | None = None  # default: the feature file's `encoder` attribute
    panther_eps: float = 1.0  # METHOD.md defaults; PANTHER's released config.json runs 0.1
    panther_prior: float = 1.0  # and 0.001 (its script flags never reach the model)

    def key(self, prototypes_hash: str) -> dict:
        """What a stored record must match to count as done (the backend does not change it)."""
        k = {"method": self.method, "dtype": self.dtype, "prototypes": prototypes_hash}
        if self.method == "proalign":
            k.update(taus=list(self.taus), over=self.over)
        if self.method == "panther":
            k.update(eps=self.panther_eps, prior_strength=self.panther_prior)
        return k

    def aggregate_kwargs(self) -> dict:
        if self.method == "proalign":
            return {"tau": list(self.taus) if len(self.taus) > 1 else self.taus[0], "over": self.over}
        if self.method == "panther":
            return {"eps": self.panther_eps, "prior_strength": self.panther_prior}
        return {}


@dataclass
class RunReport:
    store: str
    prototypes: str
    options: dict
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=lambda: {"read_s": 0.0, "aggregate_s": 0.0, "write_s": 0.0})
    patches: int = 0
    report_path: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        t = self.timing.get("total_s", 0.0)
        return (f"{len(self.done)} embedded, {len(self.skipped)} already stored, {len(self.failed)} failed "
                f"in {t:.1f} s ({self.patches} patches)")

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "ok": self.ok}, indent=2))


class _Progress:
    """tqdm on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool | None):
        self.total, self.count = total, 0
        tty = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="slide", dynamic_ncols=True)
        self.every = max(1, total // 100)

    def step(self, slide_id: str, status: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{slide_id}: {status}", refresh=False)
            self.bar.update(1)
        elif status not in ("done", "skipped") or self.count % self.every == 0 or self.count == self.total:
            log.info("[%d/%d] %s %s", self.count, self.total, slide_id, status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _embed_one(entry: SlideEntry, c: np.ndarray, opts: EmbedOptions, report: RunReport):
    t0 = time.perf_counter()
    ff = read_features(entry.path, entry.slide_id)
    t1 = time.perf_counter()
    if ff.features.shape[1] != c.shape[1]:
        raise FeatureFileError(entry.path, f"feature dim {ff.features.shape[1]} does not match the prototypes' "
                                           f"dim {c.shape[1]}", entry.slide_id)
    emb = aggregate(ff.features, c, method=opts.method, backend=opts.backend, **opts.aggregate_kwargs())
    t2 = time.perf_counter()
    report.timing["read_s"] += t1 - t0
    report.timing["aggregate_s"] += t2 - t1
    return ff, emb.astype(opts.dtype)


def embed_features(
    entries: Sequence[SlideEntry],
    prototypes: str | Path,
    store_path: str | Path,
    options: EmbedOptions = EmbedOptions(),
    overwrite: bool = False,
    report_path: str | Path | None = None,
    progress: bool | None = None,
) -> RunReport:
    """Embed every slide of `entries` into the store at `store_path`; returns the run report
    (also written as JSON to `report_path`, default `<store>/reports/run-<time>.json`)."""
    c, _ = read_prototype_file(prototypes)
    phash = prototype_hash(c)
    backend = resolve_backend(options.method, options.backend, options=options.aggregate_kwargs()).name
    key = options.key(phash)
    report = RunReport(str(store_path), str(prototypes), {**asdict(options), "backend": backend})
    t_start = time.perf_counter()
    bar = _Progress(len(entries), progress)
    with open_store(store_path, write=True) as store:
        for entry in entries:
            sid = entry.slide_id
            try:
                check_slide_id(sid, str(entry.path))
                if not overwrite and sid in store and store.record(sid).meta.get("options") == key:
                    report.skipped.append(sid)
                    bar.step(sid, "skipped")
                    continue
                ff, emb = _embed_one(entry, c, options, report)
                meta = {
                    "method": options.method,
                    "options": key,
                    "taus": list(options.taus) if options.method == "proalign" else None,
                    "prototypes": {"hash": phash, "path": str(Path(prototypes).resolve()), "k": int(c.shape[0])},
                    "feature_source": ff.source,
                    "encoder": options.encoder_id or ff.attrs.get("encoder"),
                    "backend": backend,
                    "engine_version": __version__,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                t0 = time.perf_counter()
                store.put(sid, emb, len(ff.features), meta)
                report.timing["write_s"] += time.perf_counter() - t0
                report.done.append(sid)
                report.patches += len(ff.features)
                bar.step(sid, "done")
            except (ProAlignError, ValueError) as e:
                if isinstance(e, StoreError) and not isinstance(e, StoreWriteError):
                    raise  # the store itself is unusable: stop; what is stored stays
                report.failed[sid] = str(e)
                log.error("%s failed: %s", sid, e)
                bar.step(sid, "FAILED")
    bar.close()
    total = time.perf_counter() - t_start
    report.timing["total_s"] = total
    report.timing["slides_per_s"] = len(report.done) / total if total > 0 else 0.0
    if report_path is None:
        report_path = Path(store_path) / "reports" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.json"
    report.report_path = str(report_path)
    report.write(Path(report_path))
    return report
